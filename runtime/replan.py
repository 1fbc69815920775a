"""Re-planning without a lost device: fallback bundles, compiled ahead or on demand.

Why fallbacks live *inside* the bundle directory (``BUNDLE/fallback/without-<dev>/``): a
worker never loads a model from a request (issue 5, security), so every stage a worker
may be asked to run must be on its own disk, verified by the manifest's SHA-256, when it
starts or when an authenticated ``reload`` asks it to rescan that same directory. The
bundle alone does not hold what re-planning needs (the full model and the system file),
so:

* ``runtime fallback BUNDLE --model M --system S`` (or :func:`compile_fallbacks`)
  compiles, ahead of time, one bundle per device that can be lost (every device of the
  plan except the pinned source and destination); workers load them at start-up and the
  executor switches to one in a single round trip when a device dies;
* ``runtime run ... --model M --system S`` (or :class:`Replanner`) compiles a missing
  fallback on demand (any set of lost devices) and asks the live workers to reload.

A fallback is solved with the objective *kind* of the original plan, on the analytic
cost model (plus any profiles given); caps such as ``--max-latency`` are dropped, since a
degraded system may not meet them and a slower answer beats none.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stagebundle.errors import UserError, fail
from stagebundle.load import load_bundle

if TYPE_CHECKING:  # the compiler is imported only on the re-planning path, lazily
    from partitioner import ir

__all__ = ["system_without", "fallback_name", "compile_without", "compile_fallbacks",
           "Replanner"]

log = logging.getLogger("runtime.replan")


def system_without(system: ir.System, lost: Iterable[str]) -> ir.System:
    """``system`` minus the ``lost`` devices and their links."""
    lost = set(lost)
    return dataclasses.replace(
        system, devices=tuple(d for d in system.devices if d.name not in lost),
        links=tuple(k for k in system.links if k.a not in lost and k.b not in lost))


def fallback_name(lost: Iterable[str]) -> str:
    """Folder name under ``BUNDLE/fallback/`` for a set of lost devices."""
    return "without-" + "+".join(sorted(lost))


def compile_without(bundle_dir: str | Path, model: str | Path, system_path: str | Path,
                    lost: Iterable[str], *, profiles: Sequence[Any] = ()) -> Path | None:
    """Compile the bundle's model for the system without ``lost``; ``None`` if infeasible.

    Returns the new bundle directory ``BUNDLE/fallback/without-<lost>``.
    """
    from partitioner import ir
    from partitioner.analysis.costs import build_cost_table
    from partitioner.analysis.system import load_system
    from partitioner.backend import compile_bundle
    from partitioner.frontend import load_model
    from partitioner.solver import solve

    bundle_dir, lost = Path(bundle_dir), frozenset(lost)
    main = load_bundle(bundle_dir)
    system = load_system(system_path)
    known = {d.name for d in system.devices}
    for d in lost:
        if d not in known:
            fail(f"--device {d}: not a device of {system_path}")
    app = system.application
    pinned = {app.source, app.destination} & lost
    if pinned:
        log.warning("cannot plan without %s: it is pinned as source/destination",
                    ", ".join(sorted(x for x in pinned if x)))
        return None
    shapes = {t.name: tuple(t.shape) for t in main.model.inputs}
    prepared = load_model(model, shapes=shapes, granularity=main.model.granularity)
    if prepared.graph.sha256 != main.model.sha256:
        fail(f"--model {model}: not the model bundle {bundle_dir} was compiled from "
             f"(sha256 differs)")
    reduced = system_without(system, lost)
    table = build_cost_table(prepared.graph, reduced, profiles=profiles)
    kind = str(main.plan.get("objective", "latency"))
    try:
        plan = solve(table, ir.Objective(kind=kind))  # type: ignore[arg-type]
    except UserError as err:
        log.warning("no plan without %s: %s", ", ".join(sorted(lost)), err)
        return None
    out = bundle_dir / "fallback" / fallback_name(lost)
    out.parent.mkdir(exist_ok=True)
    compile_bundle(prepared, plan, reduced, out, verify=True, force=True)
    log.info("fallback without %s: %s", ", ".join(sorted(lost)),
             " -> ".join(f"{s.device}[{s.first}..{s.last}]" for s in plan.stages))
    return out


def compile_fallbacks(bundle_dir: str | Path, model: str | Path, system_path: str | Path,
                      *, devices: Sequence[str] | None = None,
                      profiles: Sequence[Any] = ()) -> dict[str, Path | None]:
    """One fallback per device of ``devices`` (default: every unpinned device of the plan)."""
    from partitioner.analysis.system import load_system

    main = load_bundle(bundle_dir)
    if devices is None:
        app = load_system(system_path).application
        used = main.devices
        devices = [d for d in used if d not in (app.source, app.destination)]
    return {d: compile_without(bundle_dir, model, system_path, [d], profiles=profiles)
            for d in devices}


class Replanner:
    """The executor's on-demand re-planner (see the module doc).

    Called with the set of lost devices, it compiles (once per set) a fallback bundle,
    asks every live worker of the executor to ``reload`` (rescan its bundle directory),
    and returns the plan key (``"fallback/without-..."``), or ``None`` when no plan exists.
    """

    def __init__(self, bundle_dir: str | Path, model: str | Path, system_path: str | Path,
                 *, token: str | None = None, profiles: Sequence[Any] = ()) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.model, self.system_path = model, system_path
        self.token, self.profiles = token, profiles
        self.executor: Any = None
        self._done: dict[frozenset[str], str | None] = {}
        self._lock = threading.Lock()

    def bind(self, executor: Any) -> None:
        """The executor whose hosts get the ``reload`` request."""
        self.executor = executor

    def __call__(self, lost: frozenset[str]) -> str | None:
        with self._lock:
            if lost in self._done:
                return self._done[lost]
            path = compile_without(self.bundle_dir, self.model, self.system_path, lost,
                                   profiles=self.profiles)
            key = None if path is None else f"fallback/{path.name}"
            if key is not None and self.executor is not None:
                self._reload(lost)
            self._done[lost] = key
            return key

    def _reload(self, lost: frozenset[str]) -> None:
        from runtime.transport import connect, recv_frame, send_frame

        for dev, addr in dict(self.executor.hosts).items():
            if dev in lost:
                continue
            try:
                with connect(addr, 30.0, getattr(self.executor, "tls", None)) as sock:
                    send_frame(sock, {"type": "reload", "token": self.token})
                    reply = recv_frame(sock, max_body=0)
                if reply.header.get("type") == "error":
                    log.warning("device %s refused to reload: %s", dev,
                                reply.header.get("message"))
            except Exception as err:  # a dead host is simply left out
                log.warning("device %s: reload failed: %s", dev, err)
