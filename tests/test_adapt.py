"""Live adaptation on real workers: calibrate, re-plan on drift, switch without loss.

Drift is injected for real: a worker started with ``--debug-slowdown`` is told (an
authenticated ``debug`` frame) to take 100x its compute time per unit - a slow but alive
host, answering every probe. No wall-clock time is asserted; the tests wait on states
(the calibration's windows, the switches) with generous limits.
"""
# ruff: noqa: F811  (pytest fixtures)

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from runtime.adapt import Adapter, AdaptOptions, DriftRule
from runtime.executor import RemoteExecutor
from runtime.stream import stream
from tests.test_adapt_fixtures import (  # noqa: F401  (fixtures)
    Workers,
    built,
    workers,
)
from tests.test_runtime_fixtures import TOKEN, Built, reference, sample

FAST = AdaptOptions(window=0.3, windows=2, min_interval=0.0)
SLOW = 100.0


def _wait(cond: Callable[[], bool], seconds: float = 60.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _steady(adapter: Adapter, n: int = 1) -> bool:
    return sum(h.get("state") == "steady" for h in adapter.history) >= n


class Streamer:
    """Requests kept in flight on a thread (``concurrency`` at once) until stopped."""

    def __init__(self, executor: RemoteExecutor, concurrency: int = 2) -> None:
        self.executor = executor
        self.x = sample(7)
        self.futures: list[cf.Future[dict[str, np.ndarray]]] = []
        self._room = threading.BoundedSemaphore(concurrency)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._room.acquire()
            fut = self.executor.submit({"input": self.x})
            fut.add_done_callback(lambda _f: self._room.release())
            self.futures.append(fut)

    def __enter__(self) -> Streamer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def results(self) -> list[tuple[Any, Any]]:
        out = []
        for f in list(self.futures):
            try:
                out.append((f.result(60), f.record))  # type: ignore[attr-defined]
            except Exception as err:  # noqa: BLE001 - reported by the assertions
                out.append((err, getattr(f, "record", None)))
        return out


def _check_answers(built: Built, results: list[tuple[Any, Any]]) -> None:
    want = reference(built.model, sample(7))
    errors = [r for r, _ in results if isinstance(r, Exception)]
    assert not errors, errors[:3]
    for out, _ in results:
        np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-5)
    ids = [rec["id"] for _, rec in results]
    assert len(ids) == len(set(ids))


def test_slow_host_is_replanned_away_from_without_loss(built, workers) -> None:
    with RemoteExecutor(built.bundle, workers.hosts, token=TOKEN, timeout=30,
                        probe_interval=0.1) as ex, Adapter(ex, built.model, built.system,
                                                           options=FAST) as adapter:
        assert ex.views["main"].devices == ("hub",)  # the solver's plan: all on the hub
        with Streamer(ex) as s:
            assert _wait(lambda: _steady(adapter)), adapter.history
            assert not adapter.switches  # calibrated, no drift yet: the plan stays
            workers.slow_down("hub", SLOW)
            assert _wait(lambda: bool(adapter.switches)), adapter.history[-5:]
            at = adapter.switches[0].at_request
            assert _wait(lambda: len(s.futures) > at + 20)
        results = s.results()
        new_plan = ex.current
        assert new_plan != "main" and "hub" not in ex.views[new_plan].devices
        # compiled into BUNDLE/adapt/, or a loaded plan with the same stages (the bundle
        # carries the fail-over plan without the hub: all on the edge)
        assert (built.bundle / new_plan / "manifest.json").is_file()
        assert ex.duplicates == 0
    _check_answers(built, results)
    switch = adapter.report()[0]
    assert (switch["from"], switch["to"]) == ("p0", "p1")
    assert "hub" in switch["reason"]
    plans = [rec["plan"] for _, rec in results]
    # a request boundary: everything submitted before the switch ran on the old plan,
    # everything after on the new one
    assert set(plans[:at]) == {"main"} and set(plans[at:]) == {new_plan}
    assert len(adapter.switches) == 1  # no flapping back


def test_no_switch_without_drift(built, workers) -> None:
    # the default rule (1 s windows, margin 0.5, 5 windows) on this loaded host
    with RemoteExecutor(built.bundle, workers.hosts, token=TOKEN, timeout=30,
                        probe_interval=0.1) as ex, Adapter(ex, built.model, built.system
                                                           ) as adapter:
        with Streamer(ex):
            assert _wait(lambda: _steady(adapter, 12), 120), adapter.history[-5:]
        assert adapter.switches == [] and adapter.failed_switches == []
        assert ex.current == "main"
        states = {h.get("state") for h in adapter.history}
        # noise may make another plan look better for a window, never for the 5 in a
        # row at the margin that a switch needs
        assert states <= {"calibrating", "steady"} | {f"drift {k}/5" for k in range(1, 5)}, \
            states
        assert all(h["current"] > 0 and h["best"] > 0 for h in adapter.history
                   if "current" in h)


def test_worker_killed_during_a_switch_loses_nothing(built, workers) -> None:
    """The slow hub dies while the switch away from it loads the new plan: the
    requests it held are re-sent on the fail-over plan, the switch still completes."""
    with RemoteExecutor(built.bundle, workers.hosts, token=TOKEN, timeout=30,
                        probe_interval=0.1) as ex, Adapter(ex, built.model, built.system,
                                                           options=FAST) as adapter:
        real = adapter.ensure

        def ensure_then_kill(*args: Any) -> None:
            if "hub" in workers.procs:
                workers.kill("hub")
            real(*args)

        adapter.ensure = ensure_then_kill
        with Streamer(ex, concurrency=4) as s:
            assert _wait(lambda: _steady(adapter)), adapter.history
            workers.slow_down("hub", SLOW)
            assert _wait(lambda: bool(adapter.switches) or bool(adapter.failed_switches))
            n = len(s.futures)
            assert _wait(lambda: len(s.futures) > n + 40)
        results = s.results()
    _check_answers(built, results)
    assert adapter.switches, adapter.failed_switches
    plans = {rec["plan"] for _, rec in results}
    assert "main" in plans and ex.current in plans
    assert "hub" in ex.down


