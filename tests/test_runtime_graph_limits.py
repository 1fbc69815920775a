"""Bounds and edges of the stage-graph worker: queue depth (busy), inbox cap, expired
inboxes, a lean import set for `runtime serve`, one-line CLI errors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.protocol import Frame
from runtime.server import FrameServer, bind_listener
from runtime.transport import connect, format_address, recv_frame, send_frame
from runtime.worker import Worker
from tests.test_runtime_fixtures import ROOT, TOKEN
from tests.test_runtime_graph_fixtures import skip_bundle

FULL = (1, 4, 8, 8)


class Replies:
    """A real reply address (and stand-in next hop) that records every frame's header."""

    def __init__(self) -> None:
        self.headers: list[dict[str, Any]] = []
        self._cv = threading.Condition()
        self.server = FrameServer(bind_listener("127.0.0.1", 0), self._on,
                                  max_body=1 << 20).start()
        self.address = format_address(self.server.address)

    def _on(self, frame: Frame, peer: str) -> None:
        with self._cv:
            self.headers.append(frame.header)
            self._cv.notify_all()

    def wait(self, count: int, kind: str, seconds: float = 10.0) -> list[dict[str, Any]]:
        end = time.monotonic() + seconds
        with self._cv:
            while True:
                got = [h for h in self.headers if h.get("type") == kind]
                if len(got) >= count or time.monotonic() > end:
                    return got
                self._cv.wait(0.1)


@pytest.fixture()
def replies():
    r = Replies()
    yield r
    r.server.close()


