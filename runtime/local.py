"""The in-process executor: every unit of a bundle in this process (``runtime run --local``).

Each request walks the stage graph with :func:`stagebundle.graph.run_graph`, the very
rules the workers follow (inboxes, sends, row pieces), on one thread; a unit runs one
request at a time (its lock), so request k+1 runs unit 0 while request k runs unit 1
(pipelining). Also here: what both executors share (the model-input check,
:class:`RequestError`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.stages import MAIN, BundleView, StageRunner, check_tensor, open_bundles
from stagebundle.errors import UserError, fail
from stagebundle.graph import run_graph
from stagebundle.manifest import Unit

__all__ = ["RequestError", "LocalExecutor", "check_model_inputs", "new_request",
           "views_of"]


class RequestError(UserError):
    """A request failed for good; the message names its id and why."""

    exit_code = 3


def check_model_inputs(view: BundleView, inputs: Mapping[str, np.ndarray]) -> None:
    """``inputs`` are exactly the model inputs, with their declared dtype and shape."""
    if view.inputs_match(inputs):  # the common case, checked fast
        return
    names = {t.name for t in view.inputs}
    for name in inputs:
        if name not in names:
            fail(f"input {name!r}: not an input of the model (inputs: {', '.join(names)})")
    for t in view.inputs:
        if t.name not in inputs:
            fail(f"input {t.name}: missing")
        check_tensor(t, np.asarray(inputs[t.name]), "model input")


def new_request(view: BundleView, inputs: Mapping[str, np.ndarray],
                request_id: str | None) -> tuple[str, cf.Future[dict[str, np.ndarray]],
                                                 dict[str, np.ndarray]]:
    """Check a request's inputs; its id, its future (``request_id`` attribute) and feeds."""
    check_model_inputs(view, inputs)
    rid = request_id or uuid.uuid4().hex
    fut: cf.Future[dict[str, np.ndarray]] = cf.Future()
    fut.request_id = rid  # type: ignore[attr-defined]
    return rid, fut, {k: _native(np.asarray(v)) for k, v in inputs.items()}


def _native(arr: np.ndarray) -> np.ndarray:
    """``arr`` in this machine's byte order (a big-endian float32 .npy is float32 too,
    but the stages' checks and ONNX Runtime take native arrays)."""
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def views_of(bundle: str | Path | BundleView | Mapping[str, BundleView]) -> dict[str, BundleView]:
    if isinstance(bundle, BundleView):
        return {bundle.key: bundle}
    if isinstance(bundle, Mapping):
        return dict(bundle)
    return open_bundles(bundle)


class LocalExecutor:
    """Every unit in this process with ONNX Runtime; ``submit`` pipelines across units.

    Each request walks the stage graph with :func:`stagebundle.graph.run_graph` (the
    workers' rules: inboxes, sends, row pieces) on one thread: :meth:`infer` on the
    caller's, :meth:`submit` on one of a pool's. A unit runs one request at a time (its
    lock), so request k+1 runs unit 0 while request k runs unit 1. (A thread per unit
    instead cost two thread hand-offs per unit and request: 1.5-2.4 ms a request for 3
    units on the 2-core dev host, benchmarks/README.md 14.4.)
    """

    def __init__(self, bundle: str | Path | BundleView | Mapping[str, BundleView], *,
                 threads: int | None = None) -> None:
        self.view = views_of(bundle)[MAIN]
        units = list(self.view.units())
        self.runners = {u.key: StageRunner(u, self.view.root, threads=threads)
                        for u in units}
        self._busy = {u.key: threading.Lock() for u in units}
        # drives submitted requests through the graph (each mostly waits on a unit's lock)
        self._requests = cf.ThreadPoolExecutor(len(units) + 1,
                                               thread_name_prefix="local-request")
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request through every unit, on this thread; returns the model outputs
        by name."""
        rid, fut, feeds = new_request(self.view, inputs, None)
        self._request(rid, feeds, fut)
        return fut.result()

    def submit(self, inputs: Mapping[str, np.ndarray], request_id: str | None = None,
               ) -> cf.Future[dict[str, np.ndarray]]:
        rid, fut, feeds = new_request(self.view, inputs, request_id)
        self._requests.submit(self._request, rid, feeds, fut)
        return fut

    def _request(self, rid: str, feeds: dict[str, np.ndarray], fut: cf.Future[Any]) -> None:
        record: dict[str, Any] = {"id": rid, "plan": MAIN, "attempts": 1, "timings": []}
        start = time.perf_counter()

        def run(unit: Unit, tensors: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
            t0 = time.perf_counter()
            with self._busy[unit.key]:  # behind another request in this unit, if any
                wall = time.time()  # "start": wall clock, as in the workers' timings
                t1 = time.perf_counter()
                out = self.runners[unit.key].run(tensors)
                t2 = time.perf_counter()
            record["timings"].append({"stage": unit.key, "device": unit.device,
                                      "queue": t1 - t0, "compute": t2 - t1, "start": wall})
            return out

        exited: list[str] = []
        try:
            outputs = run_graph(self.view.bundle, feeds, run, request_id=rid, exited=exited)
        except Exception as err:
            fut.set_exception(RequestError(
                f"request {rid}: {err.__class__.__name__}: {str(err).splitlines()[0]}"))
            return
        record["latency"] = time.perf_counter() - start
        record["exit"] = exited[0] if exited else None  # the exit head it left by
        self.records.append(record)
        fut.record = record  # type: ignore[attr-defined]  # as RemoteExecutor's futures
        fut.set_result(outputs)

    def close(self) -> None:
        self._requests.shutdown(wait=False)

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
