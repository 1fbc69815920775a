"""Malformed frames from a client holding the token (found by a wire fuzzer).

Each case sends one bad frame to real in-process workers of tiny_cnn's bundle (edge,
hub, cloud) and checks that it gets a typed ``error`` frame (or is accepted where the
junk is harmless), that nothing is logged with a traceback or over more than one line,
that no thread dies, and that a valid request right after still gets ONNX Runtime's
answer. The cases are fixed (no randomness) and no test asserts a time.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.protocol import (
    PREFIX,
    Frame,
    ProtocolError,
    decode_tensors,
    encode,
    pack_prefix,
    parse_header,
)
from runtime.server import FrameServer, bind_listener
from runtime.stages import merge_timings
from runtime.transport import ConnectionClosed, format_address, parse_address, recv_frame
from runtime.worker import Worker
from tests.test_runtime_fixtures import TOKEN, build, reference, sample

DEVICES = ("edge", "hub", "cloud")
HUGE_INT = b"1" * 5000  # more digits than Python turns into an int (4300)


class Replies:
    """The executor's side: a reply address that records every frame by request id."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self._cv = threading.Condition()
        self.server = FrameServer(bind_listener("127.0.0.1", 0), self._on, max_body=1 << 20,
                                  token=TOKEN).start()
        self.address = format_address(self.server.address)

    def _on(self, frame: Frame, peer: str) -> None:
        with self._cv:
            self.frames.append(frame)
            self._cv.notify_all()

    def wait(self, rid: str, seconds: float = 10.0) -> Frame | None:
        end = time.monotonic() + seconds
        with self._cv:
            while True:
                got = [f for f in self.frames if f.header.get("id") == rid]
                if got or time.monotonic() > end:
                    return got[0] if got else None
                self._cv.wait(0.05)


class Net:
    def __init__(self, root: Path) -> None:
        self.built = build(root, fallbacks=False)
        self.replies = Replies()
        self.workers = {d: Worker(self.built.bundle, d, token=TOKEN, threads=1).start()
                        for d in DEVICES}
        self.route = {d: format_address(w.address) for d, w in self.workers.items()}
        self.x = sample(0)
        self.want = reference(self.built.model, self.x)
        self.ids = iter(range(1 << 30))

    def header(self, **over: Any) -> dict[str, Any]:
        h = {"type": "infer", "id": f"r{next(self.ids)}", "attempt": 1, "plan": "main",
             "unit": "0", "from": "input", "route": dict(self.route),
             "reply": self.replies.address, "budget": 10.0, "token": TOKEN, "timings": [],
             "ack": True, "timed": False, "rows": {"input": None}}
        h.update(over)
        return h

    def send(self, data: bytes, device: str = "edge") -> dict[str, Any] | None:
        """One frame on a new connection; the answer's header, None when closed."""
        with socket.create_connection(self.workers[device].address, timeout=10) as sock:
            sock.settimeout(10)
            sock.sendall(data)
            try:
                return recv_frame(sock, max_body=0, frame_timeout=10.0).header
            except (ConnectionClosed, OSError):
                return None

    def infer(self, **over: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        h = self.header(**over)
        return h, self.send(frame(h, {"input": self.x}))

    def check_serving(self) -> None:
        """A valid request gets the whole model's answer; no inbox or lock is left."""
        h, answer = self.infer()
        assert answer is not None and answer["type"] == "accepted", answer
        result = self.replies.wait(h["id"])
        assert result is not None and result.header["type"] == "result", result
        np.testing.assert_allclose(result.tensors["logits"], self.want, atol=1e-5)
        for w in self.workers.values():
            assert settled(w), (w.device, w.waiting.usage())
            assert all(t.is_alive() for t in w._threads)

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
        self.replies.server.close()


def settled(worker: Worker, seconds: float = 10.0) -> bool:
    """Whether the worker holds no inbox and no unit lock (waiting a little: a unit's lock
    is released just after its last message went out)."""
    end = time.monotonic() + seconds
    while worker.waiting.usage() != (0, 0) or any(lk.locked() for lk in
                                                    worker.locks.values()):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def frame(header: dict[str, Any], tensors: dict[str, np.ndarray] | None = None,
          raw: dict[bytes, bytes] | None = None) -> bytes:
    """The bytes of one frame; ``raw`` replaces JSON strings in the header text (for
    what ``json.dumps`` cannot write, such as an integer of 5000 digits)."""
    chunks = [bytes(c) for c in encode(header, tensors)]
    if raw:
        head_len, body_len = PREFIX.unpack(chunks[0][:PREFIX.size])[4:]
        head = chunks[0][PREFIX.size:PREFIX.size + head_len]
        for old, new in raw.items():
            head = head.replace(b'"' + old + b'"', new)
        chunks[0] = pack_prefix(len(head), body_len) + head
    return b"".join(chunks)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    n = Net(tmp_path_factory.mktemp("wire-fuzz"))
    yield n
    n.close()


@pytest.fixture()
def clean(net: Net, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[list[str]]:
    """After the test: no thread died, no traceback or multi-line record was logged, and
    the workers still serve. The list collects thread deaths."""
    deaths: list[str] = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda a: deaths.append(f"{a.thread}: {a.exc_type}: {a.exc_value}"))
    caplog.set_level(logging.INFO)
    yield deaths
    time.sleep(0.1)  # reports sent after the answer (forwarding, notify) are logged
    net.check_serving()
    assert deaths == []
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in
                                                           caplog.records if r.exc_info]
    assert not [r for r in caplog.records if "\n" in r.getMessage()]


# ----------------------------------------------------------------------------- header