def _send(worker: Worker, header: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict:
    with connect(worker.address, 10.0) as sock:
        send_frame(sock, {"type": "infer", "token": TOKEN, "ack": True, "plan": "main",
                          "attempt": 1, **header}, tensors)
        return recv_frame(sock, max_body=0, frame_timeout=10.0).header


def _a() -> np.ndarray:
    return np.ones(FULL, np.float32)


def test_full_unit_queue_holds_back_then_refuses_busy(tmp_path, replies) -> None:
    built = skip_bundle(tmp_path / "m")
    hub = Worker(built.bundle, "hub", token=TOKEN, queue_depth=1).start()
    try:
        lock = hub.locks[("main", "1")]
        lock.acquire()  # the unit is "computing": nothing leaves its queue
        answers = [_send(hub, {"id": f"r{i}", "unit": "1", "from": "0", "budget": 20,
                               "route": {"cloud": replies.address},
                               "reply": replies.address}, {"a": _a()}) for i in range(4)]
        kinds = [a["type"] if a["type"] == "accepted" else a["code"] for a in answers]
        busy = [a for a in answers if a.get("code") == "busy"]
        assert kinds.count("accepted") >= 1 and busy, kinds
        assert set(kinds) == {"accepted", "busy"}
        assert all("requests queued" in a["message"] and a["device"] == "hub" for a in busy)
        assert hub.stats["busy"] == len(busy)
        lock.release()
        # what was admitted runs and is sent on to the cloud (here: the reply server)
        sent = replies.wait(kinds.count("accepted"), "infer")
        assert sorted(h["id"] for h in sent) == sorted(
            f"r{i}" for i, k in enumerate(kinds) if k == "accepted")
        assert all(h["unit"] == "2" and h["from"] == "1" for h in sent)
    finally:
        hub.close()


def test_inboxes_are_capped_and_expire(tmp_path, replies) -> None:
    built = skip_bundle(tmp_path / "m")
    cloud = Worker(built.bundle, "cloud", token=TOKEN, max_inboxes=2).start()
    try:
        common = {"unit": "2", "from": "0", "budget": 0.5, "route": {},
                  "reply": replies.address}
        answers = [_send(cloud, {"id": f"q{i}", **common}, {"s": _a()}) for i in range(3)]
        assert [a["type"] for a in answers[:2]] == ["accepted", "accepted"]
        assert answers[2]["code"] == "busy" and "waiting for their senders" in \
            answers[2]["message"]
        # stage 1 never sends: both inboxes are dropped at their deadline, and reported
        errors = [h for h in replies.wait(3, "error") if h.get("code") == "deadline"]
        assert sorted(h["id"] for h in errors) == ["q0", "q1"]
        assert all("waiting for 1" in h["message"] for h in errors)
        assert cloud.stats["expired"] == 2
        with connect(cloud.address, 5.0) as sock:
            send_frame(sock, {"type": "ready", "token": TOKEN})
            ready = recv_frame(sock, max_body=0).header
        assert ready["waiting"] == 0 and ready["waiting_bytes"] == 0
        # a message the plan does not declare is refused, naming the request
        bad = _send(cloud, {"id": "q9", **common, "from": "1"}, {"s": _a()})
        assert bad["code"] == "bad_request" and "q9" in bad["message"]
    finally:
        cloud.close()


LEAN_CHECK = """
import json, os, signal, sys, threading, time
from pathlib import Path
from runtime.cli import main
pf, out = Path(sys.argv[2]), Path(sys.argv[3])
def watch():
    while not pf.exists():
        time.sleep(0.05)
    heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "mip", "networkx")
             or m.startswith(("partitioner.solver", "partitioner.frontend",
                              "partitioner.backend", "partitioner.analysis"))]
    out.write_text(json.dumps(heavy))
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
sys.exit(main(["serve", sys.argv[1], "--device", "hub", "--port-file", str(pf),
               "--grpc-port", "0", "--quiet"]))
"""


def test_serve_imports_no_compiler(tmp_path) -> None:
    built = skip_bundle(tmp_path / "m")
    out = tmp_path / "modules.json"
    res = subprocess.run([sys.executable, "-c", LEAN_CHECK, str(built.bundle),
                          str(tmp_path / "port.json"), str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text()) == []


def test_cli_unwritable_output_and_busy_port_are_one_line(tmp_path, capsys) -> None:
    from runtime.cli import main

    built = skip_bundle(tmp_path / "m")
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    (tmp_path / "file").write_text("not a folder")
    for target in (tmp_path / "file" / "o.npz", tmp_path / "nowhere" / "o.npz"):
        code = main(["run", str(built.bundle), "--local", "--input",
                     f"x={tmp_path / 'x.npy'}", "-o", str(target)])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "-o" in err, err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code = main(["serve", str(built.bundle), "--device", "hub", "--listen",
                     f"127.0.0.1:{port}"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"--listen 127.0.0.1:{port}: cannot listen there" in err
        code = main(["run", str(built.bundle), "--hosts",
                     "edge=127.0.0.1:1,hub=127.0.0.1:1,cloud=127.0.0.1:1", "--input",
                     f"x={tmp_path / 'x.npy'}", "--listen", f"127.0.0.1:{port}", "-o",
                     str(tmp_path / "o.npz")])
        err = capsys.readouterr().err
        assert code == 2 and "cannot listen there" in err and len(err.strip().splitlines()) == 1
    assert not list(Path(tmp_path).glob("*.npz"))


def test_inbox_bytes_are_capped(tmp_path, replies) -> None:
    built = skip_bundle(tmp_path / "m")
    one = _a().nbytes
    cloud = Worker(built.bundle, "cloud", token=TOKEN, max_inbox_bytes=one + one // 2).start()
    try:
        common = {"unit": "2", "from": "0", "budget": 30, "route": {},
                  "reply": replies.address}
        first = _send(cloud, {"id": "m0", **common}, {"s": _a()})
        second = _send(cloud, {"id": "m1", **common}, {"s": _a()})
        assert first["type"] == "accepted"
        assert second["code"] == "busy" and "MiB of requests waiting" in second["message"]
        # the held request completes when its other sender comes; the cap frees up
        done = _send(cloud, {"id": "m0", **common, "from": "1"}, {"b": _a()})
        assert done["type"] == "accepted"
        assert _send(cloud, {"id": "m1", **common}, {"s": _a()})["type"] == "accepted"
        results = replies.wait(1, "result")
        assert [h["id"] for h in results] == ["m0"] and results[0]["from"] == "2"
    finally:
        cloud.close()
