"""Denial of service without the token, on real loopback sockets (issue 15).

Each test attacks a :class:`runtime.server.FrameServer` the way a peer without the token
can (idle sockets, dribbled or short frames, huge declared bodies, memory floods) and then
checks that a client holding the token is still served. Counts and limits are small so the
tests stay fast; no test asserts a wall-clock time (client read timeouts only detect a
server that would hold a connection open).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from runtime.protocol import MAGIC, PREFIX, VERSION
from runtime.security import token_matches
from runtime.server import FrameServer, bind_listener
from runtime.transport import ConnectionClosed, connect, recv_frame, send_frame

TOKEN = "dos-test-token"


def _handler(frame, peer):
    if frame.header.get("type") == "health":
        return {"type": "health", "live": True}
    if frame.header.get("token") != TOKEN:  # what a worker does after the server
        return {"type": "error", "code": "unauthorized", "close": True}
    return {"type": "pong", "n": int(sum(t.size for t in frame.tensors.values()))}


@pytest.fixture()
def serve() -> Iterator:
    servers: list[FrameServer] = []

    def start(**kwargs) -> FrameServer:
        kwargs.setdefault("max_body", 1 << 20)
        kwargs.setdefault("token", TOKEN)
        srv = FrameServer(bind_listener("127.0.0.1", 0), _handler, **kwargs).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()


def _ping(srv: FrameServer, tensors=None, timeout: float = 10.0) -> dict:
    with connect(srv.address, timeout) as sock:
        send_frame(sock, {"type": "ping", "token": TOKEN}, tensors)
        return _reply(sock)


def _reply(sock: socket.socket) -> dict:
    header = recv_frame(sock, max_body=0).header
    header.pop("tensors", None)
    return header


def _raw(srv: FrameServer, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(srv.address, timeout=timeout)
    sock.settimeout(timeout)
    return sock


def _frame_bytes(header: dict, body_len: int) -> bytes:
    head = json.dumps(header).encode()
    return PREFIX.pack(MAGIC, VERSION, 0, 0, len(head), body_len) + head


def _closed_by_server(sock: socket.socket) -> str:
    """Read until the server closes; returns the error code it sent (or "eof")."""
    try:
        frame = recv_frame(sock, max_body=0, frame_timeout=10.0)
    except ConnectionClosed:
        return "eof"
    except OSError as err:  # reset by the server: closed as well
        if isinstance(err, TimeoutError):
            raise AssertionError("the server kept the connection open") from None
        return "reset"
    return str(frame.header.get("code"))


@pytest.mark.parametrize("limits", [
    {},  # the defaults: 300 idle sockets from one peer are over its per-peer bound
    {"max_connections": 40, "max_per_peer": 1000},  # the total bound alone
])
def test_idle_sockets_do_not_lock_out_a_client(serve, limits) -> None:
    srv = serve(**limits)
    idle = [_raw(srv) for _ in range(300)]
    try:
        reply = _ping(srv, {"x": np.arange(10, dtype=np.float32)})
        assert reply == {"type": "pong", "n": 10}
        assert srv.stats["evicted"] > 0
        assert srv.open_connections <= srv.max_connections
    finally:
        for s in idle:
            s.close()


def test_a_first_frame_in_flight_outlives_a_flood(serve) -> None:
    """A new client half-way through its first (authenticated) frame is evicted last."""
    from runtime.protocol import encode

    srv = serve(max_connections=40, max_per_peer=1000)
    arr = np.arange(50_000, dtype=np.float32)
    data = b"".join(bytes(b) for b in encode({"type": "ping", "token": TOKEN}, {"x": arr}))
    with _raw(srv) as client:
        client.sendall(data[:4096])  # header checked, body being read
        time.sleep(0.3)
        idle = [_raw(srv) for _ in range(300)]
        try:
            client.sendall(data[4096:])
            assert _reply(client) == {"type": "pong", "n": 50_000}
            assert srv.stats["evicted"] > 0
        finally:
            for s in idle:
                s.close()


def test_proven_connections_are_kept_and_a_full_server_says_busy(serve) -> None:
    srv = serve(max_connections=2)
    pooled = [connect(srv.address, 10.0) for _ in range(2)]
    try:
        for sock in pooled:  # each carries an authenticated request: proven
            send_frame(sock, {"type": "ping", "token": TOKEN})
            assert recv_frame(sock, max_body=0).header["type"] == "pong"
        with _raw(srv) as newcomer:
            assert _closed_by_server(newcomer) == "busy"
        for sock in pooled:  # still served: a newcomer never evicts a proven connection
            send_frame(sock, {"type": "ping", "token": TOKEN})
            assert recv_frame(sock, max_body=0).header["type"] == "pong"
        assert srv.stats["refused_busy"] == 1
    finally:
        for sock in pooled:
            sock.close()


def test_unproven_idle_connection_gets_a_short_timeout(serve) -> None:
    srv = serve(first_frame_timeout=0.3, idle_timeout=600.0)
    with _raw(srv) as silent:
        assert _closed_by_server(silent) in ("eof", "reset")
    with connect(srv.address, 10.0) as sock:  # a health probe does not prove anything
        send_frame(sock, {"type": "health"})
        assert recv_frame(sock, max_body=0).header["live"] is True
        assert _closed_by_server(sock) in ("eof", "reset")
    with connect(srv.address, 10.0) as sock:  # an authenticated request does
        send_frame(sock, {"type": "ping", "token": TOKEN})
        recv_frame(sock, max_body=0)
        time.sleep(0.6)
        send_frame(sock, {"type": "ping", "token": TOKEN})
        assert recv_frame(sock, max_body=0).header["type"] == "pong"


def test_dribbled_frame_is_closed_by_its_deadline(serve) -> None:
    srv = serve(frame_timeout=1.0)
    data = _frame_bytes({"type": "ping", "token": TOKEN}, 0)
    sent = 0
    with _raw(srv) as sock:
        try:
            for byte in data:  # one byte every 0.1 s: each read is quick, the frame is not
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.1)
        except OSError:
            pass  # the server closed it
        assert sent < len(data)
        assert _closed_by_server(sock) in ("truncated", "eof", "reset")
    assert _ping(srv)["type"] == "pong"


@pytest.mark.parametrize("part", [5, PREFIX.size + 3])  # in the prefix, in the header
def test_short_frames_are_closed_by_the_header_deadline(serve, part) -> None:
    srv = serve(frame_timeout=600.0, header_timeout=0.3)
    with _raw(srv) as sock:
        sock.sendall(_frame_bytes({"type": "ping", "token": TOKEN}, 0)[:part])
        assert _closed_by_server(sock) in ("truncated", "eof", "reset")


def test_token_is_checked_before_the_body_is_read(serve) -> None:
    srv = serve(max_body=1 << 30)
    for header in ({"type": "infer"}, {"type": "infer", "token": "wrong"},
                   {"type": "infer", "token": "\ud800"}):  # a lone surrogate: no traceback
        with _raw(srv) as sock:
            sock.sendall(_frame_bytes(header, 1 << 30))  # ... and never the 1 GiB body
            assert _closed_by_server(sock) == "unauthorized"
    assert srv.stats["refused_token"] == 3
    assert not token_matches(TOKEN, "\ud800")
    assert _ping(srv)["type"] == "pong"


def test_huge_declared_body_is_a_refusal_not_a_crash(serve) -> None:
    # a lying manifest can raise the body cap to 1e18 B: allocation fails -> "busy"
    srv = serve(max_body=1 << 62)
    with _raw(srv) as sock:
        sock.sendall(_frame_bytes({"type": "ping", "token": TOKEN}, 1 << 61))
        assert _closed_by_server(sock) == "busy"
    srv = serve(max_body=1 << 20, max_buffered=1 << 16)  # larger than the whole budget
    with _raw(srv) as sock:
        sock.sendall(_frame_bytes({"type": "ping", "token": TOKEN}, 1 << 17))
        assert _closed_by_server(sock) == "too_large"
    assert _ping(srv)["type"] == "pong"


def test_bodies_in_flight_are_bounded(serve) -> None:
    srv = serve(max_body=1 << 20, max_buffered=1 << 20, header_timeout=0.5,
                frame_timeout=30.0)
    header = {"type": "ping", "token": TOKEN}
    with _raw(srv) as first, _raw(srv) as second:
        first.sendall(_frame_bytes(header, 700_000) + b"\0" * 1000)  # holds 700 kB, stalls
        time.sleep(0.2)
        second.sendall(_frame_bytes(header, 700_000))
        assert _closed_by_server(second) == "busy"  # no room within its header deadline
        first.sendall(b"\0" * (700_000 - 1000))  # the first completes normally
        assert _reply(first) == {"type": "pong", "n": 0}


def test_many_attackers_at_once_then_a_client(serve) -> None:
    srv = serve(frame_timeout=2.0, header_timeout=0.5, first_frame_timeout=0.5)
    socks: list[socket.socket] = []

    def attack(kind: int) -> None:
        for _ in range(20):
            s = _raw(srv)
            socks.append(s)
            try:
                if kind == 0:
                    s.sendall(b"DN")  # a short frame
                elif kind == 1:
                    s.sendall(_frame_bytes({"type": "ping"}, 1 << 19))  # no token
            except OSError:
                pass

    threads = [threading.Thread(target=attack, args=(k % 3,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert _ping(srv, {"x": np.zeros(1000, np.float32)}) == {"type": "pong", "n": 1000}
    finally:
        for s in socks:
            s.close()


def test_a_real_worker_survives_idle_sockets_and_odd_tokens(tmp_path) -> None:
    """The same attacks on a worker (its FrameServer as the worker builds it)."""
    from runtime.worker import Worker
    from tests.test_runtime_fixtures import TOKEN as WORKER_TOKEN
    from tests.test_runtime_fixtures import build

    built = build(tmp_path / "b", fallbacks=False)
    worker = Worker(built.bundle, "hub", token=WORKER_TOKEN).start()
    idle: list[socket.socket] = []
    try:
        idle = [socket.create_connection(worker.address, timeout=10) for _ in range(300)]
        for token in ("\ud800", "wrong", None):
            with connect(worker.address, 10.0) as sock:
                send_frame(sock, {"type": "ready", "token": token})
                assert recv_frame(sock, max_body=0).header["code"] == "unauthorized"
        with connect(worker.address, 10.0) as sock:
            send_frame(sock, {"type": "ready", "token": WORKER_TOKEN})
            reply = recv_frame(sock, max_body=0).header
        assert reply["type"] == "ready" and reply["ready"] is True
    finally:
        for s in idle:
            s.close()
        worker.close()
