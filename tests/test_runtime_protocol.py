"""Unit tests of the frame protocol, the transport, the token policy and the stage view."""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from partitioner.errors import UserError
from runtime.pool import ConnectionPool
from runtime.protocol import MAGIC, PREFIX, VERSION, ProtocolError, decode_tensors, encode
from runtime.security import check_bind, load_token, token_matches
from runtime.transport import (
    ConnectionClosed,
    connect,
    parse_address,
    recv_frame,
    send_frame,
    set_timeout,
)


def _roundtrip(tensors: dict, header: dict | None = None):
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(5)
        b.settimeout(5)
        t = threading.Thread(target=send_frame, args=(a, header or {"type": "x"}, tensors))
        t.start()
        frame = recv_frame(b, max_body=1 << 26)
        t.join()
    return frame


def test_roundtrip_dtypes_shapes_and_zero_copy() -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "img": rng.standard_normal((1, 3, 224, 224)).astype(np.float32),
        "ids": rng.integers(-5, 5, (2, 7)).astype(np.int64),
        "mask": rng.integers(0, 2, (3, 5)).astype(bool),
        "half": rng.standard_normal((3,)).astype(np.float16),
        "empty": np.zeros((0, 4), np.float32),
        "scalar": np.array(3.5, np.float64),
        "strided": np.arange(24, dtype=np.int32).reshape(4, 6)[:, ::2],  # not contiguous
    }
    frame = _roundtrip(tensors, {"type": "infer", "id": "r1"})
    assert frame.header["id"] == "r1"
    assert list(frame.tensors) == list(tensors)
    for name, arr in tensors.items():
        got = frame.tensors[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)
    # aligned offsets, and the big tensor is a view of the frame body (no copy)
    assert all(d["offset"] % 64 == 0 for d in frame.header["tensors"])
    assert frame.tensors["img"].base is not None


def _frame_doc(descs: list[dict], body_len: int) -> tuple[dict, bytearray]:
    return {"type": "infer", "tensors": descs}, bytearray(body_len)