def test_failed_switch_leaves_the_old_plan_serving(built, workers) -> None:
    """The new plan's worker (the edge) is gone when the switch loads it: the switch is
    abandoned and every request is still answered by the old plan."""
    with RemoteExecutor(built.bundle, workers.hosts, token=TOKEN, timeout=30,
                        probe_interval=0.1) as ex, Adapter(ex, built.model, built.system,
                                                           options=FAST) as adapter:
        real = adapter.ensure

        def kill_then_ensure(device: str, *args: Any) -> None:
            if device in workers.procs:
                workers.kill(device)
            real(device, *args)

        adapter.ensure = kill_then_ensure
        with Streamer(ex) as s:
            assert _wait(lambda: _steady(adapter)), adapter.history
            workers.slow_down("hub", SLOW)
            assert _wait(lambda: bool(adapter.failed_switches)), adapter.history[-5:]
            n = len(s.futures)
            assert _wait(lambda: len(s.futures) > n + 10)
        results = s.results()
        assert ex.current == "main" and adapter.switches == []
    _check_answers(built, results)
    assert {rec["plan"] for _, rec in results} == {"main"}
    assert "keeps serving" in adapter.failed_switches[0]


def test_stream_document_counts_every_request(built, workers) -> None:
    with RemoteExecutor(built.bundle, workers.hosts, token=TOKEN, timeout=30) as ex:
        doc, last, error = stream(ex, {"input": sample(7)}, 25, concurrency=3)
    assert error is None and last is not None
    assert set(doc) == {"requests", "wall", "latency", "runs", "switches", "summary"}
    assert doc["summary"] == {"ok": 25, "failed": 0, "lost": 0, "duplicated": 0}
    assert doc["requests"] == len(doc["runs"]) == 25 and doc["switches"] == []
    assert {r["plan"] for r in doc["runs"]} == {"p0"}
    assert all(r["ok"] and r["error"] is None and r["exit"] is None for r in doc["runs"])
    lat = [r["latency"] for r in doc["runs"]]
    assert doc["latency"]["min"] == min(lat) and doc["latency"]["max"] == max(lat)
    np.testing.assert_allclose(last["logits"], reference(built.model, sample(7)),
                               rtol=1e-5, atol=1e-5)


def test_drift_rule_needs_consecutive_windows_and_the_interval() -> None:
    rule = DriftRule(margin=0.2, windows=3, min_interval=10.0, start=0.0)
    cur = ("p0",)
    # within the margin: never
    assert not any(rule.step(t, 1.19, 1.0, "A", cur) for t in range(20, 30))
    # better by the margin, but the candidate changes: the count restarts
    assert not rule.step(20, 2.0, 1.0, "A", cur)
    assert not rule.step(21, 2.0, 1.0, "A", cur)
    assert not rule.step(22, 2.0, 1.0, "B", cur)
    assert not rule.step(23, 2.0, 1.0, "B", cur)
    assert rule.step(24, 2.0, 1.0, "B", cur)
    rule.switched(24.0)
    # the minimum interval holds a second switch back even when the windows agree
    assert not any(rule.step(t, 2.0, 1.0, "C", cur) for t in (25, 26, 27, 30))
    assert rule.step(34.5, 2.0, 1.0, "C", cur)
    # the best plan being the current one is never a reason
    assert not any(rule.step(t, 5.0, 1.0, cur, cur) for t in range(50, 60))


def test_a_recovered_host_is_tried_again_and_taken_back(built, workers) -> None:
    """The factor of a host the plan left fades (--adapt-forget); the switch back is
    tried with one request first: refused while the host is still slow, taken once it
    recovered."""
    # margin 0.1: healthy, the two plans of this tiny model differ by only 17-20 % as
    # measured (1.45 against 1.75 ms), so with 0.25 the switch back hung on one trial
    # request landing in the tail (it did not within 120 s in one suite run); the slow
    # hub (x100) is refused by any margin
    options = AdaptOptions(window=0.3, windows=2, min_interval=0.0, margin=0.1, forget=2)
    with RemoteExecutor(built.bundle, workers.hosts, token=TOKEN, timeout=30,
                        probe_interval=0.1) as ex, Adapter(ex, built.model, built.system,
                                                           options=options) as adapter:
        with Streamer(ex) as s:
            assert _wait(lambda: _steady(adapter)), adapter.history
            workers.slow_down("hub", SLOW)
            assert _wait(lambda: bool(adapter.switches)), adapter.history[-5:]
            # still slow: the trial request on the way back measures it, no switch
            assert _wait(lambda: any("not better by the margin" in f
                                     for f in adapter.failed_switches), 120), (
                adapter.failed_switches, adapter.history[-5:])
            assert len(adapter.switches) == 1 and ex.current != "main"
            workers.slow_down("hub", 1.0)
            assert _wait(lambda: len(adapter.switches) >= 2, 120), (
                adapter.failed_switches[-3:], adapter.history[-5:])
            n = len(s.futures)
            assert _wait(lambda: len(s.futures) > n + 20)
        results = s.results()
    _check_answers(built, results)
    hops = [(w["from"], w["to"]) for w in adapter.report()]
    assert hops[:2] == [("p0", "p1"), ("p1", "p0")], hops
    assert ex.current == "main" or len(hops) > 2
