"""The streaming client of ``runtime run --repeat N [--concurrency C] [--adapt] --json``.

:func:`stream` keeps ``concurrency`` requests in flight until ``repeat`` were sent, waits
for every one, and builds INTERFACES' document: per request its id, outcome, latency,
plan (epoch name, :class:`runtime.adapt.PlanNames`), early exit and error; the plan
switches (live adaptation's, and the first request on each fail-over plan) with their
reasons; and a summary that counts requests *lost* (never answered, not even with an
error) and *duplicated* (answered more than once; the executor's first-answer-wins rule
should keep both at 0).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.adapt import PlanNames

__all__ = ["stream"]


def stream(executor: Any, inputs: Mapping[str, np.ndarray], repeat: int, *,
           concurrency: int = 1, adapter: Any = None, wait: float | None = None,
           until: threading.Event | None = None
           ) -> tuple[dict[str, Any], dict[str, np.ndarray] | None, str | None]:
    """Run the requests; returns (document, last answered request's outputs, first error).

    ``wait``: seconds to wait for each answer before counting it lost (default: the
    executor's request timeout plus 10 s; the executor fails a request on its deadline).
    ``until``: stop sending (before ``repeat``) once this event is set (benchmarks).
    Each run also says when it was sent (``sent``, seconds after the first).
    """
    names = adapter.names if adapter is not None else PlanNames()
    answered: collections.Counter[str] = collections.Counter()
    observers = getattr(executor, "observers", None)

    def count(record: Mapping[str, Any]) -> None:
        if not record.get("trial"):
            answered[str(record["id"])] += 1

    if observers is not None:
        observers.append(count)
    room = threading.BoundedSemaphore(concurrency)
    futures: list[cf.Future[dict[str, np.ndarray]]] = []
    sent: list[float] = []
    t0 = time.perf_counter()
    try:
        for _ in range(repeat):
            room.acquire()
            if until is not None and until.is_set():
                room.release()
                break
            sent.append(time.perf_counter() - t0)
            fut = executor.submit(inputs)
            fut.add_done_callback(lambda _f: room.release())
            futures.append(fut)
        limit = wait if wait is not None else getattr(executor, "timeout", 30.0) + 10.0
        outcomes: list[tuple[dict[str, np.ndarray] | None, str | None]] = []
        for fut in futures:
            try:
                outcomes.append((fut.result(timeout=limit), None))
            except cf.TimeoutError:
                outcomes.append((None, "lost"))
            except Exception as err:
                outcomes.append((None, str(err)))
        wall = time.perf_counter() - t0
    finally:
        if observers is not None:
            observers.remove(count)
    by_id = {r["id"]: r for r in getattr(executor, "records", ())}
    if observers is None:  # a local executor: each record is its answer
        answered.update(r["id"] for r in by_id.values())
    runs, last, first_error = [], None, None
    for fut, (outputs, error), when in zip(futures, outcomes, sent, strict=True):
        rid = fut.request_id  # type: ignore[attr-defined]
        rec = getattr(fut, "record", None) or by_id.get(rid) or {}
        if outputs is not None:
            last = outputs
        elif first_error is None:
            first_error = error if error != "lost" else f"request {rid}: no answer"
        runs.append({"id": rid, "ok": outputs is not None, "latency": rec.get("latency"),
                     "plan": names(rec.get("plan")), "exit": rec.get("exit"),
                     "error": None if outputs is not None else error, "sent": when,
                     "attempts": rec.get("attempts", 1), "retries": rec.get("retries", []),
                     "stages": rec.get("timings", [])})
    switches = adapter.report() if adapter is not None else []
    seen = {"p0"} | {s["to"] for s in switches} | {s["from"] for s in switches}
    for i, run in enumerate(runs):  # fail-over onto a plan for the first time
        if run["plan"] is not None and run["plan"] not in seen:
            seen.add(run["plan"])
            switches.append({"at_request": i, "from": runs[i - 1]["plan"] if i else "p0",
                             "to": run["plan"], "reason": "fail-over: "
                             + ("; ".join(run["retries"][-2:]) or "a device is down")})
    switches.sort(key=lambda s: s["at_request"])
    ok = [r["latency"] for r in runs if r["ok"] and r["latency"] is not None]
    lost = sum(1 for _, e in outcomes if e == "lost")
    doc: dict[str, Any] = {
        "requests": len(runs), "wall": wall,
        "latency": {"mean": float(np.mean(ok)) if ok else None,
                    "min": float(np.min(ok)) if ok else None,
                    "max": float(np.max(ok)) if ok else None},
        "runs": runs, "switches": switches,
        "summary": {"ok": sum(r["ok"] for r in runs),
                    "failed": sum(not r["ok"] for r in runs) - lost, "lost": lost,
                    "duplicated": sum(1 for n in answered.values() if n > 1)}}
    return doc, last, first_error
