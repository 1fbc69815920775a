"""TCP transport for frames: send without copies, receive into one buffer, pool connections.

Why raw TCP and not gRPC for the hops: the per-hop overhead of a 1x3x224x224 float32 tensor
was measured with ``benchmarks/runtime_overhead.py`` (framed TCP is several times cheaper than
a gRPC unary call carrying the same bytes, see the report in ``benchmarks/results``). gRPC
is still offered for interoperability (the Open Inference Protocol in :mod:`runtime.oip`).

Sending uses ``socket.sendmsg`` with the prefix+header and the arrays' own memory, so the
tensor bytes are never copied in Python. Receiving reads the whole body into one
``bytearray`` with ``recv_into``; tensors are ``np.frombuffer`` views of it. Sockets have
``TCP_NODELAY`` set: a frame is a few writes and must not wait for Nagle's algorithm.
"""

from __future__ import annotations

import functools
import math
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from runtime.protocol import (
    MAX_HEADER,
    PREFIX,
    Frame,
    ProtocolError,
    decode_tensors,
    encode,
    parse_header,
    unpack_prefix,
)

__all__ = [
    "ConnectionClosed",
    "parse_address",
    "format_address",
    "connect",
    "send_frame",
    "recv_frame",
    "ConnectionPool",
]


T = TypeVar("T")


class ConnectionClosed(Exception):
    """The peer closed the connection cleanly between two frames."""


