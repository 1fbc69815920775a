"""Pooled persistent connections: one frame out (``send``), or one out and one back
(``request``), on an idle connection to the address when there is one.

A connection's timeout is set only when it changes (the pool remembers what it set), so a
frame on a reused connection costs no extra system call.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from runtime.protocol import Frame, ProtocolError
from runtime.transport import (
    ConnectionClosed,
    connect,
    format_address,
    recv_frame,
    send_frame,
    set_timeout,
)

__all__ = ["ConnectionPool"]

T = TypeVar("T")


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
        # per address (least recently used first): idle connections and the timeout
        # each one has now
        self._idle: dict[tuple[str, int], list[tuple[socket.socket, float]]] = {}
        self._swept = time.monotonic()
        self._lock = threading.Lock()

    def _take(self, addr: tuple[str, int]) -> tuple[socket.socket, float] | None:
        with self._lock:
            conns = self._idle.get(addr, [])
            while conns:
                sock, limit = conns.pop()
                if not _is_stale(sock):
                    return sock, limit
                sock.close()
        return None

    def _give(self, addr: tuple[str, int], sock: socket.socket, limit: float) -> None:
        closing: list[socket.socket] = []
        with self._lock:
            conns = self._idle.pop(addr, [])
            self._idle[addr] = conns  # most recently used last
            if len(conns) < self.max_idle:
                conns.append((sock, limit))
            else:
                closing.append(sock)
            closing += self._sweep_locked()
            while len(self._idle) > self.max_addresses:
                closing += [c for c, _ in self._idle.pop(next(iter(self._idle)))]
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
            keep = [c for c in conns if not _is_stale(c[0])]
            stale += [c[0] for c in conns if c not in keep]
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
            taken = self._take(addr)
            fresh = taken is None
            if taken is None:
                sock = connect(addr, limit, self.tls)
            else:
                sock, had = taken
                if had != limit:  # (system calls: usually the same limit)
                    set_timeout(sock, limit)
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
                self._give(addr, sock, limit)
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
        for sock, _ in conns:
            sock.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            conns = [s for lst in self._idle.values() for s, _ in lst]
            self._idle.clear()
        for sock in conns:
            sock.close()
