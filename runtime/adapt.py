"""Live adaptation (issue 13): calibrate while serving, re-plan on drift, switch plans.

An :class:`Adapter` runs beside a :class:`~runtime.executor.RemoteExecutor` on the
executor side (it needs the compiler: the model and the system file, like on-demand
fail-over). Every ``window`` seconds it

1. folds the window's measurements into the :class:`~runtime.calibrate.Calibration`:
   each completed request's per-unit compute times (the ``timings`` every result
   carries) against the cost model's estimate of that unit, and each worker's per-link
   acknowledged transfer times (its authenticated ``metrics`` reply; the executor's own
   for the input sends from the source device);
2. prices the current plan on the calibrated cost table and re-solves the model on it
   (:func:`partitioner.pipeline.solve_on`: the solver takes milliseconds on models of the
   zoo's size, so it runs every window);
3. applies the **drift rule** (:class:`DriftRule`): switch only when the current plan's
   re-estimate exceeds the new optimum's by more than ``margin`` (relative) for
   ``windows`` consecutive windows with the *same* better plan, and at least
   ``min_interval`` seconds after the previous switch - no flapping on noise.
   The rule, its options and the plan names are in :mod:`runtime.drift` (re-exported
   here).

A switch is lossless: the new plan is compiled (verified) into ``BUNDLE/adapt/<name>/``
(``name`` from the plan's stages, so the same plan is compiled once and a folder is never
re-used for another plan), every worker of the new plan is asked to ``reload`` and must
then list each of its units (``ready``), one trial request pinned to the new plan must
succeed, and only then do *new* requests start on it (at a request boundary,
:meth:`RemoteExecutor.switch_plan`); requests in flight finish on their plan, the
executor's first-answer-wins rule keeps any request from being answered twice, and any
failure on the way leaves the old plan serving. Plans are named by epoch (``p0`` is the
bundle's own plan, then ``p1``, ``p2``... in the order requests first ran on them).

Loading a new plan's units is one small interface, :data:`EnsureUnits` ("make sure the
worker on this device serves these units of plan K, whose manifest has this sha256").
The default sends the worker an ``ensure`` frame with the manifest (a worker that builds
stages from its own model copy answers it), and one that does not know the frame is
asked to ``reload``, i.e. rescan its bundle directory (shared storage, as on-demand
fail-over assumes); then ``ready`` must list every unit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from runtime.calibrate import Calibration, unit_estimates
from runtime.drift import (
    AdaptOptions,
    DriftRule,
    PlanNames,
    Switch,
    drift_metric,
    plan_folder,
    plan_signature,
)
from stagebundle.errors import UserError, fail

# the drift rule and the plan names live in runtime.drift, re-exported here
__all__ = ["AdaptOptions", "Adapter", "DriftRule", "Switch", "PlanNames", "EnsureUnits",
           "ADAPT_DIR", "plan_folder"]

log = logging.getLogger("runtime.adapt")

ADAPT_DIR = "adapt"
# (device, address, plan key, unit keys, manifest sha256) -> None, raises on failure
EnsureUnits = Callable[[str, tuple[str, int], str, Sequence[str], str], None]


class Adapter:
    """Calibrate, re-plan and switch beside ``executor`` (see the module doc).

    Args:
        executor: the :class:`~runtime.executor.RemoteExecutor` serving the bundle.
        model / system: the model the bundle was compiled from and the system file.
        options: the drift rule's constants.
        ensure: how a worker is made to serve a new plan's units (default: ``reload``).
        profiles: profiles the bundle was planned with, if any.
    """

    def __init__(self, executor: Any, model: str | Path, system: str | Path, *,
                 options: AdaptOptions | None = None, ensure: EnsureUnits | None = None,
                 profiles: Sequence[Any] = ()) -> None:
        from partitioner.pipeline import bundle_context

        self.executor = executor
        self.options = (options or AdaptOptions()).check()
        self.bundle_dir = Path(executor.view.root)
        self.context = bundle_context(self.bundle_dir, model,
                                      _served_system(system, executor.hosts),
                                      profiles=profiles)
        if any(s.exit is not None for s in self.context.plan.stages):
            fail(f"--adapt: bundle {self.bundle_dir} has early-exit heads; re-planning "
                 f"them while serving is not built")
        self.calibration = Calibration(self.context.table, alpha=self.options.alpha,
                                       baseline=self.options.baseline,
                                       forget=self.options.forget or None)
        self.rule = DriftRule(self.options.margin, self.options.windows,
                              self.options.min_interval)
        self.ensure = ensure or self._load_units
        self.names = PlanNames()
        self.switches: list[Switch] = []
        self.failed_switches: list[str] = []
        self.history: list[dict[str, Any]] = []  # one entry per window (for benchmarks)
        self._records: deque[dict[str, Any]] = deque(maxlen=100_000)
        self._estimates: dict[str, dict[str, tuple[str, float]]] = {}
        self._plans: dict[str, Any] = {}
        self._filed_costs: dict[str, float] = {}
        # per (device, peer): timed transfers, their seconds and bytes seen so far
        self._acked: dict[tuple[str, Any], tuple[int, float, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="adapt", daemon=True)
        executor.observers.append(self._records.append)
        executor.time_links = True  # the workers time some of their sends (metrics)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Adapter:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self._records.append in self.executor.observers:
            self.executor.observers.remove(self._records.append)

    def __enter__(self) -> Adapter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.options.window):
            try:
                self.step()
            except Exception as err:  # adaptation must never stop the serving
                log.warning("adaptation window failed: %s: %s", err.__class__.__name__, err)

    # ------------------------------------------------------------------ one window
    def _plan(self, key: str) -> Any:
        if key not in self._plans:
            from partitioner import ir

            self._plans[key] = ir.Plan.from_json(self.executor.views[key].plan)
        return self._plans[key]

    def _filed(self, key: str) -> float:
        """Plan ``key``'s cost on the uncalibrated table (the file's figures)."""
        if key not in self._filed_costs:
            from partitioner.analysis.routing import reprice

            self._filed_costs[key] = drift_metric(self.context.objective.kind, reprice(
                self.context.prepared.graph, self.context.table, self._plan(key)))
        return self._filed_costs[key]

    def _unit_estimates(self, key: str) -> dict[str, tuple[str, float]]:
        if key not in self._estimates:
            self._estimates[key] = unit_estimates(self.context.table, self._plan(key))
        return self._estimates[key]

    def _observe_units(self) -> None:
        """The per-unit compute of the requests answered since the last call.

        A trial request (a switch's) counts only for devices already calibrated: it is
        the first run of sessions that may be cold, a poor reference."""
        known = self.calibration.compute_factors()
        while self._records:
            rec = self._records.popleft()
            key = rec.get("plan")
            if not isinstance(key, str) or key not in self.executor.views:
                continue
            estimates = self._unit_estimates(key)
            for t in rec.get("timings") or ():
                unit = estimates.get(str(t.get("stage")))
                if unit is None or unit[0] != t.get("device"):
                    continue
                if rec.get("trial") and unit[0] not in known:
                    continue
                self.calibration.observe_unit(unit[0], float(t.get("compute", 0.0)), unit[1])

    def _observe(self) -> None:
        self._observe_units()
        view = self.executor.views[self.executor.current]
        snaps = self._poll(view.devices)
        if view.bundle.source is not None:  # the executor sends the inputs from there
            snaps.append((view.bundle.source, self.executor.links.snapshot()))
        for device, snap in snaps:
            for link in snap.get("links") or ():
                # the timed transfers since the last window: their mean time and size
                peer = link.get("peer")
                now = (int(link.get("acked") or 0), float(link.get("acked_seconds_sum") or 0),
                       float(link.get("acked_bytes_sum") or 0))
                last = self._acked.get((device, peer), (0, 0.0, 0.0))
                self._acked[(device, peer)] = now
                n = now[0] - last[0]
                if n <= 0 or now[2] <= last[2]:
                    continue  # none since (or the worker restarted: counters anew)
                self.calibration.observe_link(device, str(peer), (now[1] - last[1]) / n,
                                              (now[2] - last[2]) / n)

    def _poll(self, devices: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
        """Each device's worker metrics (a worker that does not answer is skipped)."""
        from runtime.transport import connect, recv_frame, send_frame

        out = []
        for dev in devices:
            addr = self.executor.hosts.get(dev)
            if addr is None or dev in self.executor.down:
                continue
            try:
                with connect(addr, 2.0, self.executor.tls) as sock:
                    send_frame(sock, {"type": "metrics", "token": self.executor.token})
                    reply = recv_frame(sock, max_body=0, frame_timeout=2.0)
            except Exception as err:
                log.debug("metrics of %s: %s", dev, err)
                continue
            if reply.header.get("type") == "metrics":
                out.append((dev, reply.header))
        return out

    def step(self) -> Switch | None:
        """One window: calibrate, re-estimate, re-solve, maybe switch."""
        from partitioner.analysis.routing import reprice
        from partitioner.pipeline import solve_on

        self._observe()
        self.calibration.end_window(self.options.min_samples)
        key = self.executor.current
        view = self.executor.views[key]
        entry: dict[str, Any] = {"time": time.time(), "plan": self.names(key),
                                 **self.calibration.summary()}
        self.history.append(entry)
        # the devices that compute something in this plan must all be calibrated
        computing = {dev for dev, est in self._unit_estimates(key).values() if est > 0}
        if any(d in self.executor.down for d in view.devices) or \
                not self.calibration.calibrated(computing):
            entry["state"] = "calibrating"
            return None
        t0 = time.perf_counter()
        table = self.calibration.table()
        current_plan = self._plan(key)
        current = drift_metric(self.context.objective.kind,
                          reprice(self.context.prepared.graph, table, current_plan))
        best = solve_on(self.context, table)
        best_cost = drift_metric(self.context.objective.kind, best.plan.estimate)
        sig = plan_signature(best.plan)
        entry.update(current=current, best=best_cost, state="steady",
                     filed=self._filed(key), solve_seconds=time.perf_counter() - t0)
        now = time.monotonic()
        if not self.rule.step(now, current, best_cost, sig, plan_signature(current_plan)):
            if self.rule.count:
                entry["state"] = f"drift {self.rule.count}/{self.options.windows}"
            return None
        factors = ", ".join(f"{d} x{f:.2g}" for d, f in sorted(
            self.calibration.compute_factors().items()) if abs(f - 1) > 0.2)
        links = ", ".join(f"{k} x{f:.2g}" for k, f in sorted(
            self.calibration.summary()["links"].items()) if abs(f - 1) > 0.2)
        reason = (f"re-estimated {self.names(key)} {current * 1e3:.3g} ms > "
                  f"{1 + self.options.margin:.3g} x {best_cost * 1e3:.3g} ms of the new "
                  f"optimum for {self.rule.count} windows"
                  + (f"; compute {factors}" if factors else "")
                  + (f"; links {links}" if links else ""))
        switch = self.switch_to(best, reason)
        self.rule.switched(time.monotonic())  # a failed switch waits the interval too
        entry["state"] = "switched" if switch else "switch failed"
        return switch

    # ------------------------------------------------------------------ switching
    def switch_to(self, result: Any, reason: str) -> Switch | None:
        """Compile, load, check and switch to ``result.plan``; None (old plan still
        serving) when any step fails."""
        old = self.executor.current
        try:
            key = self._key_for(result.plan) or self._compile(result)
            self.executor.open_plan(key)
            view = self.executor.views[key]
            for dev in view.devices:
                units = [u.key for u in view.units() if u.device == dev]
                self.ensure(dev, self.executor.hosts[dev], key, units,
                            _manifest_sha(view.root))
            self._trial(key)
            self._still_better(old, key)
        except (UserError, OSError, RuntimeError, KeyError) as err:
            why = f"switch from {self.names(old)} failed, {self.names(old)} keeps serving: {err}"
            log.warning("%s", why)
            self.failed_switches.append(why)
            return None
        at = self.executor.switch_plan(key)
        switch = Switch(at, self.names(old) or old, self.names(key) or key, reason,
                        time.time())
        self.switches.append(switch)
        log.warning("plan switch %s -> %s at request %d: %s", switch.from_plan,
                    switch.to_plan, at, reason)
        return switch

    def _key_for(self, plan: Any) -> str | None:
        """A loaded plan with the same stages (going back to ``main``, say), if any."""
        sig = plan_signature(plan)
        for key in list(self.executor.views):
            if plan_signature(self._plan(key)) == sig:
                return key
        return None

    def _still_better(self, old: str, new: str) -> None:
        """After the trial request: with its measurements folded in (a device that was
        left and may have recovered is measured again by it), the new plan must still
        beat the old one by the margin."""
        from partitioner.analysis.routing import reprice

        self._observe_units()
        self.calibration.end_window(min_samples=1)
        table = self.calibration.table()
        kind, graph = self.context.objective.kind, self.context.prepared.graph
        before = drift_metric(kind, reprice(graph, table, self._plan(old)))
        after = drift_metric(kind, reprice(graph, table, self._plan(new)))
        if not before > (1.0 + self.options.margin) * after:
            raise RuntimeError(f"the trial request measured {self.names(new)} at "
                               f"{after * 1e3:.3g} ms against {before * 1e3:.3g} ms: not "
                               f"better by the margin")

    def _compile(self, result: Any) -> str:
        """``BUNDLE/adapt/<name>`` for ``result.plan`` (compiled and verified once)."""
        from partitioner.pipeline import write_plan

        name = plan_folder(self.context.prepared.graph.sha256, result.plan)
        final = self.bundle_dir / ADAPT_DIR / name
        if not (final / "manifest.json").is_file():
            final.parent.mkdir(exist_ok=True)
            # written under a dot name (skipped by every loader), then renamed at once
            tmp = final.parent / f".{name}.{os.getpid()}.{threading.get_ident()}"
            try:
                write_plan(result, tmp)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        return f"{ADAPT_DIR}/{name}"

    def _trial(self, key: str) -> None:
        """One request pinned to ``key`` must succeed before any other is sent there."""
        inputs = self.executor.last_inputs
        if inputs is None:
            raise RuntimeError("no request seen yet to try the new plan with")
        fut = self.executor.submit(inputs, plan=key)
        try:
            fut.result(timeout=self.executor.attempt_timeout + 5.0)
        except Exception as err:
            raise RuntimeError(f"trial request on the new plan failed: {err}") from None

    def _load_units(self, device: str, addr: tuple[str, int], key: str,
                    units: Sequence[str], sha256: str) -> None:
        """Default :data:`EnsureUnits`. First an ``ensure`` frame (``{"type": "ensure",
        "plan": K, "units": [...], "manifest": TEXT, "sha256": X}``, for a worker that
        builds stages from its own model copy and checks them against the manifest);
        a worker that does not know it is asked to ``reload`` (rescan its bundle
        directory). Either way ``ready`` must then list every unit of ``K`` on it."""
        manifest = (self.executor.views[key].root / "manifest.json").read_text()
        reply = self._ask(addr, {"type": "ensure", "plan": key, "units": list(units),
                                 "manifest": manifest, "sha256": sha256})
        unknown = reply.get("type") == "error" and "unknown request type" in str(
            reply.get("message"))
        if unknown:
            reply = self._ask(addr, {"type": "reload"})
        if reply.get("type") == "error":
            raise RuntimeError(f"device {device} cannot load plan {key}: "
                               f"{reply.get('message')}")
        reply = self._ask(addr, {"type": "ready"})
        served = {s.get("stage") for s in reply.get("stages") or () if s.get("plan") == key}
        missing = [u for u in units if u not in served]
        if missing or not reply.get("ready", False):
            raise RuntimeError(f"device {device} does not serve unit(s) "
                               f"{', '.join(missing) or '(not ready)'} of plan {key}")

    def _ask(self, addr: tuple[str, int], header: dict[str, Any]) -> dict[str, Any]:
        """One authenticated frame to a worker, its one-frame answer."""
        from runtime.transport import connect, recv_frame, send_frame

        with connect(addr, 30.0, self.executor.tls) as sock:
            send_frame(sock, {**header, "token": self.executor.token})
            return dict(recv_frame(sock, max_body=0, frame_timeout=120.0).header)

    # ------------------------------------------------------------------ report
    def report(self) -> list[dict[str, Any]]:
        """The switches as INTERFACES' ``switches`` entries."""
        return [{"at_request": s.at_request, "from": s.from_plan, "to": s.to_plan,
                 "reason": s.reason} for s in self.switches]


def _served_system(system: str | Path, hosts: Any) -> Any:
    """The system without the devices that have no worker (``--hosts``): a re-plan may
    only use devices something serves; the pinned source and destination stay."""
    from partitioner.analysis.system import load_system
    from partitioner.pipeline import system_without

    full = load_system(system)
    app = full.application
    idle = [d.name for d in full.devices
            if d.name not in hosts and d.name not in (app.source, app.destination)]
    return system_without(full, idle) if idle else full


def _manifest_sha(root: Path) -> str:
    return hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
