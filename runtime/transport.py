"""TCP transport for frames: send without copies, receive into one buffer (pooled
connections: :mod:`runtime.pool`).

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
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

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
    "set_timeout",
]


class ConnectionClosed(Exception):
    """The peer closed the connection cleanly between two frames."""


@functools.lru_cache(maxsize=1024)  # every message names its reply address and route
@functools.lru_cache(maxsize=1024)  # on every send: a route's few addresses, parsed once
def parse_address(text: str, *, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` also accepted) -> ``(host, port)``."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535 \
            or not _resolvable(host):
        raise ValueError(f"{what} {text!r}: expected HOST:PORT")
    return host, int(port)


def _resolvable(host: str) -> bool:
    """Whether the socket layer can take ``host`` at all: printable, and a name its IDNA
    codec encodes (labels of at most 63 characters, no lone surrogates), so that a bad
    address from a request is a ``ValueError`` here, not a ``UnicodeError`` from
    ``connect``."""
    if not host.isprintable():
        return False
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


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
    if tls is None:
        set_timeout(sock, timeout)  # blocking, the kernel keeping the time
    else:  # the TLS layer needs Python's timeouts
        sock.settimeout(timeout)
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


# Timeouts. A plain socket on Linux (the runtime's own connections: see set_timeout) is
# kept blocking, and the kernel times each call (SO_RCVTIMEO / SO_SNDTIMEO): a read or a
# write is then one system call. Python's own timeouts make every call a poll() and the
# call, and switching a socket's mode is one more (ioctl): 8 system calls per received
# and answered frame became 4 (benchmarks/README.md 14.3; on loopback the time saved is
# within the noise). The rest of a frame is read with MSG_DONTWAIT (it usually waits
# in the socket already); only when it does not is the wait bounded by the frame's
# deadline, by setting SO_RCVTIMEO to the time left for one MSG_WAITALL call (the kernel
# counts the wait down across wake-ups) and back afterwards. Sockets in Python's timeout
# mode (TLS, other platforms, a caller's settimeout) still work: their rest is read with
# the socket switched to non-blocking, and a large rest the kernel way.
_KERNEL_TIMEOUTS = sys.platform.startswith("linux") and hasattr(socket, "MSG_WAITALL")
_BULK = 64 * 1024  # bytes from which the kernel-timeout path pays for its extra calls
_TIMEVAL = struct.Struct("@ll")
# A body below this is read together with its header (one call, not two) and so before
# ``check_header`` sees the header: what a peer without the token can make us read.
_SMALL_BODY = 16 * 1024


def set_timeout(sock: socket.socket, seconds: float | None) -> None:
    """Bound each read and write on ``sock`` by ``seconds`` (None: no bound).

    A plain socket on Linux stays blocking and the kernel keeps the time (see above);
    any other socket (TLS, other platforms) gets Python's ``settimeout``. Either way a
    read or write that runs out raises ``TimeoutError`` from this module's functions.
    """
    if not _kernel_socket(sock):
        sock.settimeout(seconds)
        return
    if sock.gettimeout() is not None:
        sock.settimeout(None)
    _kernel_timeout(sock, socket.SO_RCVTIMEO, seconds)
    _kernel_timeout(sock, socket.SO_SNDTIMEO, seconds)


def _kernel_socket(sock: socket.socket) -> bool:
    return _KERNEL_TIMEOUTS and type(sock) is socket.socket


def _bulk_path(sock: socket.socket, size: int) -> bool:
    return size >= _BULK and _kernel_socket(sock)


def _kernel_timeout(sock: socket.socket, option: int, seconds: float | None) -> None:
    """Set SO_RCVTIMEO / SO_SNDTIMEO; None clears it (the kernel's 0), and a timeout too
    small for a timeval stays 1 us, not none."""
    whole = micros = 0
    if seconds is not None:
        whole = max(int(seconds), 0)
        micros = max(int((seconds - whole) * 1e6), 0)
        if not (whole or micros):
            micros = 1  # (0 would mean no timeout at all)
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(whole, micros))


def _truncated(got: int, size: int, what: str) -> ProtocolError:
    return ProtocolError(f"truncated frame: connection closed after {got} of {size} B of "
                         f"the {what}", "truncated")


def _fill(sock: socket.socket, view: memoryview, deadline: float | None, what: str) -> None:
    """Fill ``view`` before ``deadline`` (monotonic seconds; None: the socket's timeout).

    The deadline bounds the whole read, not each ``recv``: a peer that dribbles a byte
    now and then cannot keep a frame open. Leaves the socket's mode as it was.
    """
    got, size = _take_ready(sock, view, deadline, what), len(view)
    while got < size:
        # a blocking socket always waits the kernel way; one in timeout mode does so for a
        # large rest only
        if ((sock.gettimeout() is None and _kernel_socket(sock))
                or (got and _bulk_path(sock, size - got))):
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
    """What already waits in the socket, in one call and without waiting: a blocking
    socket is read with MSG_DONTWAIT; a socket in timeout mode only when
    :func:`recv_frame` made it non-blocking for the rest of a frame with a deadline. 0
    when nothing is there (the caller then waits, bounded by the deadline)."""
    timeout = sock.gettimeout()
    if timeout is None and _kernel_socket(sock):
        flags = int(socket.MSG_DONTWAIT)
    elif deadline is not None and timeout == 0.0:
        flags = 0
    else:
        return 0
    try:
        n = (sock.recvmsg_into(view, 0, flags)[0] if isinstance(view, list)
             else sock.recv_into(view, 0, flags))
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
    got = 0
    if type(sock) is socket.socket and hasattr(sock, "recvmsg_into"):
        got = _take_ready(sock, [head, body], deadline, "header and body")
    if got < len(head):
        _fill(sock, head[got:], deadline, "header")
        _fill(sock, body, deadline, "body")
    elif got < len(head) + len(body):
        _fill(sock, body[got - len(head):], deadline, "body")


def _fill_bulk(sock: socket.socket, view: memoryview, deadline: float | None,
               what: str) -> None:
    """Wait for the rest of ``view`` on a blocking socket, one MSG_WAITALL call bounded
    by SO_RCVTIMEO (the time left before ``deadline``, else the socket's timeout); a
    socket in timeout mode is made blocking for it and put back."""
    old = sock.gettimeout()
    saved = None  # a blocking socket's own SO_RCVTIMEO, put back afterwards
    if old is not None:
        sock.settimeout(None)
    elif deadline is not None:
        saved = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size)
    got, size = 0, len(view)
    try:
        while got < size:
            if deadline is not None:
                _kernel_timeout(sock, socket.SO_RCVTIMEO, _time_left(deadline, what))
            elif old is not None:
                _kernel_timeout(sock, socket.SO_RCVTIMEO, old)
            try:
                n = sock.recv_into(view[got:], size - got, socket.MSG_WAITALL)
            except BlockingIOError:  # SO_RCVTIMEO ran out before any byte came
                raise TimeoutError(what) from None
            if not n:
                raise _truncated(got, size, what)
            got += n
    finally:
        if saved is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, saved)
        elif old is not None:
            # timeout mode again, where SO_RCVTIMEO has no effect; cleared, so that a
            # later settimeout(None) by the socket's owner does not inherit it
            _kernel_timeout(sock, socket.SO_RCVTIMEO, None)
            sock.settimeout(old)


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
    old_timeout = sock.gettimeout()
    try:
        n = sock.recv_into(view)
    except BlockingIOError:  # a blocking socket's SO_RCVTIMEO ran out (set_timeout)
        if old_timeout is None:
            raise TimeoutError("timed out") from None
        raise
    if n == 0:
        raise ConnectionClosed()
    frame_deadline = head_deadline = None
    if frame_timeout is not None or header_timeout is not None:
        start = time.monotonic()
        frame_deadline = None if frame_timeout is None else start + frame_timeout
        head_deadline = frame_deadline if header_timeout is None else min(
            start + header_timeout, math.inf if frame_deadline is None else frame_deadline)
    if frame_deadline is not None and head_deadline is not None \
            and old_timeout is not None and type(sock) is socket.socket:
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
        if sock.gettimeout() != old_timeout:  # (a system call: only when it was changed)
            sock.settimeout(old_timeout)
    tensors = decode_tensors(header, body)
    return Frame(header=header, tensors=tensors, body_len=body_len)

