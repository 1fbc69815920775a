"""A worker: serves one device's stages and pushes each result straight to the next host.

Request flow (push style, SPEC §6 "each device gets its layers and the next device"):

1. A frame ``{"type": "infer", "stage": S, "plan": K, "route": {device: "host:port"},
   "reply": "host:port", "budget": seconds, ...}`` arrives with the stage's tensors.
2. It is authenticated (constant-time token check), its tensors are checked against the
   manifest (name, dtype, shape, byte length), and it is queued for stage ``S``. Each
   stage has its own thread, so several requests are in flight in different stages at
   once (pipelining).
3. The stage thread runs ONNX Runtime and sends the carry set to the next stage's host,
   looked up in the route that travels with the request (workers need no static
   configuration of each other); the last stage sends the model outputs to ``reply``
   (the executor at the destination). The edge never relays every hop.

Failures are reported to ``reply`` as ``error`` frames naming the request id, stage and
device (``code`` ``unreachable`` names the host that could not be reached, so the
executor can re-plan without it). Nothing is ever loaded from a request: the stages are
the verified ONNX files of the bundle directory given at start-up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from partitioner.errors import UserError, fail
from runtime.protocol import Frame
from runtime.security import check_bind, token_matches
from runtime.server import FrameServer, bind_listener
from runtime.stages import BundleView, StageRunner, check_inputs, open_bundles
from runtime.tls import TLSConfig
from runtime.transport import ConnectionPool, format_address, parse_address

__all__ = ["Worker", "Job"]

log = logging.getLogger("runtime.worker")


@dataclass
class Job:
    """A request queued for one stage."""

    header: dict[str, Any]
    tensors: dict[str, np.ndarray]
    deadline: float  # time.monotonic() by which the request must be done
    received: float = field(default_factory=time.monotonic)


class Worker:
    """Serve the stages of ``device`` from the bundle at ``bundle_dir``.

    ``inline`` (class attribute): run an idle stage in the receiving connection's thread.

    Args:
        bundle_dir: the compiled bundle (plus any ``fallback/*`` bundles in it).
        device: the device name this worker plays.
        listen: ``(host, port)``; port 0 lets the OS choose (see :attr:`address`).
        token: shared secret, or ``None`` (then only loopback is allowed).
        threads: ONNX Runtime intra-op threads per stage (``None``: ORT's default).
        spin: let idle ONNX Runtime threads spin-wait (off: they would take the CPU of
            this worker's other stages and of other processes on the host).
        grpc_port: also serve the Open Inference Protocol (v2) over gRPC on this port
            (0: any free port), or ``None`` for none.
        tls: mutual TLS on every connection (see :mod:`runtime.tls`), or ``None``.
    """

    inline = True

    def __init__(self, bundle_dir: str | Path, device: str, *,
                 listen: tuple[str, int] = ("127.0.0.1", 0), token: str | None = None,
                 threads: int | None = None, grpc_port: int | None = None,
                 send_timeout: float = 10.0, tls: TLSConfig | None = None,
                 spin: bool = False) -> None:
        check_bind(listen[0], token)
        self.device = device
        self.token = token
        self.bundle_dir = Path(bundle_dir)
        self.threads = threads
        self.spin = spin
        self.views: dict[str, BundleView] = open_bundles(bundle_dir)
        self.runners: dict[tuple[str, str], StageRunner] = {}
        for key, view in self.views.items():
            for stage in view.stages:
                if stage.device == device:
                    self.runners[(key, stage.id)] = StageRunner(stage, threads=threads, spin=spin)
        if not self.runners:
            known = sorted({s.device for v in self.views.values() for s in v.stages})
            fail(f"--device {device}: no stage of the bundle runs on it (devices: "
                 f"{', '.join(known)})")
        self.max_body = max(self.views[k[0]].incoming_bytes(r.stage)
                            for k, r in self.runners.items()) + 4096
        self.tls = tls
        self.pool = ConnectionPool(timeout=send_timeout,
                                   tls=None if tls is None else tls.client_context())
        self.queues: dict[tuple[str, str], queue.Queue[Job | None]] = {
            k: queue.Queue() for k in self.runners}
        self.locks = {k: threading.Lock() for k in self.runners}
        self._reload_lock = threading.Lock()
        self.stats = {"accepted": 0, "rejected": 0, "completed": 0, "failed": 0}
        self._stats_lock = threading.Lock()
        self._threads = [threading.Thread(target=self._stage_loop, args=(k,),
                                          name=f"stage-{k[1]}", daemon=True)
                         for k in self.runners]
        self.server = FrameServer(bind_listener(*listen), self._handle,
                                  max_body=self.max_body,
                                  tls=None if tls is None else tls.server_context())
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
        self.server.start()
        self.ready = True
        log.info("device %s serving %d stage(s) on %s", self.device, len(self.runners),
                 format_address(self.address))
        return self

    def close(self) -> None:
        self.ready = False
        self.server.close()
        for q in self.queues.values():
            q.put(None)
        if self.grpc is not None:
            self.grpc.stop()
        self.pool.close()

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def reload(self) -> list[str]:
        """Rescan the bundle directory for new fallback bundles and serve their stages.

        Only the directory given at start-up is read (never a path from a request), and
        every file is checked against its manifest's SHA-256 by the loader.
        """
        with self._reload_lock:
            return self._reload()

    def _reload(self) -> list[str]:
        views = open_bundles(self.bundle_dir)
        added = []
        for key, view in views.items():
            if key in self.views:
                continue
            for stage in view.stages:
                if stage.device == self.device:
                    k = (key, stage.id)
                    self.runners[k] = StageRunner(stage, threads=self.threads, spin=self.spin)
                    self.queues[k] = queue.Queue()
                    self.locks[k] = threading.Lock()
                    self.server.max_body = max(self.server.max_body,
                                               view.incoming_bytes(stage) + 4096)
                    t = threading.Thread(target=self._stage_loop, args=(k,),
                                         name=f"stage-{stage.id}", daemon=True)
                    self._threads.append(t)
                    t.start()
            self.views[key] = view
            added.append(key)
        return added

    # ------------------------------------------------------------------ requests
    def stage_list(self) -> list[dict[str, Any]]:
        return [{"plan": k, "stage": s, "inputs": [t.to_json() for t in r.stage.inputs],
                 "outputs": [t.to_json() for t in r.stage.outputs]}
                for (k, s), r in list(self.runners.items())]

    def _handle(self, frame: Frame, peer: str) -> Any:
        h = frame.header
        kind = h.get("type")
        if kind == "health":  # liveness needs no token and says nothing sensitive
            return {"type": "health", "live": True, "ready": self.ready,
                    "device": self.device}
        if not token_matches(self.token, h.get("token")):
            self._count("rejected")
            log.warning("rejected a %r frame from %s: missing or wrong token", kind, peer)
            return {"type": "error", "code": "unauthorized", "id": _id(h),
                    "message": "missing or wrong token", "close": True}
        if kind == "ready":
            return {"type": "ready", "ready": self.ready, "device": self.device,
                    "stages": self.stage_list(), "stats": dict(self.stats)}
        if kind == "reload":
            try:
                added = self.reload()
            except UserError as err:
                return {"type": "error", "code": "bad_bundle", "message": str(err)}
            return {"type": "reloaded", "plans": added}
        if kind != "infer":
            self._count("rejected")
            return {"type": "error", "code": "bad_request", "id": _id(h),
                    "message": f"unknown request type {kind!r}"}
        try:
            job = self._admit(frame)
        except UserError as err:
            self._count("rejected")
            log.warning("rejected request %s from %s: %s", _id(h), peer, err)
            msg = {"type": "error", "code": "bad_request", "id": _id(h),
                   "attempt": h.get("attempt"), "stage": h.get("stage"),
                   "device": self.device, "message": str(err)}
            self._notify(h, msg)
            return msg
        self._count("accepted")
        key = (job.header["plan"], job.header["stage"])
        ack = {"type": "accepted", "id": _id(h)} if h.get("ack") else None
        if self.inline and self.queues[key].empty() and self.locks[key].acquire(blocking=False):
            # the stage is idle: run it in this connection's thread once the ack is out,
            # saving a thread hand-off per hop; busy stages queue (pipelining)
            return ack, lambda: self._run_locked(key, job)
        self.queues[key].put(job)
        return ack

    def _admit(self, frame: Frame) -> Job:
        """Check a request before it is queued (never lets ORT see an unchecked tensor)."""
        h = frame.header
        key, stage_id = str(h.get("plan", "main")), str(h.get("stage"))
        where = f"request {_id(h)}"
        if not isinstance(h.get("id"), str) or not h["id"] or len(h["id"]) > 200:
            fail(f"{where}: missing or bad request id")
        if (key, stage_id) not in self.runners:
            fail(f"{where}: stage {stage_id!r} of plan {key!r} does not run on device "
                 f"{self.device}")
        route, reply, budget = h.get("route"), h.get("reply"), h.get("budget")
        if not isinstance(route, dict) or not all(isinstance(v, str) for v in route.values()):
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
        view = self.views[key]
        check_inputs(view, self.runners[(key, stage_id)].stage, frame.tensors,
                     f"{where} (stage {stage_id}, device {self.device})")
        h["plan"], h["stage"] = key, stage_id
        return Job(h, frame.tensors, time.monotonic() + float(budget))

    def _notify(self, h: Mapping[str, Any], msg: dict[str, Any]) -> None:
        """Send a message to the request's reply address (best effort)."""
        reply = h.get("reply")
        if not isinstance(reply, str):
            return
        try:
            addr = parse_address(reply)
            self.pool.send(addr, {**msg, "token": self.token}, timeout=2.0)
        except (OSError, ValueError) as err:
            log.warning("cannot report to %s: %s", reply, err)

    # ------------------------------------------------------------------ stages
    def _stage_loop(self, key: tuple[str, str]) -> None:
        q, lock = self.queues[key], self.locks[key]
        while True:
            job = q.get()
            if job is None:
                return
            lock.acquire()
            self._run_locked(key, job)

    def _run_locked(self, key: tuple[str, str], job: Job) -> None:
        """Run ``job`` (the stage's lock is held: one request per stage at a time)."""
        try:
            self._process(key, self.runners[key], job)
        except Exception as err:  # report, never let a stage thread die
            log.exception("stage %s failed", key[1])
            self._fail(job, "stage_failed", f"stage {key[1]} on {self.device}: "
                       f"{err.__class__.__name__}: {str(err).splitlines()[0]}")
        finally:
            self.locks[key].release()

    def _fail(self, job: Job, code: str, message: str, **extra: Any) -> None:
        self._count("failed")
        h = job.header
        self._notify(h, {"type": "error", "code": code, "id": h["id"],
                         "attempt": h.get("attempt"), "stage": h.get("stage"),
                         "device": self.device, "message": message, **extra})

    def _process(self, key: tuple[str, str], runner: StageRunner, job: Job) -> None:
        h = job.header
        start = time.monotonic()
        if start > job.deadline:
            self._fail(job, "deadline", f"request {h['id']}: deadline passed before stage "
                       f"{key[1]} on {self.device}")
            return
        out = runner.advance(job.tensors)
        done = time.monotonic()
        timings = list(h.get("timings") or [])[:64]
        # "start" is wall-clock (for traces across hosts with synchronised clocks)
        timings.append({"stage": key[1], "device": self.device,
                        "queue": start - job.received, "compute": done - start,
                        "start": time.time() - (done - start)})
        view, stage = self.views[key[0]], runner.stage
        budget = job.deadline - done
        if budget <= 0:
            self._fail(job, "deadline", f"request {h['id']}: deadline passed during stage "
                       f"{key[1]} on {self.device}")
            return
        if stage.next is None:
            self._count("completed")
            msg = {"type": "result", "id": h["id"], "attempt": h.get("attempt"),
                   "plan": key[0], "timings": timings, "token": self.token}
            try:
                self.pool.send(parse_address(h["reply"]), msg, out, timeout=budget)
            except OSError as err:
                log.warning("request %s: cannot return the result to %s: %s", h["id"],
                            h["reply"], err)
            return
        nxt = view.stage(stage.next)
        fwd = {k: v for k, v in h.items() if k in ("id", "attempt", "route", "reply", "ack")}
        fwd.update(type="infer", plan=key[0], stage=nxt.id, budget=budget, timings=timings,
                   token=self.token)
        fwd.pop("ack", None)
        if nxt.device == self.device and (key[0], nxt.id) in self.runners:
            # a later stage on this same device: no network hop
            self.queues[(key[0], nxt.id)].put(Job(fwd, out, job.deadline))
            self._count("completed")
            return
        target = h["route"].get(nxt.device)
        if target is None:
            self._fail(job, "no_route", f"request {h['id']}: the route names no host for "
                       f"device {nxt.device} (stage {nxt.id})", failed_device=nxt.device)
            return
        try:
            addr = parse_address(target)
        except ValueError as err:
            self._fail(job, "no_route", f"request {h['id']}: {err}", failed_device=nxt.device)
            return
        try:
            self.pool.send(addr, fwd, out, timeout=min(budget, 10.0))
        except OSError as err:
            self.pool.drop(addr)
            self._fail(job, "unreachable", f"request {h['id']}: stage {stage.id} on "
                       f"{self.device} cannot reach device {nxt.device} at {target}: "
                       f"{err.__class__.__name__}: {err}", failed_device=nxt.device)
            return
        self._count("completed")


def _id(h: Mapping[str, Any]) -> str:
    rid = h.get("id")
    return rid if isinstance(rid, str) and len(rid) <= 200 else "?"