@functools.lru_cache(maxsize=1024)  # every message names its reply address and route
def parse_address(text: str, *, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` also accepted) -> ``(host, port)``."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} {text!r}: expected HOST:PORT")
    return host, int(port)


def format_address(addr: tuple[str, int]) -> str:
    """``(host, port)`` -> ``HOST:PORT``."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connect(addr: tuple[str, int], timeout: float,
            tls: ssl.SSLContext | None = None) -> socket.socket:
    """A connected TCP socket with ``TCP_NODELAY`` and a send/receive timeout.

    With ``tls`` (a client context, see :mod:`runtime.tls`) the TLS handshake is done
    before returning; a peer that fails it raises ``ssl.SSLError`` (an ``OSError``).
    """
    sock = socket.create_connection(addr, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    if tls is not None:
        try:
            sock = tls.wrap_socket(sock)
        except BaseException:
            sock.close()
            raise
    return sock


def _time_left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(what)
    return left


# Reads and writes use Python's timeouts (a poll() + recv() pair per call), with
# ``settimeout(time left)`` before each so the deadline covers the whole frame. When the
# first call leaves a large rest (a body still arriving over a real network), Linux
# switches to a blocking socket whose SO_RCVTIMEO / SO_SNDTIMEO bounds one whole call (the
# kernel counts the wait down across wake-ups) and MSG_WAITALL: one call for the rest
# instead of a pair per chunk. On loopback a body is usually there at once, and the
# switch (4 more calls) is not made.
_KERNEL_TIMEOUTS = sys.platform.startswith("linux") and hasattr(socket, "MSG_WAITALL")
_BULK = 64 * 1024  # bytes from which the kernel-timeout path pays for its extra calls
_TIMEVAL = struct.Struct("@ll")
# A body below this is read together with its header (one call, not two) and so before
# ``check_header`` sees the header: what a peer without the token can make us read.
_SMALL_BODY = 16 * 1024


def _bulk_path(sock: socket.socket, size: int) -> bool:
    return _KERNEL_TIMEOUTS and size >= _BULK and type(sock) is socket.socket


def _kernel_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """Set SO_RCVTIMEO / SO_SNDTIMEO (0 means none, so a tiny positive value stays 1 us)."""
    whole = int(seconds)
    micros = int((seconds - whole) * 1e6)
    if seconds > 0 and not (whole or micros):
        micros = 1
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(whole, micros))


def _truncated(got: int, size: int, what: str) -> ProtocolError:
    return ProtocolError(f"truncated frame: connection closed after {got} of {size} B of "
                         f"the {what}", "truncated")


def _fill(sock: socket.socket, view: memoryview, deadline: float | None, what: str) -> None:
    """Fill ``view`` before ``deadline`` (monotonic seconds; None: the socket's timeout).

    The deadline bounds the whole read, not each ``recv``: a peer that dribbles a byte
    now and then cannot keep a frame open. Leaves the socket in timeout mode.
    """
    got, size = _take_ready(sock, view, deadline, what), len(view)
    while got < size:
        if got and _bulk_path(sock, size - got):
            _fill_bulk(sock, view[got:], deadline, what)
            return
        if deadline is not None:
            sock.settimeout(_time_left(deadline, what))
        n = sock.recv_into(view[got:])
        if not n:
            raise _truncated(got, size, what)
        got += n


def _take_ready(sock: socket.socket, view: memoryview | list[memoryview],
                deadline: float | None, what: str) -> int:
    """What already waits in the socket, in one call: :func:`recv_frame` leaves a plain
    socket non-blocking while it reads the rest of a frame that has a deadline, so a
    read that has its bytes costs no ``poll`` and no timeout change. 0 when nothing is
    there (the caller then waits, bounded by the deadline)."""
    if deadline is None or sock.gettimeout() != 0.0:
        return 0
    try:
        n = sock.recvmsg_into(view)[0] if isinstance(view, list) else sock.recv_into(view)
    except BlockingIOError:
        return 0
    if not n:
        size = sum(map(len, view)) if isinstance(view, list) else len(view)
        raise _truncated(0, size, what)
    return n


def _fill_pair(sock: socket.socket, head: memoryview, body: memoryview,
               deadline: float | None) -> None:
    """Fill a small frame's header and body with one ``recvmsg_into`` (both usually wait
    in the socket already), else one after the other."""
    if type(sock) is not socket.socket or not hasattr(sock, "recvmsg_into"):
        _fill(sock, head, deadline, "header")
        _fill(sock, body, deadline, "body")
        return
    size = len(head) + len(body)
    got = _take_ready(sock, [head, body], deadline, "header and body")
    while got < size:
        if deadline is not None:
            sock.settimeout(_time_left(deadline, "header"))
        parts = [head[got:], body] if got < len(head) else [body[got - len(head):]]
        n = sock.recvmsg_into(parts)[0]
        if not n:
            raise _truncated(got, size, "header and body")
        got += n


def _fill_bulk(sock: socket.socket, view: memoryview, deadline: float | None,
               what: str) -> None:
    """:func:`_fill` for large bodies on Linux (see ``_KERNEL_TIMEOUTS``)."""
    old = sock.gettimeout()
    sock.settimeout(None)
    got, size = 0, len(view)
    try:
        while got < size:
            _kernel_timeout(sock, socket.SO_RCVTIMEO,
                            (old or 0.0) if deadline is None else _time_left(deadline, what))
            try:
                n = sock.recv_into(view[got:], size - got, socket.MSG_WAITALL)
            except BlockingIOError:  # SO_RCVTIMEO ran out before any byte came
                raise TimeoutError(what) from None
            if not n:
                raise _truncated(got, size, what)
            got += n
    finally:
        if old is None:  # a socket kept blocking by its owner must not keep our timeout
            _kernel_timeout(sock, socket.SO_RCVTIMEO, 0.0)
        sock.settimeout(old)  # in timeout mode (non-blocking) SO_RCVTIMEO has no effect


def _allocate_body(body_len: int) -> np.ndarray:
    """An uninitialised receive buffer (``bytearray(n)`` would zero-fill every byte)."""
    try:
        return np.empty(body_len, dtype=np.uint8)
    except MemoryError:
        raise ProtocolError(f"no memory for a body of {body_len} B", "busy") from None


def send_frame(sock: socket.socket, header: Mapping[str, Any],
               tensors: Mapping[str, np.ndarray] | None = None) -> int:
    """Write one frame; returns the bytes sent. Handles partial ``sendmsg`` writes.

    The socket's timeout bounds each write, and a whole large frame on Linux.
    """
    buffers: list[Any] = encode(header, tensors)
    total = sum(map(len, buffers))
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg on TLS sockets: one write per buffer
        for b in buffers:
            sock.sendall(b)
        return total
    old = sock.gettimeout()
    bulk, left = False, total
    try:
        while buffers:
            if not bulk and left < total and old is not None and _bulk_path(sock, left):
                bulk = True  # a large rest did not fit: see _KERNEL_TIMEOUTS
                sock.settimeout(None)
                _kernel_timeout(sock, socket.SO_SNDTIMEO, old)
            # sendmsg takes at most IOV_MAX buffers; 512 is below every platform's limit
            try:
                sent = sock.sendmsg(buffers[:512])
            except BlockingIOError:  # SO_SNDTIMEO ran out
                raise TimeoutError("frame send timed out") from None
            left -= sent
            while sent:
                if sent >= len(buffers[0]):
                    sent -= len(buffers[0])
                    buffers.pop(0)
                else:
                    buffers[0] = memoryview(buffers[0])[sent:]
                    sent = 0
            while buffers and not len(buffers[0]):
                buffers.pop(0)
    finally:
        if bulk:
            sock.settimeout(old)  # timeout mode again, where SO_SNDTIMEO has no effect
    return total


HeaderCheck = Callable[[dict[str, Any], int], None]


def recv_frame(sock: socket.socket, *, max_body: int, max_header: int = MAX_HEADER,
               frame_timeout: float | None = 30.0, header_timeout: float | None = None,
               check_header: HeaderCheck | None = None) -> Frame:
    """Read one frame; the caps are checked on the prefix before anything else is read.

    The socket's own timeout applies to the wait for the first byte (an idle connection).
    Once a frame has started, the whole frame must arrive within ``frame_timeout`` seconds
    and its prefix and header within ``header_timeout`` (default: the same), so a peer
    that sends part of a frame, or dribbles it a byte at a time, cannot hold the reader.
    ``check_header(header, body_len)`` runs after the header and before the body is
    allocated or read (the token check of :class:`runtime.server.FrameServer`; a body under
    16 KiB is read with its header, in one call, and checked just after); it refuses a frame
    by raising :class:`ProtocolError`. The body is read into an uninitialised
    ``uint8`` array; the tensors are views of it.

    Raises:
        ConnectionClosed: clean EOF before a frame started.
        ProtocolError: malformed, oversized, truncated, late or refused frame.
        TimeoutError / OSError: socket failures.
    """
    prefix = bytearray(PREFIX.size)
    view = memoryview(prefix)
    n = sock.recv_into(view)
    if n == 0:
        raise ConnectionClosed()
    old_timeout = sock.gettimeout()
    frame_deadline = head_deadline = None
    if frame_timeout is not None or header_timeout is not None:
        start = time.monotonic()
        frame_deadline = None if frame_timeout is None else start + frame_timeout
        head_deadline = frame_deadline if header_timeout is None else min(
            start + header_timeout, math.inf if frame_deadline is None else frame_deadline)
    if frame_deadline is not None and head_deadline is not None \
            and type(sock) is socket.socket:
        sock.settimeout(0.0)  # the rest usually waits in the socket already: _take_ready
    try:
        try:
            if n < PREFIX.size:
                _fill(sock, view[n:], head_deadline, "prefix")
            header_len, body_len = unpack_prefix(prefix, max_header, max_body)
            head = bytearray(header_len)
            if 0 < body_len < _SMALL_BODY:  # with its header: one read, checked just after
                body = _allocate_body(body_len)
                _fill_pair(sock, memoryview(head), memoryview(body),  # type: ignore[arg-type]
                           head_deadline)
                header = parse_header(head)
                if check_header is not None:
                    check_header(header, body_len)
            else:
                _fill(sock, memoryview(head), head_deadline, "header")
                header = parse_header(head)
                if check_header is not None:
                    check_header(header, body_len)
                body = _allocate_body(body_len)
                if body_len:
                    _fill(sock, memoryview(body), frame_deadline,  # type: ignore[arg-type]
                          "body")
        except TimeoutError as err:
            raise ProtocolError(f"truncated frame: the {err or 'frame'} did not arrive in "
                                f"time", "truncated") from None
    finally:
        sock.settimeout(old_timeout)
    tensors = decode_tensors(header, body)
    return Frame(header=header, tensors=tensors, body_len=body_len)


def _is_stale(sock: socket.socket) -> bool:
    """A pooled connection is stale when the peer closed it or sent something unasked.

    Hops are one-way (nothing is expected back on them), so anything readable means the
    peer went away (EOF/RST, e.g. a restarted worker) or rejected a frame: drop it.
    """
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


class ConnectionPool:
    """Idle persistent connections per address; a stale one is replaced transparently.

    ``send`` retries once on a fresh connection when a reused one turns out to be broken,
    which is how a restarted worker is picked up without restarting anyone else.

    Idle connections to addresses that are never used again (an executor's reply address
    after it closed: a new ephemeral port per client) must not pile up: returning a
    connection sweeps the pool for peers that went away (at most every ``sweep_every``
    seconds), and at most ``max_addresses`` addresses are kept, the least recently used
    dropped first. benchmarks/soak.py found the last stage's descriptors growing by one per
    client before this.
    """

    def __init__(self, timeout: float = 10.0, max_idle: int = 8,
                 tls: ssl.SSLContext | None = None, max_addresses: int = 64,
                 sweep_every: float = 1.0) -> None:
        self.timeout = timeout
        self.tls = tls
        self.max_idle = max_idle
        self.max_addresses = max_addresses
        self.sweep_every = sweep_every
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}  # LRU order
        self._swept = time.monotonic()
        self._lock = threading.Lock()

    def _take(self, addr: tuple[str, int]) -> socket.socket | None:
        with self._lock:
            conns = self._idle.get(addr, [])
            while conns:
                sock = conns.pop()
                if not _is_stale(sock):
                    return sock
                sock.close()
        return None

    def _give(self, addr: tuple[str, int], sock: socket.socket) -> None:
        closing: list[socket.socket] = []
        with self._lock:
            conns = self._idle.pop(addr, [])
            self._idle[addr] = conns  # most recently used last
            if len(conns) < self.max_idle:
                conns.append(sock)
            else:
                closing.append(sock)
            closing += self._sweep_locked()
            while len(self._idle) > self.max_addresses:
                closing += self._idle.pop(next(iter(self._idle)))
        for s in closing:
            s.close()

    def _sweep_locked(self) -> list[socket.socket]:
        """Idle connections whose peer went away (lock held); they are removed."""
        now = time.monotonic()
        if now - self._swept < self.sweep_every:
            return []
        self._swept = now
        stale = []
        for a, conns in list(self._idle.items()):
            keep = [c for c in conns if not _is_stale(c)]
            stale += [c for c in conns if c not in keep]
            if keep:
                self._idle[a] = keep
            else:
                del self._idle[a]
        return stale

    @property
    def idle_count(self) -> int:
        """Idle pooled connections held now (every one is an open descriptor)."""
        with self._lock:
            return sum(len(c) for c in self._idle.values())

    def _exchange(self, addr: tuple[str, int], timeout: float | None,
                  exchange: Callable[[socket.socket, float], tuple[T, bool]],
                  stale: tuple[type[BaseException], ...]) -> T:
        """Run ``exchange(sock, limit)`` on a pooled connection to ``addr``, else a new one.

        A pooled connection may have been closed by the peer (a restarted worker) since it
        was used: an error of the ``stale`` types on it closes it and retries once on a
        fresh connection; on a fresh connection the error is raised. ``exchange`` returns
        its result and whether the connection may go back to the pool.
        """
        limit = self.timeout if timeout is None else max(0.05, min(timeout, self.timeout))
        for attempt in (0, 1):
            sock = self._take(addr)
            fresh = sock is None
            if sock is None:
                sock = connect(addr, limit, self.tls)
            elif sock.gettimeout() != limit:  # (a system call: usually the same limit)
                sock.settimeout(limit)
            try:
                result, keep = exchange(sock, limit)
            except stale as err:
                sock.close()
                if fresh or attempt:
                    if isinstance(err, ConnectionClosed):
                        raise ConnectionResetError("peer closed the connection") from None
                    raise
                continue
            if keep:
                self._give(addr, sock)
            else:
                sock.close()
            return result
        raise OSError(f"cannot send to {format_address(addr)}")  # pragma: no cover

    def send(self, addr: tuple[str, int], header: Mapping[str, Any],
             tensors: Mapping[str, np.ndarray] | None = None,
             timeout: float | None = None) -> int:
        """Send one frame to ``addr``; raises ``OSError`` when the peer cannot be reached."""
        return self._exchange(addr, timeout,
                              lambda sock, _: (send_frame(sock, header, tensors), True),
                              (OSError,))

    def request(self, addr: tuple[str, int], header: Mapping[str, Any],
                tensors: Mapping[str, np.ndarray] | None = None,
                timeout: float | None = None, max_body: int = 0) -> Frame:
        """Send one frame and read the peer's one-frame answer on the same connection."""
        def exchange(sock: socket.socket, limit: float) -> tuple[Frame, bool]:
            send_frame(sock, header, tensors)
            reply = recv_frame(sock, max_body=max_body, frame_timeout=limit)
            return reply, not reply.header.get("close")

        return self._exchange(addr, timeout, exchange,
                              (ConnectionClosed, OSError, ProtocolError))

    def drop(self, addr: tuple[str, int]) -> None:
        """Close the idle connections to ``addr`` (after it was found dead)."""
        with self._lock:
            conns = self._idle.pop(addr, [])
        for sock in conns:
            sock.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            conns = [s for lst in self._idle.values() for s in lst]
            self._idle.clear()
        for sock in conns:
            sock.close()