def test_an_integer_of_too_many_digits_is_malformed(net: Net, clean: list[str]) -> None:
    with pytest.raises(ProtocolError):
        parse_header(b'{"attempt": ' + HUGE_INT + b"}")
    for field in ("attempt", "id", "budget"):  # with the token, and without it
        h = net.header(**{field: "HUGE"})
        answer = net.send(frame(h, {"input": net.x}, raw={b"HUGE": HUGE_INT}))
        assert answer is not None and answer["code"] == "malformed", answer
        del h["token"]
        answer = net.send(frame(h, {"input": net.x}, raw={b"HUGE": HUGE_INT}))
        assert answer is not None and answer["code"] == "malformed", answer


@pytest.mark.parametrize("kind", [[], ["infer"], {}, {"a": 1}])
def test_a_type_that_is_no_string_is_refused(net: Net, clean: list[str], kind: Any) -> None:
    h, answer = net.infer(type=kind)
    assert answer is not None and answer["code"] == "bad_request", answer
    assert "unknown request type" in answer["message"]
    del h["token"]
    answer = net.send(frame(h, {"input": net.x}))
    assert answer is not None and answer["code"] == "unauthorized", answer


@pytest.mark.parametrize("rid", ["a\nb", "a\rb\x1b[2J", "\ud800"])
def test_a_request_id_with_control_characters_is_refused(net: Net, clean: list[str],
                                                         rid: str) -> None:
    _, answer = net.infer(id=rid, budget=-1)
    assert answer is not None and answer["code"] == "bad_request", answer
    assert answer["id"] == "?"
    _, answer = net.infer(id=rid)
    assert answer is not None and answer["code"] == "bad_request", answer
    assert "bad request id" in answer["message"]


@pytest.mark.parametrize("timings", [
    [{"stage": [1, 2], "device": "x"}],
    [{"stage": "s", "device": {"a": 1}}],
    [1, "a", None, [1], {"stage": [1], "device": {}}],
])
def test_timing_records_of_junk_are_dropped(net: Net, clean: list[str], timings: Any) -> None:
    h, answer = net.infer(timings=timings)
    assert answer is not None and answer["type"] == "accepted", answer
    result = net.replies.wait(h["id"])
    assert result is not None and result.header["type"] == "result"
    np.testing.assert_allclose(result.tensors["logits"], net.want, atol=1e-5)
    assert [t["stage"] for t in result.header["timings"]] == ["0", "1", "2"]
    into: list[dict[str, Any]] = []
    merge_timings(into, [*timings, {"stage": "0", "device": "edge"}])
    assert into == [{"stage": "0", "device": "edge"}]


# ----------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("host", ["a" * 300, "\ud800", "a\nb", "a\x00b"])
def test_an_address_the_socket_layer_cannot_take_is_a_bad_address(
        net: Net, clean: list[str], host: str) -> None:
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_address(f"{host}:1")
    # as the reply address: refused up front
    _, answer = net.infer(reply=f"{host}:1")
    assert answer is not None and answer["code"] == "bad_request", answer
    # in the route: the stage that sends there reports no_route to the reply address
    h, answer = net.infer(route={**net.route, "hub": f"{host}:1"})
    assert answer is not None and answer["type"] == "accepted", answer
    report = net.replies.wait(h["id"])
    assert report is not None and report.header["code"] == "no_route", report.header


def test_a_refusal_that_cannot_be_reported_is_one_log_line(
        net: Net, clean: list[str], caplog: pytest.LogCaptureFixture) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    closed = format_address(s.getsockname())
    s.close()
    caplog.clear()
    _, answer = net.infer(reply=closed, budget=-1)
    assert answer is not None and answer["code"] == "bad_request", answer
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("runtime")]
    assert len(lines) == 1 and "cannot report to" in lines[0], lines


# ----------------------------------------------------------------------------- bodies


@pytest.mark.parametrize("shape", [[0, 10 ** 30], [0, 2 ** 62, 2 ** 62], [0] + [2 ** 40] * 15])
def test_a_zero_size_tensor_with_huge_dimensions_is_malformed(net: Net, clean: list[str],
                                                              shape: list[int]) -> None:
    desc = {"name": "input", "dtype": "float32", "shape": shape, "offset": 0, "nbytes": 0}
    with pytest.raises(ProtocolError, match="bad shape"):
        decode_tensors({"tensors": [desc]}, b"")
    head = json.dumps({**net.header(), "tensors": [desc]}).encode()
    answer = net.send(pack_prefix(len(head), 0) + head)
    assert answer is not None and answer["code"] == "malformed", answer


# ----------------------------------------------------------------------------- other frames


def test_an_ensure_manifest_text_with_a_huge_integer_is_a_bad_plan(net: Net,
                                                                   clean: list[str]) -> None:
    header = {"type": "ensure", "token": TOKEN, "plan": "fallback/none",
              "manifest": '{"a": ' + "1" * 5000 + "}"}
    answer = net.send(frame(header))
    assert answer is not None and answer["code"] == "bad_plan", answer
    assert "not valid JSON" in answer["message"]


# ----------------------------------------------------------------------------- unit lock


def test_a_unit_lock_is_released_when_the_ack_cannot_be_sent(
        net: Net, clean: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer reset the connection before the worker's ``accepted`` went out: the
    request admitted to an idle unit still runs and its lock is released (it was kept,
    and the unit served nothing more)."""
    edge = net.workers["edge"]
    with monkeypatch.context() as m:
        m.setattr(edge.server, "_reply", lambda conn, header: False)  # the send fails
        h, answer = net.infer()
        assert answer is None  # closed without an answer
        result = net.replies.wait(h["id"])
    assert result is not None and result.header["type"] == "result"
    assert settled(edge)
