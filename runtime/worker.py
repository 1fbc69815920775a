"""A worker: serves one device's units (whole stages and parts) of the stage graph.

Request flow (push style: the executor never relays intermediate tensors):

1. A frame ``{"type": "infer", "unit": "3.1", "plan": K, "id": R, "attempt": A,
   "from": SENDER, "rows": {tensor: [first, last] | null}, "route": {device: "host:port"},
   "reply": "host:port", "budget": seconds, ...}`` arrives with the tensors that
   ``SENDER`` (a unit key, or ``"input"`` for the executor) sends to unit ``3.1``.
2. It is authenticated (constant-time token check) and checked against the send the
   manifest declares from that sender to that unit (names, rows, dtype, shape, bytes),
   then stored in the *inbox* of ``(K, R, A, unit)`` until every sender the unit waits
   for (:func:`stagebundle.graph.expected_senders`) has sent; the row pieces are then
   assembled (:class:`stagebundle.graph.Inbox`).
3. The complete request is run: one thread per unit, so several requests are in flight in
   different units at once (pipelining); an idle unit runs in the receiving connection's
   thread. Then each message the manifest's ``sends`` name (:func:`stagebundle.graph.
   outgoing`) goes to the receiver's host, looked up in the route that travels with the
   request (workers need no static configuration of each other), or is handed over
   in-process when the receiving unit is served here; messages for ``"output"`` go to
   ``reply`` (the executor). A skip tensor thus goes straight to the units that read it.
   (The sending side is :mod:`runtime.sending`, the base class of :class:`Worker`.)

Memory is bounded: at most ``max_inboxes`` inboxes wait for senders, an inbox whose
deadline passed is dropped, and each unit's queue holds ``queue_depth`` requests; a full
queue holds the sender back (back-pressure) for up to a second, then refuses with a
typed ``busy`` error. Failures are reported to ``reply`` as ``error`` frames naming the
request id, stage (unit) and device (``code`` ``unreachable`` names the device that could
not be reached, so the executor can re-plan without it). Nothing is ever loaded from a
request: the units are the verified ONNX files of the bundle directory given at start-up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.metrics import WorkerMetrics
from runtime.pool import ConnectionPool
from runtime.protocol import Frame
from runtime.security import check_bind, token_matches
from runtime.sending import Job, Sending, UnitKey
from runtime.server import FrameServer, bind_listener
from runtime.stages import (
    BundleView,
    StageRunner,
    check_message,
    open_bundles,
    piece_rows,
)
from runtime.tls import TLSConfig
from runtime.transport import format_address, parse_address
from runtime.waiting import Busy, WaitingRoom
from stagebundle.errors import UserError, fail
from stagebundle.graph import Message

__all__ = ["Worker", "Job", "Busy"]

log = logging.getLogger("runtime.worker")


class Worker(Sending):
    """Serve the units of ``device`` from the bundle at ``bundle_dir``.

    ``inline`` (class attribute): run an idle unit in the receiving connection's thread.

    Args:
        bundle_dir: the compiled bundle (plus any ``fallback/*`` bundles in it), or None
            for a worker that builds its units from the model (``builder``).
        device: the device name this worker plays.
        listen: ``(host, port)``; port 0 lets the OS choose (see :attr:`address`).
        token: shared secret, or ``None`` (then only loopback is allowed).
        threads: ONNX Runtime intra-op threads per unit (``None``: ORT's default).
        spin: let idle ONNX Runtime threads spin-wait (off: they would take the CPU of
            this worker's other units and of other processes on the host).
        grpc_port: also serve the Open Inference Protocol (v2) over gRPC on this port
            (0: any free port), or ``None`` for none.
        tls: mutual TLS on every connection (see :mod:`runtime.tls`), or ``None``.
        queue_depth: requests queued per unit before senders are held back.
        max_inboxes: requests waiting for more senders at once; more are refused busy.
        max_inbox_bytes: tensor bytes those may hold together; more are refused busy.
        builder: a :class:`runtime.build.ModelBuilder` (``runtime serve --model``): the
            worker starts with no units and builds those of the plans the executor
            ``ensure``-s from its own copy of the model.
        slowdown: test/benchmark aid only: every unit run takes this many times its
            compute time (the worker sleeps the difference), so a slow-but-alive host can
            be simulated; the executor may change it with an authenticated ``debug``
            frame, which is refused when this is ``None`` (the default).
    """

    inline = True

    def __init__(self, bundle_dir: str | Path | None, device: str, *,
                 listen: tuple[str, int] = ("127.0.0.1", 0), token: str | None = None,
                 threads: int | None = None, grpc_port: int | None = None,
                 send_timeout: float = 10.0, tls: TLSConfig | None = None,
                 spin: bool = False, queue_depth: int = 64, max_inboxes: int = 1024,
                 max_inbox_bytes: int = 256 << 20, builder: Any = None,
                 slowdown: float | None = None) -> None:
        check_bind(listen[0], token)
        if queue_depth < 1 or max_inboxes < 1:
            fail("queue depth and inbox cap must be at least 1")
        self.device = device
        self.token = token
        self.bundle_dir = None if bundle_dir is None else Path(bundle_dir)
        self.builder = builder
        self.build_lock = threading.Lock()
        self.threads = threads
        self.spin = spin
        self.queue_depth = queue_depth
        self.views: dict[str, BundleView] = {}
        self.runners: dict[UnitKey, StageRunner] = {}
        self.queues: dict[UnitKey, queue.Queue[Job]] = {}
        self.locks: dict[UnitKey, threading.Lock] = {}
        self._threads: list[threading.Thread] = []
        self.waiting = WaitingRoom(device, max_inboxes, max_inbox_bytes)
        self._stop = threading.Event()
        self._reload_lock = threading.Lock()
        self.stats = {"accepted": 0, "rejected": 0, "completed": 0, "failed": 0, "busy": 0,
                      "expired": 0, "exited": 0}
        self.received: dict[str, int] = {}  # tensor name -> bytes received over the network
        self.metrics = WorkerMetrics(device)  # per-unit times, per-link sends, CPU, memory
        if slowdown is not None and not 1.0 <= slowdown <= 1000.0:
            fail(f"--debug-slowdown {slowdown}: must be in [1, 1000]")
        self.slowdown = slowdown
        self._stats_lock = threading.Lock()
        self.tls = tls
        self.pool = ConnectionPool(timeout=send_timeout,
                                   tls=None if tls is None else tls.client_context())
        if self.bundle_dir is not None:
            self._add_views(open_bundles(self.bundle_dir), start=False)
        elif builder is None:
            fail("a worker needs a bundle directory or a model")
        if not self.runners and builder is None:
            known = sorted({d for v in self.views.values() for d in v.devices})
            fail(f"--device {device}: no stage of the bundle runs on it (devices: "
                 f"{', '.join(known)})")
        # the token is checked on the header, before any body is read (DoS bound);
        # liveness probes need none
        self.server = FrameServer(bind_listener(*listen), self._handle,
                                  max_body=self._max_body(), token=token,
                                  tls=None if tls is None else tls.server_context())
        self._reaper = threading.Thread(target=self._reap_loop, name="reaper", daemon=True)
        self.grpc = None
        if grpc_port is not None:
            from runtime.oip import start_oip_server

            check_bind(listen[0], token, "--grpc-port")
            self.grpc = start_oip_server(self, listen[0], grpc_port)
        self.ready = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    @property
    def grpc_address(self) -> tuple[str, int] | None:
        return None if self.grpc is None else self.grpc.address

    def start(self) -> Worker:
        for t in self._threads:
            t.start()
        self._reaper.start()
        self.server.start()
        self.ready = True
        log.info("device %s serving %d unit(s) on %s", self.device, len(self.runners),
                 format_address(self.address))
        return self

    def close(self) -> None:
        self.ready = False
        self._stop.set()
        self.server.close()
        if self.grpc is not None:
            self.grpc.stop()
        self.pool.close()
        if self.builder is not None:
            self.builder.close()

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def _max_body(self) -> int:
        return max((self.views[p].incoming_bytes(u) for p, u in self.runners),
                   default=0) + 4096

    def _add_views(self, views: Mapping[str, BundleView], start: bool) -> list[str]:
        added = []
        for key, view in views.items():
            if key in self.views:
                continue
            for unit in view.units():
                if unit.device != self.device:
                    continue
                self._serve_unit((key, unit.key), StageRunner(
                    unit, view.root, threads=self.threads, spin=self.spin), start)
            self.views[key] = view
            added.append(key)
        return added

    def _serve_unit(self, key: UnitKey, runner: StageRunner, start: bool) -> None:
        """Serve ``runner``'s unit under ``key``: its queue, lock and thread."""
        self.runners[key] = runner
        self.queues[key] = queue.Queue(self.queue_depth)
        self.locks[key] = threading.Lock()
        t = threading.Thread(target=self._unit_loop, args=(key,), name=f"unit-{key[1]}",
                             daemon=True)
        self._threads.append(t)
        if start:
            t.start()

    def reload(self) -> list[str]:
        """Rescan the bundle directory for new fallback bundles and serve their units.

        Only the directory given at start-up is read (never a path from a request), and
        every file is checked against its manifest's SHA-256 by the loader.
        """
        if self.bundle_dir is None:
            fail("this worker builds its stages from --model; it has no bundle directory")
        with self._reload_lock:
            added = self._add_views(open_bundles(self.bundle_dir), start=True)
            self.server.max_body = max(self.server.max_body, self._max_body())
            return added

    def add_plan(self, key: str, view: BundleView) -> None:
        """Serve the units of ``view`` (a plan built by ``runtime.build``) under ``key``.

        Every unit's ONNX Runtime session is opened before any is served, so a unit that
        fails to load leaves the worker exactly as it was.
        """
        with self._reload_lock:
            if key in self.views:
                return
            staged = {(key, u.key): StageRunner(u, view.root, threads=self.threads,
                                                spin=self.spin)
                      for u in view.units() if u.device == self.device}
            for k, runner in staged.items():
                self._serve_unit(k, runner, start=True)
            self.views[key] = view
            self.server.max_body = max(self.server.max_body, self._max_body())

    def metrics_snapshot(self) -> dict[str, Any]:
        with self._stats_lock:
            stats = dict(self.stats)
        return self.metrics.snapshot(stats)

    def _debug(self, h: Mapping[str, Any]) -> dict[str, Any]:
        """Change the simulated slowdown (only a worker started with one accepts it)."""
        value = h.get("slowdown")
        if self.slowdown is None:
            return {"type": "error", "code": "bad_request",
                    "message": "debug frames need a worker started with --debug-slowdown"}
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not 1.0 <= value <= 1000.0):
            return {"type": "error", "code": "bad_request",
                    "message": "slowdown must be a number in [1, 1000]"}
        self.slowdown = float(value)
        log.warning("device %s: simulated slowdown x%g (debug)", self.device, value)
        return {"type": "debug", "slowdown": self.slowdown}

    # ------------------------------------------------------------------ requests
    def stage_list(self) -> list[dict[str, Any]]:
        return [{"plan": k, "stage": s, "inputs": [t.to_json() for t in r.unit.inputs],
                 "outputs": [t.to_json() for t in r.unit.outputs]}
                for (k, s), r in list(self.runners.items())]

    def _handle(self, frame: Frame, peer: str) -> Any:
        h = frame.header
        kind = h.get("type")
        if kind == "health":  # liveness needs no token and says nothing sensitive
            reply = {"type": "health", "live": True, "ready": self.ready,
                     "device": self.device}
            if h.get("token") is not None and token_matches(self.token, h.get("token")):
                reply["metrics"] = self.metrics_snapshot()  # figures only for the executor
            return reply
        if not token_matches(self.token, h.get("token")):
            self._count("rejected")
            log.warning("rejected a %r frame from %s: missing or wrong token", kind, peer)
            return {"type": "error", "code": "unauthorized", "id": _id(h),
                    "message": "missing or wrong token", "close": True}
        if kind == "ready":
            with self._stats_lock:
                stats, received = dict(self.stats), dict(self.received)
            # frames refused by the server before the body (wrong token) count as rejected
            stats["rejected"] += self.server.stats["refused_token"]
            waiting, held = self.waiting.usage()
            return {"type": "ready", "ready": self.ready, "device": self.device,
                    "stages": self.stage_list(), "stats": stats, "received": received,
                    "model_sha256": None if self.builder is None else self.builder.sha256,
                    "waiting": waiting, "waiting_bytes": held,
                    "queued": {f"{p}:{u}": q.qsize() for (p, u), q in self.queues.items()}}
        if kind == "metrics":
            return {"type": "metrics", **self.metrics_snapshot()}
        if kind == "debug":
            return self._debug(h)
        if kind == "reload":
            try:
                added = self.reload()
            except UserError as err:
                return {"type": "error", "code": "bad_bundle", "message": str(err)}
            return {"type": "reloaded", "plans": added}
        if kind == "ensure":  # build or find a plan's units (runtime.build)
            from runtime.build import handle_ensure

            return handle_ensure(self, h)
        if kind != "infer":
            self._count("rejected")
            return {"type": "error", "code": "bad_request", "id": _id(h),
                    "message": f"unknown request type {kind!r}"}
        ack = {"type": "accepted", "id": _id(h)} if h.get("ack") else None
        try:
            job = self._admit(h, frame.tensors)
        except UserError as err:
            return self._refuse(h, peer, "bad_request", str(err))
        except Busy as err:
            return self._refuse(h, peer, "busy", str(err))
        self._count("accepted")
        if job is None:  # waiting for more senders
            return ack
        key = (job.header["plan"], job.header["unit"])
        if self.inline and self.queues[key].empty() and self.locks[key].acquire(blocking=False):
            # the unit is idle: run it in this connection's thread once the ack is out,
            # saving a thread hand-off per hop; busy units queue (pipelining)
            return ack, lambda: self._run_locked(key, job)
        try:
            self._enqueue(key, job)
        except Busy as err:
            return self._refuse(h, peer, "busy", str(err))
        return ack

    def _refuse(self, h: Mapping[str, Any], peer: str, code: str, message: str
                ) -> dict[str, Any]:
        self._count("busy" if code == "busy" else "rejected")
        msg = {"type": "error", "code": code, "id": _id(h), "attempt": h.get("attempt"),
               "stage": h.get("unit", h.get("stage")), "device": self.device,
               "message": message}
        failed = self._report(h, msg)  # one log line per refused frame, with this
        log.warning("refused request %s from %s: %s%s", _id(h), peer, message,
                    "" if failed is None else f" ({failed})")
        return msg

    def _enqueue(self, key: UnitKey, job: Job) -> None:
        """Queue ``job``; a full queue holds the caller back up to a second (back-pressure:
        the sender's connection stalls), then the request is refused busy."""
        wait = max(0.0, min(1.0, job.deadline - time.monotonic()))
        try:
            if wait:
                self.queues[key].put(job, timeout=wait)
            else:
                self.queues[key].put_nowait(job)
        except queue.Full:
            raise Busy(f"request {job.header['id']}: stage {key[1]} on {self.device} has "
                       f"{self.queue_depth} requests queued") from None

    def _admit(self, h: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
               checked: bool = False) -> Job | None:
        """Check one message and file it in its inbox; the Job once the inbox is complete.

        Never lets ORT see an unchecked tensor. ``checked``: the route, reply and budget
        were checked by this worker already (a message handed over in-process).
        """
        where = f"request {_id(h)}"
        rid, attempt = h.get("id"), h.get("attempt", 0)
        if not isinstance(rid, str) or not rid or len(rid) > 200 or not rid.isprintable():
            fail(f"{where}: missing or bad request id")
        if not isinstance(attempt, int) or isinstance(attempt, bool):
            fail(f"{where}: attempt must be an integer")
        plan, unit_key = str(h.get("plan", "main")), str(h.get("unit", h.get("stage")))
        key = (plan, unit_key)
        if key not in self.runners:
            fail(f"{where}: stage {unit_key!r} of plan {plan!r} does not run on device "
                 f"{self.device}")
        route, reply, budget = h.get("route"), h.get("reply"), h.get("budget")
        if not checked:
            if not isinstance(route, dict) or not all(isinstance(v, str)
                                                      for v in route.values()):
                fail(f"{where}: missing or bad route")
            if not isinstance(reply, str):
                fail(f"{where}: missing reply address")
            try:
                parse_address(reply)
            except ValueError as err:
                fail(f"{where}: {err}")
            if (not isinstance(budget, (int, float)) or isinstance(budget, bool)
                    or not 0 < budget <= 3600):
                fail(f"{where}: deadline budget must be in (0, 3600] s")
        view = self.views[plan]
        senders = view.senders.get(unit_key, ())
        sender = h.get("from")
        if not isinstance(sender, str) or sender not in senders:
            fail(f"{where}: {sender!r} is not a sender of stage {unit_key} (expected "
                 f"{', '.join(senders)})")
        rows = piece_rows(h, tensors, where)
        check_message(view, sender, unit_key, tensors, rows,
                      f"{where} (stage {unit_key}, device {self.device})")
        if not checked:
            with self._stats_lock:
                for name, arr in tensors.items():
                    self.received[name] = self.received.get(name, 0) + arr.nbytes
        message: Message = {n: (rows[n], a) for n, a in tensors.items()}
        now = time.monotonic()
        deadline = now + float(budget)  # type: ignore[arg-type]
        box = self.waiting.file((plan, rid, attempt, unit_key), senders, sender, message,
                                dict(h), deadline, now, where)
        if box is None:
            return None
        what = f"{where} (stage {unit_key}, device {self.device})"
        assembled = box.inbox.tensors(view.unit_map[unit_key].receives, what)
        first = box.header
        header = {"id": rid, "attempt": attempt, "plan": plan, "unit": unit_key,
                  "route": first.get("route"), "reply": first.get("reply"),
                  "timings": box.timings, "timed": first.get("timed") is True}
        return Job(header, assembled, box.deadline, box.opened, now)

    def _reap_loop(self) -> None:
        """Drop the inboxes whose deadline passed (their other senders never came)."""
        while not self._stop.wait(0.5):
            for (_, rid, attempt, unit), box in self.waiting.expired(time.monotonic()):
                self._count("expired")
                missing = [s for s in box.inbox.senders if s not in box.inbox.received]
                self._notify(box.header, {
                    "type": "error", "code": "deadline", "id": rid, "attempt": attempt,
                    "stage": unit, "device": self.device,
                    "message": f"request {rid}: deadline passed at stage {unit} on "
                               f"{self.device} waiting for {', '.join(missing)}"})

    # ------------------------------------------------------------------ units
    def _unit_loop(self, key: UnitKey) -> None:
        q, lock = self.queues[key], self.locks[key]
        while not self._stop.is_set():
            try:
                job = q.get(timeout=0.5)
            except queue.Empty:
                continue
            lock.acquire()
            self._run_locked(key, job)

    def _run_locked(self, key: UnitKey, job: Job) -> None:
        """Run ``job`` (the unit's lock is held: one request per unit at a time)."""
        try:
            self._process(key, self.runners[key], job)
        except Exception as err:  # report, never let a unit thread die
            log.exception("stage %s failed", key[1])
            self._fail(job, "stage_failed", f"request {job.header['id']}: stage {key[1]} on "
                       f"{self.device}: {err.__class__.__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else ''}")
        finally:
            self.locks[key].release()

    def _process(self, key: UnitKey, runner: StageRunner, job: Job) -> None:
        h = job.header
        start = time.monotonic()
        if start > job.deadline:
            self._fail(job, "deadline", f"request {h['id']}: deadline passed before stage "
                       f"{key[1]} on {self.device}")
            return
        produced = runner.run(job.tensors)
        done = time.monotonic()
        if self.slowdown is not None and self.slowdown > 1.0:  # test/benchmark aid
            time.sleep((self.slowdown - 1.0) * (done - start))
            done = time.monotonic()
        try:
            self._forward(key, runner.unit, job, produced, start, done)
        finally:  # off the critical path: once the messages are out
            self.metrics.record_unit(key[0], key[1], done - start, start - job.ready,
                                     job.ready - job.received)


def _id(h: Mapping[str, Any]) -> str:
    rid = h.get("id")  # (printable: it goes into log lines and error messages)
    return rid if isinstance(rid, str) and len(rid) <= 200 and rid.isprintable() else "?"
