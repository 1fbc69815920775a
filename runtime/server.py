"""A threaded frame server: one reader thread per connection, frames handed to a callback.

Workers and the executor's result listener are both built on it. A malformed, oversized
or truncated frame gets an ``error`` frame back (when the socket still allows it) and
that connection is closed; the server itself keeps accepting, which is what the security
tests check.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from runtime.protocol import MAX_HEADER, Frame, ProtocolError
from runtime.transport import ConnectionClosed, recv_frame, send_frame

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


class FrameServer:
    """Accept connections on ``listener`` and feed their frames to ``handler``.

    Args:
        listener: a bound, listening socket (see :func:`bind_listener`).
        handler: called in the connection's thread for every good frame.
        max_body: cap on a frame body, bytes (checked before the body is read).
        max_header: cap on a frame header, bytes.
        max_connections: connections served at once; more are refused (closed).
        idle_timeout: an idle connection is closed after this many seconds.
    """

    def __init__(self, listener: socket.socket, handler: Handler, *, max_body: int,
                 max_header: int = MAX_HEADER, max_connections: int = 256,
                 idle_timeout: float = 600.0, frame_timeout: float = 30.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.listener = listener
        self.tls = tls
        self.handler = handler
        self.max_body = max_body
        self.max_header = max_header
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return host, port

    def start(self) -> FrameServer:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and close every connection."""
        self._stop.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            with self._lock:
                too_many = len(self._conns) >= self.max_connections
                if not too_many:
                    self._conns.add(conn)
            if too_many:
                log.warning("refusing connection from %s: %d connections open", peer,
                            self.max_connections)
                conn.close()
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.idle_timeout)
            name = f"{peer[0]}:{peer[1]}"
            threading.Thread(target=self._serve, args=(conn, name), name=f"conn-{name}",
                             daemon=True).start()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        if self.tls is not None:
            # handshake in this connection's thread, bounded, so a silent peer cannot
            # stall the accept loop; a peer without a valid certificate is dropped here
            raw = conn
            try:
                raw.settimeout(self.frame_timeout)
                conn = self.tls.wrap_socket(raw, server_side=True)
                conn.settimeout(self.idle_timeout)
            except (OSError, ValueError) as err:
                log.warning("TLS handshake with %s failed: %s", peer, err)
                with self._lock:
                    self._conns.discard(raw)
                raw.close()
                return
            with self._lock:
                self._conns.discard(raw)
                self._conns.add(conn)
        try:
            while not self._stop.is_set():
                try:
                    frame = recv_frame(conn, max_body=self.max_body,
                                       max_header=self.max_header,
                                       frame_timeout=self.frame_timeout)
                except ConnectionClosed:
                    return
                except ProtocolError as err:
                    log.warning("rejected frame from %s: %s", peer, err)
                    self._reply(conn, {"type": "error", "code": err.code,
                                       "message": str(err)})
                    _linger(conn)
                    return
                except OSError:
                    return
                try:
                    reply = self.handler(frame, peer)
                except Exception as err:  # a handler bug must not kill the server
                    log.exception("handler failed for a frame from %s", peer)
                    reply = {"type": "error", "code": "internal",
                             "message": f"{err.__class__.__name__}: {err}"}
                after = None
                if isinstance(reply, tuple):  # (reply, work to do once it is sent)
                    reply, after = reply
                if reply is not None and not self._reply(conn, reply):
                    return
                if after is not None:
                    after()
                if reply is not None and reply.get("close"):
                    return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    @staticmethod
    def _reply(conn: socket.socket, header: dict[str, Any]) -> bool:
        try:
            send_frame(conn, header)
            return True
        except OSError:
            return False


def _linger(conn: socket.socket, limit: int = 1 << 20, seconds: float = 0.5) -> None:
    """Half-close and drain a little before closing after a rejected frame.

    Closing a socket with unread input makes the kernel send a reset, which can destroy
    the error frame before the peer reads it; draining (bounded in bytes and time) lets
    the peer see why it was refused.
    """
    try:
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(seconds)
        deadline = time.monotonic() + seconds
        drained = 0
        while drained < limit and time.monotonic() < deadline:
            chunk = conn.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass
