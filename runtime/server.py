"""A threaded frame server: one reader thread per connection, frames handed to a callback.

Workers and the executor's result listener are both built on it. A malformed, oversized
or truncated frame gets an ``error`` frame back (when the socket still allows it) and
that connection is closed; the server itself keeps accepting, which is what the security
tests check.

Denial of service without the token is bounded here, before a handler sees anything:

* **Authenticate early**: with ``token`` set, the token in a frame's header is checked
  before its body is allocated or read, so a peer without it costs at most one header.
* **Deadlines per frame**: once a frame starts, its prefix and header must arrive within
  ``header_timeout`` and the whole frame within ``frame_timeout`` (not per read: a frame
  dribbled a byte at a time is closed by its deadline).
* **Unproven connections are cheap to drop**: until a connection has carried one
  authenticated request (a frame whose type is not in ``open_types`` that was not
  refused) it may stay idle only ``first_frame_timeout`` seconds; at most ``max_per_peer``
  of them per peer address, and when ``max_connections`` are open the oldest unproven one
  is closed to make room (idle ones before one reading a frame it was let in). Only when
  every connection is proven is a newcomer refused, with a typed ``busy`` error frame. So
  idle sockets (hundreds of them) cannot lock out a client that holds the token.
* **Memory**: bodies being received at once are bounded by ``max_buffered`` bytes (a
  reader waits, within its frame's deadline, for room, then is refused ``busy``); a body
  that cannot be allocated is a ``busy`` refusal, never a crash.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from runtime.protocol import MAX_HEADER, Frame, ProtocolError
from runtime.security import token_matches
from runtime.transport import ConnectionClosed, recv_frame, send_frame, set_timeout

__all__ = ["Handler", "FrameServer", "bind_listener"]

log = logging.getLogger("runtime.server")

# handler(frame, peer) -> a reply header (sent back on the same connection) or None, or
# (reply or None, callable run in the connection's thread after the reply is sent)
Handler = Callable[[Frame, str], Any]


def bind_listener(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening TCP socket (``port`` 0: the OS picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


@dataclass(eq=False)
class _Conn:
    """One accepted connection and what the server knows about it."""

    sock: socket.socket
    host: str  # the peer's address, without the port (the per-peer bound)
    opened: float = field(default_factory=time.monotonic)
    proven: bool = False  # has carried an authenticated, accepted request
    reading: bool = False  # a frame whose header passed the checks is being read
    dropped: bool = False  # closed by the server to make room


class FrameServer:
    """Accept connections on ``listener`` and feed their frames to ``handler``.

    Args:
        listener: a bound, listening socket (see :func:`bind_listener`).
        handler: called in the connection's thread for every good frame.
        max_body: cap on a frame body, bytes (checked before the body is read).
        max_header: cap on a frame header, bytes.
        max_connections: connections open at once (see the module doc for who yields).
        idle_timeout: a proven connection idle this long is closed (pooled hops).
        frame_timeout: a started frame must be complete within this many seconds.
        tls: mutual TLS (a server context from :mod:`runtime.tls`), or ``None``.
        token: when set, frames of types outside ``open_types`` must carry it; checked
            on the header, before the body is read. ``None``: the handler decides.
        open_types: frame types served without a token (the liveness probe).
        max_per_peer: unproven connections from one peer address.
        first_frame_timeout: idle limit of an unproven connection, seconds.
        header_timeout: prefix + header (and a TLS handshake) must arrive within this.
        max_buffered: bytes of frame bodies being received at once (default: four
            bodies of ``max_body``, at least 256 MiB).
    """

    def __init__(self, listener: socket.socket, handler: Handler, *, max_body: int,
                 max_header: int = MAX_HEADER, max_connections: int = 256,
                 idle_timeout: float = 600.0, frame_timeout: float = 30.0,
                 tls: ssl.SSLContext | None = None, token: str | None = None,
                 open_types: Collection[str] = ("health",), max_per_peer: int = 32,
                 first_frame_timeout: float = 10.0, header_timeout: float = 10.0,
                 max_buffered: int | None = None) -> None:
        self.listener = listener
        self.tls = tls
        self.handler = handler
        self.max_body = max_body
        self.max_header = max_header
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.token = token
        self.open_types = frozenset(open_types)
        self.max_per_peer = max_per_peer
        self.first_frame_timeout = first_frame_timeout
        self.header_timeout = min(header_timeout, frame_timeout)
        self.max_buffered = max_buffered
        self.stats = {"evicted": 0, "refused_busy": 0, "refused_token": 0}
        self._conns: dict[socket.socket, _Conn] = {}
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # receive budget freed
        self._receiving = 0  # body bytes being received now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return host, port

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def start(self) -> FrameServer:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._stop.set()
        # close() alone does not wake a thread blocked in accept() on Linux: that thread
        # (and, through it, the server and its handler's owner) would live on. shutdown()
        # does wake it (benchmarks/soak.py: ~1.9 MB kept per executor opened and closed).
        _shutdown(self.listener)
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _shutdown(c)
            c.close()

    # ------------------------------------------------------------------ admission
    def _make_room(self, host: str) -> tuple[bool, list[socket.socket]]:
        """Admit a connection from ``host``? Returns (admit, connections to close).

        Called with the lock held. The oldest unproven connection yields: of this peer
        when it holds ``max_per_peer`` of them, of anyone when the server is full.
        """
        victims: list[socket.socket] = []
        # idle ones first: a connection reading a checked (with ``token``: authenticated)
        # frame yields last, so a flood cannot cut a new client's first frame short
        unproven = sorted((c for c in self._conns.values() if not c.proven),
                          key=lambda c: (c.reading, c.opened))
        mine = [c for c in unproven if c.host == host]
        while len(mine) >= self.max_per_peer:
            victims.append(mine.pop(0).sock)
        for v in victims:
            unproven.remove(self._conns[v])
        while len(self._conns) - len(victims) >= self.max_connections and unproven:
            victims.append(unproven.pop(0).sock)
        if len(self._conns) - len(victims) >= self.max_connections:
            return False, victims
        for v in victims:
            self._conns.pop(v).dropped = True
        return True, victims

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            host = str(peer[0])
            with self._lock:
                admit, victims = self._make_room(host)
                if admit:
                    self._conns[conn] = _Conn(conn, host)
                    self.stats["evicted"] += len(victims)
                else:
                    self.stats["refused_busy"] += 1
            for v in victims if admit else ():
                _shutdown(v)  # its reader thread sees EOF and closes it
            if not admit:
                log.warning("refusing connection from %s: %d proven connections open",
                            host, self.max_connections)
                self._refuse_busy(conn)
                continue
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            set_timeout(conn, self.first_frame_timeout)
            name = f"{peer[0]}:{peer[1]}"
            threading.Thread(target=self._serve, args=(conn, name), name=f"conn-{name}",
                             daemon=True).start()

    def _refuse_busy(self, conn: socket.socket) -> None:
        if self.tls is None:  # a TLS peer cannot read a frame before the handshake
            try:
                set_timeout(conn, 1.0)
                send_frame(conn, {"type": "error", "code": "busy", "close": True,
                                  "message": f"server busy: {self.max_connections} "
                                             f"connections open"})
            except OSError:
                pass
        conn.close()

    # ------------------------------------------------------------------ checks
    def _check_header(self, header: dict[str, Any], body_len: int) -> None:
        """Runs before a body is read: the token, then room in the receive budget."""
        if (self.token is not None and not self._open(header)
                and not token_matches(self.token, header.get("token"))):
            self.stats["refused_token"] += 1
            raise ProtocolError("missing or wrong token", "unauthorized")
        if body_len:
            self._reserve(body_len)

    def _open(self, header: dict[str, Any]) -> bool:
        """Whether a frame's type is served without a token (a type that is no string,
        a list say, is not: it must not reach a set lookup, which would raise)."""
        kind = header.get("type")
        return isinstance(kind, str) and kind in self.open_types

    def _budget(self) -> int:
        return self.max_buffered or max(4 * self.max_body, 256 << 20)

    def _reserve(self, nbytes: int) -> None:
        budget = self._budget()
        if nbytes > budget:
            raise ProtocolError(f"body of {nbytes} B exceeds the receive budget of "
                                f"{budget} B", "too_large")
        deadline = time.monotonic() + self.header_timeout
        with self._room:
            while self._receiving + nbytes > budget:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    raise ProtocolError(f"server busy: {self._receiving} B of bodies "
                                        f"being received", "busy")
                self._room.wait(left)
            self._receiving += nbytes

    def _release(self, nbytes: int) -> None:
        with self._room:
            self._receiving -= nbytes
            self._room.notify_all()

    # ------------------------------------------------------------------ serving
    def _handshake(self, raw: socket.socket, peer: str) -> socket.socket | None:
        """The TLS handshake, bounded in whole by ``header_timeout`` (a watchdog closes a
        peer that dribbles it), in this connection's thread so the accept loop never
        waits; a peer without a valid certificate is dropped here."""
        watchdog = threading.Timer(self.header_timeout, _shutdown, args=(raw,))
        watchdog.daemon = True
        watchdog.start()
        try:
            raw.settimeout(self.header_timeout)
            assert self.tls is not None
            conn = self.tls.wrap_socket(raw, server_side=True)
        except (OSError, ValueError) as err:
            log.warning("TLS handshake with %s failed: %s", peer, err)
            return None
        finally:
            watchdog.cancel()
        set_timeout(conn, self.first_frame_timeout)
        return conn

    def _serve(self, conn: socket.socket, peer: str) -> None:
        with self._lock:
            state = self._conns.get(conn)
        if state is None:  # dropped before its thread started
            conn.close()
            return
        if self.tls is not None:
            raw = conn
            wrapped = self._handshake(raw, peer)
            with self._lock:
                self._conns.pop(raw, None)
                if wrapped is not None and not state.dropped:
                    state.sock = wrapped
                    self._conns[wrapped] = state
            if wrapped is None or state.dropped:
                (wrapped or raw).close()
                return
            conn = wrapped
        try:
            self._frames(conn, state, peer)
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()

    def _frames(self, conn: socket.socket, state: _Conn, peer: str) -> None:
        reserved = [0]  # body bytes this connection holds in the receive budget

        def check(header: dict[str, Any], body_len: int) -> None:
            self._check_header(header, body_len)
            reserved[0] = body_len
            state.reading = True

        while not self._stop.is_set():

            try:
                frame = recv_frame(conn, max_body=self.max_body, max_header=self.max_header,
                                   frame_timeout=self.frame_timeout,
                                   header_timeout=self.header_timeout, check_header=check)
            except ConnectionClosed:
                return
            except ProtocolError as err:
                if not state.dropped:
                    log.warning("rejected frame from %s: %s", peer, err)
                    self._reply(conn, {"type": "error", "code": err.code,
                                       "message": str(err), "close": True})
                    _linger(conn)
                return
            except OSError:  # idle too long, reset, or dropped to make room
                return
            finally:
                state.reading = False
                if reserved[0]:
                    self._release(reserved[0])
                    reserved[0] = 0
            try:
                reply = self.handler(frame, peer)
            except Exception as err:  # a handler bug must not kill the server
                log.exception("handler failed for a frame from %s", peer)
                reply = {"type": "error", "code": "internal",
                         "message": f"{err.__class__.__name__}: {err}"}
            after = None
            if isinstance(reply, tuple):  # (reply, work to do once it is sent)
                reply, after = reply
            if not state.proven and not self._open(frame.header) and (
                    reply is None or reply.get("type") != "error"):
                with self._lock:
                    state.proven = True
                try:
                    set_timeout(conn, self.idle_timeout)
                except OSError:  # closed meanwhile (server shutting down)
                    return
            sent = reply is None or self._reply(conn, reply)
            if after is not None:
                # run even when the peer is gone: the handler gave it work it owns (a
                # worker's inline run releases its unit's lock), and the request was
                # admitted (the executor drops a duplicate answer if it retries)
                after()
            if not sent or (reply is not None and reply.get("close")):
                return

    @staticmethod
    def _reply(conn: socket.socket, header: dict[str, Any]) -> bool:
        try:
            send_frame(conn, header)
            return True
        except OSError:
            return False


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _linger(conn: socket.socket, limit: int = 1 << 20, seconds: float = 0.5) -> None:
    """Half-close and drain a little before closing after a rejected frame.

    Closing a socket with unread input makes the kernel send a reset, which can destroy
    the error frame before the peer reads it; draining (bounded in bytes and time) lets
    the peer see why it was refused.
    """
    try:
        conn.shutdown(socket.SHUT_WR)
        set_timeout(conn, seconds)
        deadline = time.monotonic() + seconds
        drained = 0
        while drained < limit and time.monotonic() < deadline:
            chunk = conn.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass
