"""Malformed requests to the OIP/gRPC port and the metrics HTTP port (found by a fuzzer).

Each gRPC case sends one bad request, holding the token, to an in-process hub worker of
tiny_cnn's bundle and checks that it gets the right status with a short one-line message,
that nothing is logged with a traceback, and that a valid request right after still gets
ONNX Runtime's answer. The metrics cases check that stalled, surplus and vanished clients
are closed, refused or ignored without a traceback. Cases are fixed and no test asserts
a time.
"""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from runtime.metrics import MetricsServer
from stagebundle.errors import UserError
from tests.test_runtime_fixtures import TOKEN, Built, build, sample

AUTH = (("authorization", f"Bearer {TOKEN}"),)
HUGE = 100_000  # characters: far above gRPC's 16 KiB metadata limit if echoed


# ------------------------------------------------------------------------- OIP / gRPC
@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("oip-fuzz-bundle"), fallbacks=False)


class Hub:
    def __init__(self, built: Built) -> None:
        self.grpc = pytest.importorskip("grpc")
        pytest.importorskip("tritonclient.grpc")
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        from runtime.worker import Worker

        self.pb = service_pb2
        s0 = ort.InferenceSession(str(next(built.bundle.glob("stage0_*.onnx"))))
        self.s1 = ort.InferenceSession(str(next(built.bundle.glob("stage1_*.onnx"))))
        self.input = self.s1.get_inputs()[0].name
        self.output = self.s1.get_outputs()[0].name
        self.x = s0.run(None, {s0.get_inputs()[0].name: sample(2)})[0]
        self.ref = self.s1.run(None, {self.input: self.x})[0]
        self.worker = Worker(built.bundle, "hub", token=TOKEN, grpc_port=0).start()
        addr = self.worker.grpc_address
        assert addr is not None
        self.channel = self.grpc.insecure_channel(f"127.0.0.1:{addr[1]}")
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.worker.close()

    def good(self) -> Any:
        req = self.pb.ModelInferRequest(model_name="stage1", id="fuzz")
        req.inputs.append(self.pb.ModelInferRequest.InferInputTensor(
            name=self.input, datatype="FP32", shape=list(self.x.shape)))
        req.raw_input_contents.append(self.x.tobytes())
        return req

    def call(self, method: str, req: Any) -> tuple[Any, str, Any]:
        """(status code, details, response or None) of one call with the token."""
        try:
            resp = getattr(self.stub, method)(req, metadata=AUTH, timeout=30)
        except self.grpc.RpcError as err:
            return err.code(), err.details() or "", None
        return self.grpc.StatusCode.OK, "", resp

    def still_serves(self) -> None:
        code, details, resp = self.call("ModelInfer", self.good())
        assert code == self.grpc.StatusCode.OK, details
        got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(self.ref.shape)
        np.testing.assert_allclose(got, self.ref, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def hub(chain: Built) -> Iterator[Hub]:
    h = Hub(chain)
    yield h
    h.close()


def _refused(hub: Hub, method: str, req: Any, code: str, match: str,
             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        got, details, _ = hub.call(method, req)
    assert got == getattr(hub.grpc.StatusCode, code), details
    assert match in details
    assert "\n" not in details and "Traceback" not in details and len(details) < 300
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    hub.still_serves()


def _edit(hub: Hub, **fields: Any) -> Any:
    req = hub.good()
    for key, value in fields.items():
        setattr(req, key, value)
    return req


def test_echoed_strings_are_clipped_to_one_short_line(hub: Hub, caplog) -> None:
    """A giant name or id used to be echoed whole into the status: the client got gRPC's
    'metadata size exceeds hard limit' (RESOURCE_EXHAUSTED) instead of the error; a
    newline in the id made the message two lines."""
    _refused(hub, "ModelInfer", _edit(hub, model_name="m" * HUGE), "NOT_FOUND",
             "not a stage", caplog)
    _refused(hub, "ModelMetadata", hub.pb.ModelMetadataRequest(name="m\n" * HUGE),
             "NOT_FOUND", "not a stage", caplog)
    req = hub.good()
    req.inputs[0].name = "n" * HUGE
    _refused(hub, "ModelInfer", req, "INVALID_ARGUMENT", "unexpected tensor", caplog)
    req = hub.good()
    req.inputs[0].datatype = "D" * HUGE
    _refused(hub, "ModelInfer", req, "INVALID_ARGUMENT", "not supported", caplog)
    req = hub.good()
    req.outputs.add().name = "o" * HUGE
    _refused(hub, "ModelInfer", req, "INVALID_ARGUMENT", "unknown output", caplog)
    for rid in ("i" * HUGE, "line one\nline two"):
        req = _edit(hub, id=rid)
        req.inputs[0].datatype = "FP64"
        _refused(hub, "ModelInfer", req, "INVALID_ARGUMENT", "dtype float64", caplog)
    req = hub.good()
    req.inputs[0].shape.extend([1] * HUGE)
    _refused(hub, "ModelInfer", req, "INVALID_ARGUMENT", "rank", caplog)
    # a giant id on a valid request is echoed back in the response, as asked
    code, _, resp = hub.call("ModelInfer", _edit(hub, id="i" * HUGE))
    assert code == hub.grpc.StatusCode.OK and resp.id == "i" * HUGE


def test_a_version_other_than_1_is_not_found(hub: Hub, caplog) -> None:
    """Versions were ignored: version 7 of stage1 ran stage1."""
    _refused(hub, "ModelInfer", _edit(hub, model_version="7"), "NOT_FOUND", "version",
             caplog)
    _refused(hub, "ModelMetadata", hub.pb.ModelMetadataRequest(name="stage1", version="9"),
             "NOT_FOUND", "version", caplog)
    for version, ready in (("9", False), ("1", True), ("", True)):
        code, _, resp = hub.call("ModelReady",
                                 hub.pb.ModelReadyRequest(name="stage1", version=version))
        assert code == hub.grpc.StatusCode.OK and resp.ready is ready
    code, _, _ = hub.call("ModelInfer", _edit(hub, model_version="1"))
    assert code == hub.grpc.StatusCode.OK


def test_ambiguous_contents_are_refused(hub: Hub, caplog) -> None:
    """Raw and typed contents together (raw won silently), or typed values in a field of
    another type next to the right one (ignored silently)."""
    values = hub.x.ravel().tolist()
    req = hub.good()
    req.inputs[0].contents.fp32_contents.extend([1.0])
    _refused(hub, "ModelInfer", req, "INVALID_ARGUMENT", "both raw", caplog)
    req = hub.good()
    del req.raw_input_contents[:]
    req.inputs[0].contents.fp32_contents.extend(values)
    req.inputs[0].contents.int_contents.extend([1] * len(values))
    _refused(hub, "ModelInfer", req, "INVALID_ARGUMENT", "fp32_contents", caplog)
    req = hub.good()
    del req.raw_input_contents[:]
    req.inputs[0].contents.fp32_contents.extend(values)
    code, details, resp = hub.call("ModelInfer", req)  # typed alone: served
    assert code == hub.grpc.StatusCode.OK, details
    np.testing.assert_allclose(np.frombuffer(resp.raw_output_contents[0], np.float32),
                               hub.ref.ravel(), rtol=1e-6, atol=1e-6)


def test_unserved_parameters_and_repeated_outputs_are_refused(hub: Hub, caplog) -> None:
    """Shared-memory and classification parameters were ignored (the client then reads
    a region nobody wrote); an output asked for N times was sent N times (20000 copies
    of a tensor built in memory before gRPC refused the oversized response)."""
    req = hub.good()
    req.inputs[0].parameters["shared_memory_region"].string_param = "shm0"
    _refused(hub, "ModelInfer", req, "INVALID_ARGUMENT", "shared_memory_region", caplog)
    for key in ("shared_memory_region", "classification"):
        req = hub.good()
        req.outputs.add(name=hub.output).parameters[key].string_param = "1"
        _refused(hub, "ModelInfer", req, "INVALID_ARGUMENT", key, caplog)
    req = hub.good()
    for _ in range(20_000):
        req.outputs.add(name=hub.output)
    _refused(hub, "ModelInfer", req, "INVALID_ARGUMENT", "twice", caplog)
    req = hub.good()
    req.parameters["junk"].string_param = "z" * 1000  # request-level junk: ignored
    assert hub.call("ModelInfer", req)[0] == hub.grpc.StatusCode.OK


def test_calls_not_served_are_unimplemented_without_a_traceback(hub: Hub, caplog) -> None:
    """The stub's default raised NotImplementedError: gRPC logged a traceback per call."""
    for method, req in (("ModelConfig", hub.pb.ModelConfigRequest(name="stage1")),
                        ("RepositoryIndex", hub.pb.RepositoryIndexRequest()),
                        ("ModelStatistics", hub.pb.ModelStatisticsRequest(name="x"))):
        _refused(hub, method, req, "UNIMPLEMENTED", method, caplog)


def test_typed_integers_out_of_range_are_refused() -> None:
    """int_contents of an INT8 tensor holding 1000: numpy raised OverflowError (an
    UNKNOWN status and a traceback) instead of a refusal."""
    pytest.importorskip("tritonclient.grpc")
    from tritonclient.grpc import service_pb2 as pb

    from runtime.oip import _from_contents

    def tensor(datatype: str, field: str, values: list[int]) -> Any:
        t = pb.ModelInferRequest.InferInputTensor(name="t", datatype=datatype,
                                                  shape=[len(values)])
        getattr(t.contents, field).extend(values)
        return t

    for datatype, dtype, field, values in (("INT8", "int8", "int_contents", [1000]),
                                           ("INT16", "int16", "int_contents", [-40000]),
                                           ("UINT8", "uint8", "uint_contents", [256])):
        with pytest.raises(UserError, match="out of range"):
            _from_contents(tensor(datatype, field, values), dtype, (len(values),), "w")
    arr = _from_contents(tensor("INT8", "int_contents", [5, -128, 127]), "int8", (3,), "w")
    assert arr.dtype == np.int8 and arr.tolist() == [5, -128, 127]


# ------------------------------------------------------------------------- metrics HTTP
@pytest.fixture()
def metrics() -> Iterator[MetricsServer]:
    server = MetricsServer("127.0.0.1", 0, lambda: {"device": "t"}, timeout=0.2,
                           max_connections=2).start()
    yield server
    server.close()


def _scrape(server: MetricsServer, tries: int = 200) -> int:
    """The status of GET /metrics, retried while the server is busy (503)."""
    for _ in range(tries):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.address[1]}/metrics",
                                        timeout=30) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            if err.code != 503:
                return int(err.code)
            err.close()
    return 503


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_a_stalled_connection_is_closed(metrics: MetricsServer) -> None:
    """A partial request that stalls was held open for ever (slowloris)."""
    with socket.create_connection(metrics.address, timeout=30) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nX-Slow: ")
        assert _read_all(sock) == b""  # closed by the server (else: socket timeout)
    assert _scrape(metrics) == 200


