"""The connection pool does not keep descriptors for peers that went away."""

from __future__ import annotations

import socket
import threading
import time

from runtime.pool import ConnectionPool
from runtime.transport import recv_frame


def _listener() -> tuple[socket.socket, tuple[str, int]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    return srv, srv.getsockname()


def _accept_one(srv: socket.socket) -> None:
    conn, _ = srv.accept()
    recv_frame(conn, max_body=1 << 20)
    conn.close()  # the peer goes away after one frame (a closed executor)
    srv.close()


def test_idle_connections_to_peers_that_closed_are_swept():
    pool = ConnectionPool(timeout=5.0, sweep_every=0.0)
    for _ in range(12):  # twelve clients come and go, each with a new reply address
        srv, addr = _listener()
        t = threading.Thread(target=_accept_one, args=(srv,))
        t.start()
        pool.send(addr, {"type": "result"})
        t.join(5)
    time.sleep(0.2)  # let the last close reach us
    srv, addr = _listener()
    t = threading.Thread(target=_accept_one, args=(srv,))
    t.start()
    pool.send(addr, {"type": "result"})  # returning this connection sweeps the dead ones
    t.join(5)
    assert pool.idle_count <= 1
    pool.close()


def test_the_pool_keeps_at_most_max_addresses():
    pool = ConnectionPool(timeout=5.0, max_addresses=3, sweep_every=3600.0)
    servers = []
    for _ in range(6):
        srv, addr = _listener()
        servers.append(srv)
        pool.send(addr, {"type": "result"})  # accepted by the backlog, never read
    assert pool.idle_count == 3
    pool.close()
    for srv in servers:
        srv.close()


def test_a_closed_server_stops_its_accept_thread():
    # a thread blocked in accept() kept the server and its owner (an executor) alive
    # after close(): benchmarks/soak.py saw ~1.9 MB kept per executor opened and closed
    from runtime.server import FrameServer, bind_listener

    server = FrameServer(bind_listener("127.0.0.1", 0), lambda frame, peer: None,
                         max_body=1024).start()
    time.sleep(0.1)  # the accept thread is now blocked in accept()
    server.close()
    server._thread.join(5)
    assert not server._thread.is_alive()
