"""The KServe / Triton Open Inference Protocol (v2) over gRPC, for a worker's stages.

A stock ``tritonclient.grpc`` client can check a worker's liveness and readiness, read a
stage's metadata and run ``ModelInfer`` on it. Each stage the worker serves is a model
named as in the bundle's Triton repositories, ``<model>_stage<id>`` (see
:func:`triton_name`), version ``1``, so one client works
against this port and against Triton; ``stage<id>`` is accepted as an alias. Fallback
plans prefix ``<fallback>.`` to both. Only the service stubs that ``tritonclient`` ships
(``service_pb2`` / ``service_pb2_grpc``) are used.

Requests are checked before any array is built: datatype, rank, every dimension
non-negative and the element count computed on Python integers (``np.prod`` on int64
wraps round for a shape like ``[2**62, 4]``) and compared with the stage's declared shape,
so a lying or giant shape is one ``INVALID_ARGUMENT`` line, never a traceback. What a
request echoes into an error (names, its id) is escaped and cut short (:func:`_clip`): a
giant or multi-line id stays a short one-line status, within gRPC's metadata limit.
Ambiguous requests are refused, not guessed at: raw and typed contents together, typed
contents in another field than the datatype's, a version other than ``1``, an output asked
for twice, shared-memory or classification parameters (not served here). Calls this
server does not implement answer ``UNIMPLEMENTED`` in one line (no logged traceback).

With TLS (``--tls-*``) the port presents the node certificate; a stock client must be
given the CA (``root_certificates``) and, because clients check the host name, the
certificate must name the address the client dials: ``runtime certs SYSTEM -o DIR``
(:mod:`runtime.certs`) makes certificates with those IP SANs.

Security matches the TCP port: the same bind policy, the token as gRPC metadata
``authorization: Bearer <token>`` (all calls but ``ServerLive``), tensors checked against
the manifest before ONNX Runtime sees them, and message caps sized from the stages
(instead of gRPC's 4 MB default, too small for a 1x64x112x112 float32 activation).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

from runtime.security import token_matches
from runtime.stages import StageRunner, check_tensor
from stagebundle.errors import UserError, fail

if TYPE_CHECKING:
    from runtime.worker import Worker

__all__ = ["OipServer", "start_oip_server", "model_name", "model_names", "triton_name",
           "TRITON_DTYPES"]

log = logging.getLogger("runtime.oip")

TRITON_DTYPES = {
    "bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
    "uint64": "UINT64", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
    "float16": "FP16", "float32": "FP32", "float64": "FP64",
}
_NUMPY = {v: k for k, v in TRITON_DTYPES.items()}
# typed "contents" fields of InferTensorContents, for clients that do not send raw bytes
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
             "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
             "UINT16": "uint_contents", "UINT32": "uint_contents",
             "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


def model_names(plan: str, stage_id: str, triton_name: str | None = None) -> tuple[str, ...]:
    """The OIP names of a stage: its Triton name first, then the ``stage<id>`` alias.

    ``resnet18_stage1`` and ``stage1`` for the main plan; ``without-hub.resnet18_stage1``
    and ``without-hub.stage1`` for a fallback plan. Without a Triton name only the alias.
    """
    names = [f"stage{stage_id}"]
    if triton_name:
        names.insert(0, triton_name)
    if plan != "main":
        prefix = plan.split("/", 1)[-1]
        names = [f"{prefix}.{n}" for n in names]
    return tuple(names)


def model_name(plan: str, stage_id: str, triton_name: str | None = None) -> str:
    """The name a stage is listed under (see :func:`model_names`)."""
    return model_names(plan, stage_id, triton_name)[0]


def triton_name(bundle: Any, stage_id: str) -> str | None:
    """The Triton model name of a whole stage of ``bundle`` (a loaded manifest).

    The folder the compiler's Triton back end recorded (``triton/<device>/<name>``) when
    the bundle has one; else the back end's naming rule, when the compiler is installed
    (imported here, at the first request, so that ``runtime serve`` starts without it).
    """
    if not stage_id.isdigit():
        return None  # a part of a split stage: no Triton model of its own
    for stage in getattr(bundle, "stages", ()):
        folder = getattr(stage, "triton", None)
        if str(getattr(stage, "id", "")) == stage_id and isinstance(folder, str) and folder:
            return PurePosixPath(folder).name
    model = getattr(getattr(bundle, "model", None), "name", None)
    if not isinstance(model, str) or not model:
        return None
    try:
        from partitioner.backend.triton import triton_model_name
    except ImportError:  # a lean worker without the compiler: the alias only
        return None
    return triton_model_name(model, int(stage_id))


_MAX_RANK = 16
_MAX_RPCS = 32  # requests in the OIP server at once (4 run, the rest wait)
_VERSIONS = ("", "1")  # every stage is version 1; "" asks for the latest
_CLIP = 64  # characters of a client's string echoed into an error
# parameters of a tensor this server does not serve: refused, not silently ignored
_UNSERVED = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset",
             "classification")
# the numpy type of a typed contents field (its values are range-checked against the
# tensor's dtype before the cast: np.asarray([300], dtype=uint8) raises OverflowError)
_FIELD_DTYPES = {"bool_contents": "bool", "int_contents": "int32",
                 "int64_contents": "int64", "uint_contents": "uint32",
                 "uint64_contents": "uint64", "fp32_contents": "float32",
                 "fp64_contents": "float64"}


def _clip(value: str, limit: int = _CLIP) -> str:
    """A client's string for an error line: control and non-ASCII characters escaped,
    cut to ``limit`` characters (a status message travels in gRPC metadata, 16 KiB)."""
    text = value.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + "..."


def _dims(shape: Any, where: str, name: str) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints, refusing ranks above 16 (no int64 maths)."""
    if len(shape) > _MAX_RANK:  # (not echoed: a rank of 100000 would be a huge message)
        fail(f"{where}: tensor {name}: bad shape of rank {len(shape)} (at most {_MAX_RANK})")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        fail(f"{where}: tensor {name}: bad shape {list(dims)}")
    return dims