def test_connections_above_the_cap_are_refused() -> None:
    """Every connection got a thread, without bound (1500 stalled clients: 1500 threads)."""
    server = MetricsServer("127.0.0.1", 0, lambda: {"device": "t"}, timeout=30,
                           max_connections=2).start()
    try:
        held = [socket.create_connection(server.address, timeout=30) for _ in range(2)]
        for s in held:
            s.sendall(b"GET /metrics HTTP/1.0\r\n")
        with socket.create_connection(server.address, timeout=30) as extra:
            assert _read_all(extra).startswith(b"HTTP/1.0 503")
        for s in held:
            s.close()
        assert _scrape(server) == 200
    finally:
        server.close()


def test_other_methods_get_405(metrics: MetricsServer) -> None:
    """POST/HEAD/... were answered 501 Unsupported method."""
    with socket.create_connection(metrics.address, timeout=30) as sock:
        sock.sendall(b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.0 405") and b"Allow: GET" in reply


def test_a_client_gone_mid_answer_is_no_traceback(metrics: MetricsServer, capfd,
                                                  caplog) -> None:
    """A client that reset the connection made socketserver print a traceback."""
    http = metrics._http
    with caplog.at_level(logging.DEBUG, logger="runtime.metrics"):
        for err in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset"),
                    TimeoutError("timed out")):
            try:
                raise err
            except OSError:
                http.handle_error(None, ("127.0.0.1", 1))
    assert "Traceback" not in capfd.readouterr().err
    assert len([r for r in caplog.records if "metrics 127.0.0.1" in r.getMessage()]) == 3
    try:  # a real bug still prints its traceback
        raise ValueError("a bug")
    except ValueError:
        http.handle_error(None, ("127.0.0.1", 1))
    assert "ValueError: a bug" in capfd.readouterr().err
    assert _scrape(metrics) == 200

