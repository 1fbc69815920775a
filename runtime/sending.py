"""The sending side of a worker: what a unit produced goes on, and failures are reported.

After a unit ran, each message its ``sends`` name (:func:`stagebundle.graph.outgoing`)
goes to the receiving unit's host, looked up in the route that travels with the request,
or is handed over in-process when that unit is served by the same worker; messages for
``"output"`` go to the request's reply address (the executor), and so do the typed
``error`` frames of a request that failed. :class:`Sending` is the base of
:class:`runtime.worker.Worker`, which provides the attributes declared on it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.metrics import WorkerMetrics
from runtime.pool import ConnectionPool
from runtime.protocol import ProtocolError
from runtime.stages import MAX_TIMINGS, BundleView, StageRunner
from runtime.transport import format_address, parse_address
from runtime.waiting import Busy
from stagebundle.errors import UserError
from stagebundle.exits import exit_after
from stagebundle.graph import Message, exit_messages, held_after, outgoing
from stagebundle.manifest import OUTPUT, Unit

__all__ = ["Job", "Sending", "UnitKey"]

log = logging.getLogger("runtime.worker")

UnitKey = tuple[str, str]  # (plan key, unit key)


@dataclass
class Job:
    """A request whose inbox is complete, queued for one unit."""

    header: dict[str, Any]
    tensors: dict[str, np.ndarray]
    deadline: float  # time.monotonic() by which the request must be done
    received: float = field(default_factory=time.monotonic)  # its first message arrived
    ready: float = field(default_factory=time.monotonic)  # its last message arrived


class Sending:
    """Sends, hand-overs and reports of a worker (see the module docstring)."""

    device: str
    token: str | None
    pool: ConnectionPool
    metrics: WorkerMetrics
    views: dict[str, BundleView]
    runners: dict[UnitKey, StageRunner]

    def _count(self, key: str, n: int = 1) -> None:
        raise NotImplementedError

    def _admit(self, h: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
               checked: bool = False) -> Job | None:
        raise NotImplementedError

    def _enqueue(self, key: UnitKey, job: Job) -> None:
        raise NotImplementedError

    def _notify(self, h: Mapping[str, Any], msg: dict[str, Any]) -> None:
        """Send a message to the request's reply address (best effort)."""
        failed = self._report(h, msg)
        if failed is not None:
            log.warning("%s", failed)

    def _report(self, h: Mapping[str, Any], msg: dict[str, Any]) -> str | None:
        """Send a message to the request's reply address; why it could not be (one line,
        the address quoted: it comes from the request), else None."""
        reply = h.get("reply")
        if not isinstance(reply, str):
            return None
        try:
            addr = parse_address(reply)
            self.pool.send(addr, {**msg, "token": self.token}, timeout=2.0)
        except (OSError, ValueError) as err:
            return f"cannot report to {reply[:200]!r}: {err}"
        return None

    def _fail(self, job: Job, code: str, message: str, **extra: Any) -> None:
        self._count("failed")
        h = job.header
        self._notify(h, {"type": "error", "code": code, "id": h["id"],
                         "attempt": h.get("attempt"), "stage": h.get("unit"),
                         "device": self.device, "message": message, **extra})

    def _forward(self, key: UnitKey, unit: Unit, job: Job, produced: dict[str, np.ndarray],
                 start: float, done: float) -> None:
        """Send what ``unit`` produced for ``job`` to the units (or destination) next."""
        h = job.header
        timings = list(h["timings"])[:MAX_TIMINGS - 1]
        # "start" is wall-clock (for traces across hosts with synchronised clocks);
        # "wait": for the other senders, "queue": behind earlier requests
        timings.append({"stage": key[1], "device": self.device,
                        "wait": job.ready - job.received, "queue": start - job.ready,
                        "compute": done - start, "start": time.time() - (done - start)})
        if job.deadline - done <= 0:
            self._fail(job, "deadline", f"request {h['id']}: deadline passed during stage "
                       f"{key[1]} on {self.device}")
            return
        what = f"request {h['id']}: stage {unit.key} on {self.device}"
        messages = outgoing(unit, held_after(unit, job.tensors, produced), what)
        # an early-exit head whose rule holds: only the head's output goes out, to the
        # destination, naming the exit; the later units never see this request
        taken = exit_after(unit, produced, h["id"])
        if taken is not None:
            messages = exit_messages(messages)
            self._count("exited")
        for to, message in messages:
            if not self._send(key[0], job, to, message, timings, taken):
                return
        self._count("completed")

    def _send(self, plan: str, job: Job, to: str, message: Message,
              timings: list[dict[str, Any]], exit_name: str | None = None) -> bool:
        """Send one message of ``job``'s unit to unit ``to`` (or the destination)."""
        h = job.header
        budget = job.deadline - time.monotonic()
        if budget <= 0:
            self._fail(job, "deadline", f"request {h['id']}: deadline passed sending from "
                       f"stage {h['unit']} on {self.device}")
            return False
        header: dict[str, Any] = {
            "id": h["id"], "attempt": h["attempt"], "plan": plan, "from": h["unit"],
            "rows": {n: None if r is None else list(r) for n, (r, _) in message.items()},
            "timings": timings, "token": self.token, "timed": h.get("timed", False)}
        arrays = {n: a for n, (_, a) in message.items()}
        if to == OUTPUT:
            header["type"] = "result"
            if exit_name is not None:
                header["exit"] = exit_name
            try:
                self._timed_send(self.views[plan].bundle.destination or "reply",
                                 parse_address(h["reply"]), header, arrays, budget)
            except OSError as err:
                log.warning("request %s: cannot return the result to %s: %s", h["id"],
                            h["reply"], err)
            return True
        header.update(type="infer", unit=to, route=h["route"], reply=h["reply"],
                      budget=budget)
        target = self.views[plan].unit_map[to]
        if target.device == self.device and (plan, to) in self.runners:
            return self._hand_over(job, header, arrays)  # no network hop
        host = h["route"].get(target.device)
        if host is None:
            self._fail(job, "no_route", f"request {h['id']}: the route names no host for "
                       f"device {target.device} (stage {to})", failed_device=target.device)
            return False
        try:
            addr = parse_address(host)
        except ValueError as err:
            self._fail(job, "no_route", f"request {h['id']}: {err}",
                       failed_device=target.device)
            return False
        try:
            self._timed_send(target.device, addr, header, arrays, min(budget, 10.0))
        except OSError as err:
            self.pool.drop(addr)
            self._fail(job, "unreachable", f"request {h['id']}: stage {h['unit']} on "
                       f"{self.device} cannot reach device {target.device} at {host}: "
                       f"{err.__class__.__name__}: {err}", failed_device=target.device)
            return False
        return True

    def _timed_send(self, peer: str, addr: tuple[str, int], header: dict[str, Any],
                    arrays: Mapping[str, np.ndarray], timeout: float) -> None:
        """Send and measure (:mod:`runtime.metrics`): for a request the executor marked
        ``timed`` (live adaptation: it answers results too), one transfer in
        ``LINK_SAMPLE`` per peer waits for the receiver's ``accepted``."""
        nbytes = sum(a.nbytes for a in arrays.values())
        t0 = time.monotonic()
        if not header.get("timed") or not self.metrics.sample(peer):
            self.pool.send(addr, header, arrays, timeout=timeout)
            self.metrics.record_send(peer, nbytes, time.monotonic() - t0)
            return
        try:
            reply = self.pool.request(addr, {**header, "ack": True}, arrays, timeout=timeout)
        except ProtocolError as err:
            raise OSError(f"bad answer from {format_address(addr)}: {err}") from None
        seconds = time.monotonic() - t0
        self.metrics.record_send(peer, nbytes, seconds)
        if reply.header.get("type") == "accepted":  # a refusal was reported by the peer
            self.metrics.record_transfer(peer, nbytes, seconds)

    def _hand_over(self, job: Job, header: dict[str, Any],
                   arrays: Mapping[str, np.ndarray]) -> bool:
        """Deliver a message to a unit served by this worker, without the network."""
        try:
            nxt = self._admit(header, arrays, checked=True)
            if nxt is not None:
                self._enqueue((header["plan"], header["unit"]), nxt)
        except Busy as err:
            self._count("busy")
            self._fail(job, "busy", str(err))
            return False
        except UserError as err:
            self._fail(job, "stage_failed", str(err))
            return False
        return True