def _unserved(params: Any, where: str, what: str) -> None:
    for key in _UNSERVED:
        if key in params:
            fail(f"{where}: {what}: parameter {key!r} is not supported by this server")


def _from_contents(inp: Any, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """The typed ``contents`` of ``inp`` (no raw bytes given) as an array of ``dtype``."""
    name = _clip(inp.name)
    field = _CONTENTS.get(inp.datatype)
    if field is None:
        fail(f"{where}: tensor {name}: {inp.datatype} needs raw_input_contents")
    given = [f.name for f, _ in inp.contents.ListFields()]
    if any(g != field for g in given):
        fail(f"{where}: tensor {name}: {inp.datatype} values go in contents.{field}, "
             f"found {', '.join(given)}")
    values = getattr(inp.contents, field)
    if len(values) != math.prod(shape):
        fail(f"{where}: tensor {name}: {len(values)} values for shape {list(shape)}")
    wide = np.asarray(values, dtype=_FIELD_DTYPES[field])
    if wide.dtype.kind in "iu" and wide.size and np.dtype(dtype) != wide.dtype:
        info = np.iinfo(dtype)
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            fail(f"{where}: tensor {name}: a value is out of range for {inp.datatype}")
    return wide.astype(dtype, copy=False)


class _Servicer(pbg.GRPCInferenceServiceServicer):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._triton: dict[tuple[str, str], str | None] = {}  # (plan, stage) -> name

    def _names(self, plan: str, stage_id: str) -> tuple[str, ...]:
        key = (plan, stage_id)
        if key not in self._triton:
            bundle = getattr(self.worker.views.get(plan), "bundle", None)
            self._triton[key] = triton_name(bundle, stage_id)
        return model_names(plan, stage_id, self._triton[key])

    # --------------------------------------------------------------- helpers
    def _auth(self, context: grpc.ServicerContext) -> None:
        if self.worker.token is None:
            return
        meta = dict(context.invocation_metadata())
        given = str(meta.get("authorization", ""))
        token = given[7:] if given.startswith("Bearer ") else None
        if not token_matches(self.worker.token, token):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

    def _runner(self, name: str, version: str,
                context: grpc.ServicerContext) -> StageRunner:
        for (plan, sid), runner in list(self.worker.runners.items()):
            if name in self._names(plan, sid):
                if version not in _VERSIONS:
                    context.abort(grpc.StatusCode.NOT_FOUND,
                                  f"model {name} has no version '{_clip(version)}' (only 1)")
                return runner
        context.abort(grpc.StatusCode.NOT_FOUND, f"model '{_clip(name)}' is not a stage "
                                                 f"served by device {self.worker.device}")
        raise AssertionError  # abort raises

    # --------------------------------------------------------------- health
    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._auth(context)
        return pb.ServerReadyResponse(ready=self.worker.ready)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._auth(context)
        ok = request.version in _VERSIONS and any(
            request.name in self._names(p, s) for p, s in list(self.worker.runners))
        return pb.ModelReadyResponse(ready=ok and self.worker.ready)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._auth(context)
        return pb.ServerMetadataResponse(name=f"runtime-{self.worker.device}", version="1",
                                         extensions=[])

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._auth(context)
        runner = self._runner(request.name, request.version, context)
        meta = pb.ModelMetadataResponse.TensorMetadata

        def tensors(specs: Any) -> list[Any]:
            return [meta(name=t.name, datatype=TRITON_DTYPES[t.dtype], shape=list(t.shape))
                    for t in specs]

        return pb.ModelMetadataResponse(name=request.name, versions=["1"],
                                        platform="onnxruntime_onnx",
                                        inputs=tensors(runner.stage.inputs),
                                        outputs=tensors(runner.stage.outputs))

    # --------------------------------------------------------------- inference
    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._auth(context)
        runner = self._runner(request.model_name, request.model_version, context)
        where = f"{request.model_name} request {_clip(request.id) or '?'}"
        try:
            feeds = self._feeds(request, runner, where)
            wanted = self._wanted(request, runner, where)
        except UserError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        try:
            outs = runner.run(feeds)
        except Exception as err:  # ORT failure on checked input: report, keep serving
            context.abort(grpc.StatusCode.INTERNAL, f"{where}: {err.__class__.__name__}")
        resp = pb.ModelInferResponse(model_name=request.model_name, model_version="1",
                                     id=request.id)
        for name in wanted or list(outs):
            arr = np.ascontiguousarray(outs[name])
            resp.outputs.append(pb.ModelInferResponse.InferOutputTensor(
                name=name, datatype=TRITON_DTYPES[arr.dtype.name], shape=list(arr.shape)))
            resp.raw_output_contents.append(arr.tobytes())
        return resp

    @staticmethod
    def _feeds(request: Any, runner: StageRunner, where: str) -> dict[str, np.ndarray]:
        """The request's input tensors, checked against the stage (UserError if not)."""
        specs = {t.name: t for t in runner.stage.inputs}
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            fail(f"{where}: raw_input_contents must hold one entry per input "
                 f"({len(raw)} for {len(request.inputs)})")
        feeds: dict[str, np.ndarray] = {}
        for i, inp in enumerate(request.inputs):
            name = _clip(inp.name)
            spec = specs.get(inp.name)
            if spec is None:
                fail(f"{where}: unexpected tensor '{name}'")
            if inp.name in feeds:
                fail(f"{where}: tensor '{name}' given twice")
            _unserved(inp.parameters, where, f"tensor {name}")
            dtype = _NUMPY.get(inp.datatype)
            if dtype is None:
                fail(f"{where}: tensor {name}: datatype '{_clip(inp.datatype)}' "
                     f"is not supported")
            shape = _dims(inp.shape, where, name)
            if dtype != spec.dtype:  # (the wording of stages.check_tensor)
                fail(f"{where}: tensor {name} has dtype {dtype}, expected {spec.dtype}")
            if list(shape) != list(spec.shape):
                fail(f"{where}: tensor {name} has shape {list(shape)}, "
                     f"expected {list(spec.shape)}")
            if raw:
                if inp.contents.ListFields():
                    fail(f"{where}: tensor {name}: both raw_input_contents and typed "
                         f"contents given")
                buf = raw[i]
                expected = math.prod(shape) * np.dtype(dtype).itemsize
                if len(buf) != expected:
                    fail(f"{where}: tensor {name}: {len(buf)} B for "
                         f"shape {list(shape)} {inp.datatype}")
                arr = np.frombuffer(buf, dtype=dtype)
            else:
                arr = _from_contents(inp, dtype, shape, where)
            arr = arr.reshape(shape)
            check_tensor(spec, arr, where)
            feeds[inp.name] = arr
        missing = [n for n in specs if n not in feeds]
        if missing:
            fail(f"{where}: missing input tensor {missing[0]}")
        return feeds

    @staticmethod
    def _wanted(request: Any, runner: StageRunner, where: str) -> list[str]:
        """The outputs asked for (empty: all), each once and each one of the stage's."""
        known = {t.name for t in runner.stage.outputs}
        wanted: list[str] = []
        for out in request.outputs:
            if out.name not in known:
                fail(f"{where}: unknown output '{_clip(out.name)}'")
            if out.name in wanted:  # each copy would be one more copy of the tensor sent
                fail(f"{where}: output {out.name} asked for twice")
            _unserved(out.parameters, where, f"output {out.name}")
            wanted.append(out.name)
        return wanted


def _unimplemented(name: str) -> Any:
    def method(self: _Servicer, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not served by this worker")

    method.__name__ = name
    return method


def _answer_unimplemented(servicer: type[_Servicer]) -> None:
    """The stub's default for a call not served raises NotImplementedError, which gRPC
    logs with a traceback on every such call: answer UNIMPLEMENTED in one line instead."""
    for name in [n for n in vars(pbg.GRPCInferenceServiceServicer)
                 if n[:1].isupper() and n not in vars(servicer)]:
        setattr(servicer, name, _unimplemented(name))


_answer_unimplemented(_Servicer)


class OipServer:
    """A running gRPC server (``address``; ``stop()``)."""

    def __init__(self, server: grpc.Server, address: tuple[str, int]) -> None:
        self.server = server
        self.address = address

    def stop(self) -> None:
        self.server.stop(grace=0.5)


def start_oip_server(worker: Worker, host: str, port: int) -> OipServer:
    """Serve ``worker``'s stages over OIP/gRPC on ``host:port`` (0: any free port)."""
    cap = max(worker.views[p].incoming_bytes(r.stage)
              + sum(t.nbytes for t in r.stage.outputs)
              for (p, _), r in worker.runners.items()) + (1 << 20)
    cap = min(cap, (1 << 31) - 1)  # gRPC takes an int32
    if port:  # a taken port: one line here, not gRPC's own log line and exception
        from runtime.server import bind_listener

        try:
            bind_listener(host, port).close()
        except OSError as err:
            raise UserError(f"--grpc-port {port}: cannot listen on {host}:{port} "
                            f"({err.strerror or err})") from err
    # bounded like the TCP port: RPCs beyond the cap get RESOURCE_EXHAUSTED (a typed
    # "busy") instead of queueing without end; idle connections are closed after a minute
    server = grpc.server(cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="oip"),
                         options=[("grpc.max_receive_message_length", cap),
                                  ("grpc.max_send_message_length", cap),
                                  ("grpc.max_concurrent_streams", 16),
                                  ("grpc.max_connection_idle_ms", 60_000)],
                         maximum_concurrent_rpcs=_MAX_RPCS)
    pbg.add_GRPCInferenceServiceServicer_to_server(_Servicer(worker), server)
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    refused = UserError(f"--grpc-port {port}: cannot listen on {host}:{port} (the port is "
                        f"taken or the address is not this host's)")
    try:
        if worker.tls is not None:
            bound = server.add_secure_port(target, worker.tls.grpc_server_credentials())
        else:
            bound = server.add_insecure_port(target)
    except RuntimeError as err:  # recent grpcio raises where older ones answered 0
        raise refused from err
    if bound == 0:
        raise refused
    server.start()
    log.info("OIP/gRPC for device %s on %s:%d", worker.device, host, bound)
    return OipServer(server, (host, bound))
