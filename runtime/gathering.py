"""The receiving side of the remote executor: results and error frames, filed by request.

Every frame that comes back to the executor's reply address is authenticated, matched to
the pending request and attempt it names, checked against the send the manifest declares
to ``"output"``, and gathered until the attempt's every output has come (or an exit head
answered alone); a retryable error schedules the next attempt. :class:`Gathering` is the
base of :class:`runtime.executor.RemoteExecutor`, which provides the attributes declared
on it; :class:`Pending` is one request in flight.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.local import RequestError
from runtime.protocol import Frame
from runtime.security import token_matches
from runtime.stages import BundleView, check_message, merge_timings, piece_rows
from stagebundle.errors import UserError, fail
from stagebundle.graph import Inbox, Message
from stagebundle.manifest import OUTPUT

__all__ = ["Gathering", "Pending", "RETRYABLE", "set_exception"]

log = logging.getLogger("runtime.executor")

RETRYABLE = frozenset({"unreachable", "no_route", "deadline"})


@dataclass
class Pending:
    """A request in flight: its attempts, what each has gathered, its future."""

    id: str
    inputs: dict[str, np.ndarray]
    future: cf.Future[dict[str, np.ndarray]]
    deadline: float
    start: float = field(default_factory=time.perf_counter)
    attempt: int = 0
    plan: str = "main"
    devices: frozenset[str] = frozenset()
    attempt_deadline: float = 0.0
    history: list[str] = field(default_factory=list)
    retrying: bool = False  # a retry is scheduled: no second one for the same attempt
    pinned: str | None = None  # only this plan (a switch's trial request), no fail-over
    sent: float | None = None  # wall clock: the latest attempt's sends began
    # per attempt: its plan, the inbox gathering its "output" messages, their timings
    gathering: dict[int, tuple[str, Inbox, list[dict[str, Any]]]] = field(
        default_factory=dict)


class Gathering:
    """Results and error frames filed by request (see the module docstring)."""

    token: str | None
    views: dict[str, BundleView]
    down: set[str]
    duplicates: int
    records: collections.deque[dict[str, Any]]
    observers: list[Callable[[dict[str, Any]], None]]
    _pending: dict[str, Pending]
    _lock: threading.RLock

    def _retry_async(self, p: Pending, reason: str) -> None:
        raise NotImplementedError

    def _finish_error(self, p: Pending, why: str) -> None:
        self._pending.pop(p.id, None)
        p.future.record = {  # type: ignore[attr-defined]
            "id": p.id, "plan": p.plan if p.attempt else None, "attempts": p.attempt,
            "latency": time.perf_counter() - p.start, "timings": [], "retries": p.history,
            "trial": p.pinned is not None, "error": why}
        set_exception(p.future, RequestError(f"request {p.id}: {why}"))

    # ------------------------------------------------------------------ messages
    def _on_message(self, frame: Frame, peer: str) -> dict[str, Any] | None:
        reply = self._handle_message(frame, peer)
        if reply is None and frame.header.get("ack") and frame.header.get("type") == "result":
            return {"type": "accepted", "id": frame.header.get("id")}  # a timed transfer
        return reply

    def _handle_message(self, frame: Frame, peer: str) -> dict[str, Any] | None:
        h = frame.header
        if h.get("type") == "health":
            return {"type": "health", "live": True}
        if not token_matches(self.token, h.get("token")):
            log.warning("dropped a frame from %s: missing or wrong token", peer)
            return {"type": "error", "code": "unauthorized", "close": True}
        rid = h.get("id")
        with self._lock:
            p = self._pending.get(rid) if isinstance(rid, str) else None
            if p is None:
                self.duplicates += h.get("type") == "result"
                return None
            if h.get("type") == "result":
                self._on_result(p, frame, peer)
                return None
            if h.get("type") != "error" or h.get("attempt") != p.attempt:
                return None  # a stale attempt's error: the newer attempt decides
            code, msg = h.get("code"), str(h.get("message", ""))[:500]
            failed = h.get("failed_device")
            if code not in RETRYABLE:
                self._finish_error(p, msg or str(code))
                return None
            if isinstance(failed, str):
                self.down.add(failed)
            if p.retrying:
                return None
            p.retrying = True
        self._retry_async(p, f"attempt {p.attempt}: {msg}")
        return None

    def _on_result(self, p: Pending, frame: Frame, peer: str) -> None:
        """File one "output" message of ``p`` (the lock is held)."""
        h = frame.header
        attempt = h.get("attempt")
        sender = h.get("from")
        if not isinstance(attempt, int) or attempt not in p.gathering:
            self.duplicates += 1
            return
        plan = p.gathering[attempt][0]
        where = f"result of request {p.id} from {peer}"
        try:
            if not isinstance(sender, str):
                fail(f"{where}: no sender ('from')")
            rows = piece_rows(h, frame.tensors, where)
            check_message(self.views[plan], sender, OUTPUT, frame.tensors, rows, where)
        except UserError as err:
            self._finish_error(p, f"bad result: {err}")
            return
        message = {n: (rows[n], a) for n, a in frame.tensors.items()}
        exit_name = h.get("exit")
        if exit_name is not None:
            unit = self.views[plan].unit_map.get(sender)
            rule = getattr(unit, "exit", None) or {}
            if exit_name != rule.get("output"):
                self._finish_error(p, f"bad result: {where} names exit {exit_name!r}, which "
                                   f"is not the head of stage {sender}")
                return
        self._gather(p, attempt, sender, message, h.get("timings"), where, exit_name)

    def _gather(self, p: Pending, attempt: int, sender: str, message: Message,
                timings: Any, where: str, exit_name: str | None = None) -> None:
        """Add a message for ``"output"``; the first attempt complete answers ``p``. A
        message that names an exit head completes the request with that output alone."""
        with self._lock:
            if p.id not in self._pending:
                self.duplicates += 1
                return
            plan, inbox, merged = p.gathering[attempt]
            try:
                if sender in inbox.received:  # a repeat: never answered twice
                    self.duplicates += 1
                    return
                inbox.add(sender, message)
                merge_timings(merged, timings)
                if exit_name is not None:
                    spec = [t for t in self.views[plan].outputs if t.name == exit_name]
                    outputs = Inbox((sender,), {sender: message}).tensors(spec, where)
                elif not inbox.complete:
                    return
                else:
                    outputs = inbox.tensors(self.views[plan].outputs, where)
            except UserError as err:
                self._finish_error(p, f"bad result: {err}")
                return
            self._pending.pop(p.id)
            # "sent" / "answered": wall clock, as the workers' timings, so a request's
            # time can be taken apart across processes (benchmarks/runtime_overhead.py)
            record = {"id": p.id, "plan": plan, "attempts": attempt,
                      "latency": time.perf_counter() - p.start,
                      "timings": merged, "retries": p.history, "exit": exit_name,
                      "trial": p.pinned is not None, "sent": p.sent,
                      "answered": time.time()}
            self.records.append(record)
            p.future.record = record  # type: ignore[attr-defined]
            for observe in self.observers:
                observe(record)
            p.future.set_result(outputs)


def set_exception(fut: cf.Future[Any], err: BaseException) -> None:
    """Fail ``fut`` unless it is answered already."""
    if not fut.done():
        fut.set_exception(err)