@pytest.mark.parametrize(("desc", "body", "message"), [
    ({"name": "a", "dtype": "object", "shape": [1], "offset": 0, "nbytes": 8}, 8, "dtype"),
    ({"name": "a", "dtype": "float32", "shape": [2], "offset": 0, "nbytes": 4}, 8,
     "does not match"),
    ({"name": "a", "dtype": "float32", "shape": [-1], "offset": 0, "nbytes": 4}, 8,
     "bad shape"),
    ({"name": "a", "dtype": "float32", "shape": [True], "offset": 0, "nbytes": 4}, 8,
     "bad shape"),
    ({"name": "a", "dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16}, 8,
     "outside the body"),
    ({"name": "", "dtype": "float32", "shape": [1], "offset": 0, "nbytes": 4}, 8, "name"),
    ({"name": "a", "dtype": "float32", "shape": [1], "offset": -4, "nbytes": 4}, 8,
     "offset"),
])
def test_decode_rejects_lying_descriptors(desc, body, message) -> None:
    header, buf = _frame_doc([desc], body)
    with pytest.raises(ProtocolError, match=message):
        decode_tensors(header, buf)


def test_decode_rejects_overlap_and_repeats() -> None:
    d = {"name": "a", "dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8}
    header, buf = _frame_doc([d, {**d, "name": "b", "offset": 4}], 16)
    with pytest.raises(ProtocolError, match="overlapping"):
        decode_tensors(header, buf)
    header, buf = _frame_doc([d, {**d, "offset": 8}], 16)
    with pytest.raises(ProtocolError, match="repeated"):
        decode_tensors(header, buf)


def test_prefix_caps_bad_magic_truncation_and_eof() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        a.sendall(PREFIX.pack(MAGIC, VERSION, 0, 0, 10, 1 << 40))
        with pytest.raises(ProtocolError, match="exceeds the cap") as err:
            recv_frame(b, max_body=1 << 20)
        assert err.value.code == "too_large"
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        a.sendall(PREFIX.pack(b"HTTP", VERSION, 0, 0, 10, 0))
        with pytest.raises(ProtocolError, match="magic"):
            recv_frame(b, max_body=1 << 20)
    a, b = socket.socketpair()
    with b:
        b.settimeout(5)
        head = json.dumps({"type": "x"}).encode()
        a.sendall(PREFIX.pack(MAGIC, VERSION, 0, 0, len(head), 100) + head + b"\0" * 10)
        a.close()
        with pytest.raises(ProtocolError, match="truncated") as err:
            recv_frame(b, max_body=1 << 20)
        assert err.value.code == "truncated"
    a, b = socket.socketpair()
    with b:
        a.close()
        with pytest.raises(ConnectionClosed):
            recv_frame(b, max_body=1)


def test_stalled_frame_times_out_as_truncated() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(PREFIX.pack(MAGIC, VERSION, 0, 0, 50, 0)[:10])
        with pytest.raises(ProtocolError, match="truncated"):
            recv_frame(b, max_body=1, frame_timeout=0.2)


def _kernel_timeout_of(sock: socket.socket) -> float:
    sec, usec = struct.unpack("@ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                                     struct.calcsize("@ll")))
    return sec + usec / 1e6


@pytest.mark.parametrize("kernel", [False, True])  # Python's timeout mode / set_timeout's
@pytest.mark.parametrize("nbytes", [1000, 300_000])  # read with its header / after it
@pytest.mark.parametrize("cuts", [(3,), (20, 27), (25, -700), (-1,)])
def test_a_frame_arriving_in_bursts_is_read_whole(nbytes: int, cuts: tuple[int, ...],
                                                  kernel: bool) -> None:
    """The rest of a frame is first taken as far as it already waits in the socket, then
    waited for: any split of the bytes (in the prefix, the header, the body) gives the
    same frame, and the socket keeps its own timeout (Python's, or the kernel's that
    set_timeout gave a blocking socket)."""
    if kernel and not sys.platform.startswith("linux"):
        pytest.skip("kernel timeouts are used on Linux only")
    arr = np.arange(nbytes // 4, dtype=np.float32)
    data = b"".join(bytes(b) for b in encode({"type": "x", "id": "r1"}, {"t": arr}))
    bounds = [0, *sorted(c % len(data) for c in cuts), len(data)]
    a, b = socket.socketpair()
    with a, b:
        if kernel:
            set_timeout(b, 7.0)
            assert b.gettimeout() is None and _kernel_timeout_of(b) == 7.0
        else:
            b.settimeout(7.0)

        def dribble() -> None:
            for lo, hi in zip(bounds, bounds[1:], strict=False):
                a.sendall(data[lo:hi])
                threading.Event().wait(0.05)

        t = threading.Thread(target=dribble)
        t.start()
        frame = recv_frame(b, max_body=1 << 22, frame_timeout=5.0)
        t.join()
        if kernel:
            assert b.gettimeout() is None and _kernel_timeout_of(b) == 7.0
        else:
            assert b.gettimeout() == 7.0
    assert frame.header["id"] == "r1"
    np.testing.assert_array_equal(frame.tensors["t"], arr)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel timeouts: Linux")
def test_a_connection_waits_with_kernel_timeouts_and_says_timeout() -> None:
    """connect() gives a blocking socket whose reads and writes the kernel times; an idle
    read runs out as TimeoutError (what Python's timeouts raise), not BlockingIOError,
    and a frame that stalls half-way is still cut off by its own deadline."""
    srv = socket.create_server(("127.0.0.1", 0))
    with srv:
        client = connect(srv.getsockname()[:2], 0.3)
        peer, _ = srv.accept()
        with client, peer:
            assert client.gettimeout() is None and _kernel_timeout_of(client) == 0.3
            with pytest.raises(TimeoutError):
                recv_frame(client, max_body=1)
            peer.sendall(PREFIX.pack(MAGIC, VERSION, 0, 0, 50, 0) + b"{")
            with pytest.raises(ProtocolError, match="truncated"):
                recv_frame(client, max_body=1, frame_timeout=0.2)
            assert _kernel_timeout_of(client) == 0.3  # its own timeout again


def test_deeply_nested_header_is_malformed_not_a_crash() -> None:
    from runtime.protocol import parse_header

    with pytest.raises(ProtocolError, match="not valid JSON"):
        parse_header(b"[" * 200_000 + b"]" * 200_000)


def test_encode_refuses_object_arrays() -> None:
    with pytest.raises(ProtocolError, match="cannot be sent"):
        encode({"type": "x"}, {"o": np.array([object()])})


def test_pool_reconnects_after_the_peer_restarts() -> None:
    got: list[dict] = []

    def serve(srv: socket.socket, n: int) -> None:
        for _ in range(n):
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(5)
                got.append(recv_frame(conn, max_body=1 << 10).header)

    srv = socket.create_server(("127.0.0.1", 0))
    addr = srv.getsockname()[:2]
    t = threading.Thread(target=serve, args=(srv, 2))
    t.start()
    pool = ConnectionPool(timeout=5)
    pool.send(addr, {"type": "a"})
    import time

    time.sleep(0.1)  # the peer closed its end after one frame: the pooled socket is stale
    pool.send(addr, {"type": "b"})
    t.join(5)
    srv.close()
    pool.close()
    assert [h["type"] for h in got] == ["a", "b"]


def test_tokens_and_bind_policy(tmp_path) -> None:
    assert token_matches(None, None)
    assert token_matches("abc", "abc")
    assert not token_matches("abc", "abd") and not token_matches("abc", None)
    assert not token_matches("abc", 123)
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "tok")
    with pytest.raises(UserError, match="non-loopback"):
        check_bind("0.0.0.0", None)
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        load_token(tmp_path / "empty")
    with pytest.raises(UserError, match="cannot read"):
        load_token(tmp_path / "missing")
    (tmp_path / "t").write_text("tok\n")
    assert load_token(tmp_path / "t") == "tok"
    assert parse_address("[::1]:80") == ("::1", 80)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("nohost")


# ---------------------------------------------------------------- DAG carry (forwarding)


def _dag_model(path) -> None:
    """x -> convA -> reluA -> convB -> add(reluA) -> convC(+x via add); outputs: C and A.

    A model input used by the last layer and an early activation that is both a residual
    and a model output: both must ride along the chain.
    """
    rng = np.random.default_rng(1)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.2,
                                       name)

    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["ca"], name="convA", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ca"], ["a"], name="reluA"),
        helper.make_node("Conv", ["a", "wb"], ["cb"], name="convB", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["cb", "a"], ["b"], name="addB"),
        helper.make_node("Conv", ["b", "wc"], ["cc"], name="convC", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["cc", "x"], ["y"], name="addC"),
    ]
    graph = helper.make_graph(
        nodes, "dag", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, 8, 8])],
        [w("wa", 3, 3, 3, 3), w("wb", 3, 3, 3, 3), w("wc", 3, 3, 3, 3)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def test_dag_bundle_forwards_live_tensors(tmp_path) -> None:
    from partitioner import ir
    from partitioner.backend import compile_bundle
    from partitioner.frontend import load_model
    from runtime.executor import LocalExecutor, RemoteExecutor
    from runtime.stages import open_bundle
    from runtime.transport import format_address
    from runtime.worker import Worker

    _dag_model(tmp_path / "dag.onnx")
    prepared = load_model(tmp_path / "dag.onnx")
    assert len(prepared.graph.layers) == 3
    # device p runs stages 0 and 2 (one worker, two stages), q runs stage 1
    plan = ir.Plan("optimal", "latency", (ir.Stage("p", None, 0, 0), ir.Stage("q", None, 1, 1),
                                          ir.Stage("p", None, 2, 2)),
                   ir.Estimate(0.0, 0.0, 0.0, 0.0, 0.0), 0.0)
    bundle = compile_bundle(prepared, plan, None, tmp_path / "b")
    view = open_bundle(bundle)
    # direct sends: x and a stay on p for stage 2 (same worker), a goes to the output from
    # stage 0; q gets only what it reads and sends only b (schema 1 relayed x and a via q)
    sent = [{p.name for s in u.sends for p in s.tensors} for u in view.units()]
    assert sent == [{"x", "a"}, {"b"}, {"y"}]
    assert {s.to for s in view.bundle.unit("0").sends} == {"1", "2", "output"}
    x = np.random.default_rng(2).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = dict(zip(["y", "a"], ort.InferenceSession(str(tmp_path / "dag.onnx")).run(
        ["y", "a"], {"x": x}), strict=True))
    with LocalExecutor(bundle) as ex:
        out = ex.infer({"x": x})
    workers = [Worker(bundle, d).start() for d in ("p", "q")]
    assert len(workers[0].runners) == 2
    try:
        hosts = {w.device: format_address(w.address) for w in workers}
        with RemoteExecutor(bundle, hosts, timeout=10) as ex:
            remote = ex.infer({"x": x})
            assert [t["device"] for t in ex.records[-1]["timings"]] == ["p", "q", "p"]
    finally:
        for w in workers:
            w.close()
    for got in (out, remote):
        assert set(got) == {"y", "a"}
        for k in ref:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-5)
