"""Executors: run a bundle in this process, or drive workers on other hosts.

:class:`LocalExecutor` (:mod:`runtime.local`, re-exported here) runs the stage graph with
ONNX Runtime in one process (``runtime run --local``), by the very rules the workers follow.
:class:`RemoteExecutor` sends the bundle's ``input_sends`` (rows cut with
:func:`stagebundle.graph.take_rows`) to the host of each receiving unit, with the route
(device -> host:port) and a reply address, and gathers every message the units send to
``"output"`` in an :class:`~stagebundle.graph.Inbox` (the row pieces of a split last
stage are assembled there; the receiving side is :mod:`runtime.gathering`, the base class
of :class:`RemoteExecutor`); it never relays intermediate tensors.

Reliability (issue 5): every request has an id and a deadline. The executor probes the
hosts of the requests in flight (liveness frames) every ``probe_interval`` seconds; when a
host is unreachable, reported unreachable by a peer, or an attempt times out, that device
is marked down and every request whose attempt routes through it is re-sent, with the same
id and the next attempt number, on a plan without the device: a fallback bundle shipped
in ``BUNDLE/fallback/`` (see :mod:`runtime.replan`) or, when a ``replanner`` is given, one
it compiles on the spot. The first attempt whose outputs are all in completes the request;
later messages (a slow earlier attempt) are dropped, so a request is never answered twice,
and a request that runs out of attempts or time fails with an error that names its id. A
device that answers probes again (a restarted worker) is used again.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import itertools
import logging
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.gathering import Gathering, Pending, set_exception
from runtime.local import (
    LocalExecutor,
    RequestError,
    check_model_inputs,
    new_request,
    views_of,
)
from runtime.metrics import WorkerMetrics
from runtime.pool import ConnectionPool
from runtime.protocol import ProtocolError
from runtime.security import check_bind
from runtime.server import FrameServer, bind_listener
from runtime.stages import (
    BundleView,
    open_bundle,
)
from runtime.tls import TLSConfig
from runtime.transport import (
    connect,
    format_address,
    parse_address,
    recv_frame,
    send_frame,
)
from stagebundle.errors import UserError, fail
from stagebundle.graph import Inbox, outgoing
from stagebundle.manifest import INPUT, OUTPUT

__all__ = ["RequestError", "LocalExecutor", "RemoteExecutor", "check_model_inputs", "probe",
           "probe_status"]

log = logging.getLogger("runtime.executor")

def probe_status(addr: tuple[str, int], timeout: float = 1.0,
                 tls: ssl.SSLContext | None = None) -> str:
    """``"ok"``, ``"refused"`` (nothing listens: down for sure) or ``"slow"`` (no answer
    within ``timeout`` s: stalled, overloaded or unreachable)."""
    try:
        with connect(addr, timeout, tls) as sock:
            send_frame(sock, {"type": "health"})
            frame = recv_frame(sock, max_body=0, frame_timeout=timeout)
        return "ok" if frame.header.get("live") else "slow"
    except ConnectionRefusedError:
        return "refused"
    except Exception:
        return "slow"


def probe(addr: tuple[str, int], timeout: float = 1.0,
          tls: ssl.SSLContext | None = None) -> bool:
    """Whether a worker answers a liveness frame at ``addr`` within ``timeout`` s."""
    return probe_status(addr, timeout, tls) == "ok"


class RemoteExecutor(Gathering):
    """Drive workers: ``infer`` / ``submit`` as with :class:`LocalExecutor`.

    Args:
        bundle: the bundle directory (or loaded views) the workers serve.
        hosts: device name -> ``"host:port"`` of its worker.
        token: the shared token, if the workers have one.
        timeout: overall deadline of a request, seconds.
        attempt_timeout: a single attempt is given up after this many seconds
            (default: ``timeout / (max_attempts + 1)``).
        max_attempts: attempts per request (the first plus re-plans/retries).
        listen: where results come back (``"127.0.0.1:0"``: any free loopback port).
        replanner: called with the set of devices that are down; returns the key of a
            newly compiled (and loaded) plan without them, or ``None``.
        probe_interval: seconds between liveness probes of the hosts in use.
        probe_timeout: a probe not answered in this many seconds is a strike.
        probe_strikes: consecutive strikes that mark a device down (a refused connection
            marks it down at once).
        tls: mutual TLS for every connection (see :mod:`runtime.tls`), or ``None``.
    """

    def __init__(self, bundle: str | Path | BundleView | Mapping[str, BundleView],
                 hosts: Mapping[str, str], *, token: str | None = None,
                 timeout: float = 30.0, attempt_timeout: float | None = None,
                 max_attempts: int = 3, listen: str = "127.0.0.1:0",
                 replanner: Callable[[frozenset[str]], str | None] | None = None,
                 probe_interval: float = 0.25, probe_timeout: float = 1.0,
                 probe_strikes: int = 2, tls: TLSConfig | None = None) -> None:
        self.views = views_of(bundle)
        self.view = self.views["main"]
        self.hosts: dict[str, tuple[str, int]] = {}
        for dev, text in hosts.items():
            try:
                self.hosts[dev] = parse_address(text, what=f"host of {dev}")
            except ValueError as err:
                fail(str(err))
        missing = [d for d in self.view.devices if d not in self.hosts]
        if missing:
            fail(f"--hosts: no address for device {missing[0]} (the plan uses "
                 f"{', '.join(self.view.devices)})")
        self.token = token
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.attempt_timeout = attempt_timeout or timeout / (max_attempts + 1)
        self.replanner = replanner
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.probe_strikes = probe_strikes
        self._strikes: dict[str, int] = {}
        self._probes = cf.ThreadPoolExecutor(4, thread_name_prefix="probe")
        self.down: set[str] = set()
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=1000)
        self.duplicates = 0
        self._pending: dict[str, Pending] = {}
        self._id_prefix, self._ids = secrets.token_hex(8), itertools.count(1)
        self._lock = threading.RLock()
        # live adaptation (runtime.adapt): the plan new requests start on, the number of
        # requests submitted so far (a switch's request boundary), callbacks that see
        # every completed request's record, the latest inputs (a switch's trial request)
        self.current = "main"
        self.submitted = 0
        self.observers: list[Callable[[dict[str, Any]], None]] = []
        self.last_inputs: dict[str, np.ndarray] | None = None
        # the input sends, each timed until its "accepted": the source's links; with
        # time_links, requests ask the workers to time some of their sends too (the
        # executor then answers those results with "accepted")
        self.links = WorkerMetrics("executor")
        self.time_links = False
        self.tls = None if tls is None else tls.client_context()
        self._pool = ConnectionPool(timeout=5.0, tls=self.tls)
        try:
            host, port = parse_address(listen, what="--listen")
        except ValueError as err:
            fail(str(err))
        check_bind(host, token)
        if host in ("0.0.0.0", "::"):
            fail(f"--listen {listen}: give the address the last worker can reach, not a "
                 f"wildcard")
        max_body = max(v.incoming_bytes(OUTPUT) for v in self.views.values()) + 4096
        self._server = FrameServer(bind_listener(host, port), self._on_message,
                                   max_body=max_body, token=token, open_types=(),
                                   tls=None if tls is None else tls.server_context()).start()
        self.reply = format_address(self._server.address)
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._monitor_loop, name="monitor",
                                         daemon=True)
        self._monitor.start()

    # ------------------------------------------------------------------ public
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one request; raises :class:`RequestError` naming the id when it fails."""
        fut = self.submit(inputs)
        try:
            return fut.result(timeout=self.timeout + 5.0)
        except cf.TimeoutError:  # backstop only: the monitor fails requests on time
            raise RequestError(f"request {fut.request_id}: no answer in "  # type: ignore
                               f"{self.timeout} s") from None

    def submit(self, inputs: Mapping[str, np.ndarray], request_id: str | None = None,
               *, plan: str | None = None) -> cf.Future[dict[str, np.ndarray]]:
        """Start a request; the future's ``request_id`` attribute is its id, and once it
        is answered its ``record`` attribute holds the request's record (plan, attempts,
        latency, timings). ``plan``: run on that plan only, without fail-over (the trial
        request of a plan switch); it is not counted in :attr:`submitted`."""
        # a random prefix per executor and a counter: unique among the executors a
        # worker serves, without an os.urandom call per request
        rid, fut, feeds = new_request(self.view, inputs,
                                      request_id or f"{self._id_prefix}-{next(self._ids)}")
        p = Pending(rid, feeds, fut, deadline=time.monotonic() + self.timeout, pinned=plan)
        with self._lock:
            if rid in self._pending:
                fail(f"request {rid}: id already in flight")
            if plan is not None and plan not in self.views:
                fail(f"request {rid}: no plan {plan!r}")
            self._pending[rid] = p
            if plan is None:
                self.submitted += 1
                self.last_inputs = feeds
        self._dispatch(p, None)
        return fut

    def open_plan(self, key: str) -> None:
        """Load the plan ``BUNDLE/<key>`` (validating loader) if it is not loaded yet."""
        with self._lock:
            if key in self.views:
                return
        view = open_bundle(self.view.root / key, key=key)
        with self._lock:
            self.views.setdefault(key, view)

    def switch_plan(self, key: str) -> int:
        """New requests start on plan ``key`` from now on (requests in flight finish on
        theirs); returns the index of the first request on it (a request boundary)."""
        self.open_plan(key)
        with self._lock:
            self.current = key
            return self.submitted

    def set_host(self, device: str, address: str) -> None:
        """Point ``device`` at a new address (e.g. a worker restarted on another port)."""
        with self._lock:
            self.hosts[device] = parse_address(address, what=f"host of {device}")
            self.down.discard(device)

    def close(self) -> None:
        self._stop.set()
        self._probes.shutdown(wait=False)
        self._server.close()
        self._pool.close()
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for p in pending:
            set_exception(p.future, RequestError(f"request {p.id}: executor closed"))

    def __enter__(self) -> RemoteExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ planning
    def _choose_plan(self, pinned: str | None = None) -> str | None:
        """The current plan (live adaptation's choice, else main) when its devices all
        have a live host, else the first such plan (main first); ``pinned``: that plan
        or none."""
        def live(view: BundleView) -> bool:
            return all(d in self.hosts and d not in self.down for d in view.devices)

        if pinned is not None:
            return pinned if live(self.views[pinned]) else None
        if self.current in self.views and live(self.views[self.current]):
            return self.current

        def order(item: tuple[str, BundleView]) -> tuple[int, float]:
            # the main plan first, then fallbacks by their own latency estimate
            est = (item[1].plan.get("estimate") or {}).get("latency")
            return (item[0] != "main", est if isinstance(est, (int, float)) else float("inf"))

        for key, view in sorted(self.views.items(), key=order):
            if live(view):
                return key
        return None

    def _replan(self, down: frozenset[str]) -> bool:
        """Compile a plan without ``down`` (outside the lock: it takes seconds)."""
        if self.replanner is None:
            return False
        try:
            new = self.replanner(down)
        except UserError as err:
            log.warning("re-planning without %s failed: %s", ", ".join(sorted(down)), err)
            return False
        if new is None:
            return False
        self.open_plan(new)
        return True

    def _dispatch(self, p: Pending, reason: str | None) -> None:
        """Send attempt ``p.attempt + 1`` of ``p`` (or fail it when it cannot be)."""
        tried_replan: set[frozenset[str]] = set()
        while True:
            with self._lock:
                if p.id not in self._pending:
                    return
                if reason:
                    p.history.append(reason)
                    reason = None
                if p.attempt >= self.max_attempts or time.monotonic() >= p.deadline:
                    self._finish_error(p, "gave up after " + ("; ".join(p.history[-3:]) or (
                        f"its deadline ({self.timeout:g} s) passed before an attempt")))
                    return
                key = self._choose_plan(p.pinned)
                down = frozenset(self.down)
                if key is None and p.pinned is not None:
                    self._finish_error(p, f"plan {p.pinned}: a device is down ("
                                       + ", ".join(sorted(self.down)) + ")")
                    return
                if key is None and (self.replanner is None or down in tried_replan):
                    self._finish_error(p, "no plan avoids the devices that are down ("
                                       + ", ".join(sorted(self.down)) + "); "
                                       + "; ".join(p.history[-2:]))
                    return
            if key is None:
                tried_replan.add(down)
                self._replan(down)
                continue
            with self._lock:
                if p.id not in self._pending:  # answered meanwhile (a slow earlier attempt)
                    return
                view = self.views[key]
                p.attempt += 1
                p.retrying = False
                p.plan, p.devices = key, frozenset(view.devices)
                budget = min(self.attempt_timeout, p.deadline - time.monotonic())
                p.attempt_deadline = time.monotonic() + budget
                route = {d: format_address(self.hosts[d]) for d in view.devices}
                base = {"type": "infer", "id": p.id, "attempt": p.attempt, "plan": key,
                        "from": INPUT, "route": route, "reply": self.reply,
                        "budget": max(budget, 0.01), "token": self.token, "timings": [],
                        "ack": True, "timed": self.time_links}
                p.gathering[p.attempt] = (key, Inbox(view.senders.get(OUTPUT, ())), [])
                attempt = p.attempt
                p.sent = time.time()
                source = {n: (None, a) for n, a in p.inputs.items()}
                messages = outgoing(view.bundle.input_sends, source, f"request {p.id}")
            refused = None
            for to, message in messages:
                if to == OUTPUT:  # a model input that is also a model output
                    self._gather(p, attempt, INPUT, message, [], "the source")
                    continue
                device = view.unit_map[to].device
                addr = self.hosts[device]
                header = {**base, "unit": to, "rows": {
                    n: None if r is None else list(r) for n, (r, _) in message.items()}}
                arrays = {n: a for n, (_, a) in message.items()}
                try:
                    # each receiver answers "accepted" once the message passed its checks,
                    # so a refused request (token, tensors) fails at once, not on time-out
                    t0 = time.monotonic()
                    reply = self._pool.request(addr, header, arrays, timeout=min(budget, 5.0))
                    self.links.record_transfer(device, sum(a.nbytes for a in arrays.values()),
                                               time.monotonic() - t0)
                except (OSError, ProtocolError) as err:
                    self._pool.drop(addr)
                    with self._lock:
                        self.down.add(device)
                    reason = (f"attempt {attempt}: device {device} at "
                              f"{format_address(addr)} unreachable ({err.__class__.__name__})")
                    log.warning("request %s: %s", p.id, reason)
                    break
                if reply.header.get("type") != "accepted":
                    refused = (device, reply.header)
                    break
            else:
                return
            if refused is not None:
                device, h = refused
                with self._lock:
                    if p.id in self._pending:
                        self._finish_error(p, f"refused by device {device}: {h.get('code')}: "
                                           f"{str(h.get('message'))[:300]}")
                return

    def _retry_async(self, p: Pending, reason: str) -> None:
        threading.Thread(target=self._dispatch, args=(p, reason), daemon=True).start()

    # ------------------------------------------------------------------ monitor
    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.probe_interval):
            with self._lock:
                pending = list(self._pending.values())
                in_use = {d for p in pending for d in p.devices}
                check = {d: self.hosts[d] for d in in_use | self.down if d in self.hosts}
            names = list(check)
            addrs = [check[d] for d in names]
            states = dict(zip(names, self._probes.map(
                probe_status, addrs, [self.probe_timeout] * len(addrs),
                [self.tls] * len(addrs)), strict=True))
            now = time.monotonic()
            retry: list[tuple[Pending, str]] = []
            with self._lock:
                for d, state in states.items():
                    # a refused connection is final; a slow answer must repeat before the
                    # device counts as down, so a busy host is not dropped for one hiccup
                    self._strikes[d] = 0 if state == "ok" else self._strikes.get(d, 0) + 1
                    if state == "ok" and d in self.down:
                        log.info("device %s answers again", d)
                        self.down.discard(d)
                    elif d not in self.down and (state == "refused"
                                                 or self._strikes[d] >= self.probe_strikes):
                        log.warning("device %s does not answer (%s)", d, state)
                        self.down.add(d)
                for p in list(self._pending.values()):
                    if now >= p.deadline:
                        self._finish_error(p, f"no result within {self.timeout} s "
                                           f"(attempt {p.attempt}, plan {p.plan})")
                    elif p.retrying or p.attempt == 0:
                        continue  # a retry is on its way, or the first send is (submit)
                    elif p.devices & self.down:
                        dead = ", ".join(sorted(p.devices & self.down))
                        retry.append((p, f"attempt {p.attempt}: device {dead} down"))
                    elif now >= p.attempt_deadline:
                        retry.append((p, f"attempt {p.attempt}: no result within "
                                      f"{self.attempt_timeout:.3g} s"))
                for p, _ in retry:
                    p.retrying = True
            for p, why in retry:
                log.warning("request %s: %s; retrying", p.id, why)
                self._retry_async(p, why)
