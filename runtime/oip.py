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
so a lying or giant shape is one ``INVALID_ARGUMENT`` line, never a traceback.

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
from stagebundle.errors import UserError

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


def _dims(shape: Any, where: str, name: str) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints, refusing ranks above 16 (no int64 maths)."""
    dims = tuple(int(d) for d in shape)
    if len(dims) > _MAX_RANK or any(d < 0 for d in dims):
        raise UserError(f"{where}: tensor {name}: bad shape {list(dims)}")
    return dims


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

    def _runner(self, name: str, context: grpc.ServicerContext) -> StageRunner:
        for (plan, sid), runner in list(self.worker.runners.items()):
            if name in self._names(plan, sid):
                return runner
        context.abort(grpc.StatusCode.NOT_FOUND,
                      f"model {name!r} is not a stage served by device {self.worker.device}")
        raise AssertionError  # abort raises

    # --------------------------------------------------------------- health
    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._auth(context)
        return pb.ServerReadyResponse(ready=self.worker.ready)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._auth(context)
        ok = any(request.name in self._names(p, s) for p, s in list(self.worker.runners))
        return pb.ModelReadyResponse(ready=ok and self.worker.ready)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._auth(context)
        return pb.ServerMetadataResponse(name=f"runtime-{self.worker.device}", version="1",
                                         extensions=[])

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        self._auth(context)
        runner = self._runner(request.name, context)
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
        runner = self._runner(request.model_name, context)
        specs = {t.name: t for t in runner.stage.inputs}
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "raw_input_contents must hold one entry per input")
        feeds: dict[str, np.ndarray] = {}
        where = f"{request.model_name} request {request.id or '?'}"
        try:
            for i, inp in enumerate(request.inputs):
                spec = specs.get(inp.name)
                if spec is None:
                    raise UserError(f"{where}: unexpected tensor {inp.name!r}")
                if inp.name in feeds:
                    raise UserError(f"{where}: tensor {inp.name!r} given twice")
                dtype = _NUMPY.get(inp.datatype)
                if dtype is None:
                    raise UserError(f"{where}: tensor {inp.name}: datatype {inp.datatype!r} "
                                    f"is not supported")
                shape = _dims(inp.shape, where, inp.name)
                if dtype != spec.dtype:  # (the wording of stages.check_tensor)
                    raise UserError(f"{where}: tensor {inp.name} has dtype {dtype}, "
                                    f"expected {spec.dtype}")
                if list(shape) != list(spec.shape):
                    raise UserError(f"{where}: tensor {inp.name} has shape {list(shape)}, "
                                    f"expected {list(spec.shape)}")
                if raw:
                    buf = raw[i]
                    expected = math.prod(shape) * np.dtype(dtype).itemsize
                    if len(buf) != expected:
                        raise UserError(f"{where}: tensor {inp.name}: {len(buf)} B for "
                                        f"shape {list(shape)} {inp.datatype}")
                    arr = np.frombuffer(buf, dtype=dtype)
                else:
                    field = _CONTENTS.get(inp.datatype)
                    if field is None:
                        raise UserError(f"{where}: tensor {inp.name}: {inp.datatype} needs "
                                        f"raw_input_contents")
                    values = getattr(inp.contents, field)
                    if len(values) != math.prod(shape):
                        raise UserError(f"{where}: tensor {inp.name}: {len(values)} values "
                                        f"for shape {list(shape)}")
                    arr = np.asarray(values, dtype=dtype)
                arr = arr.reshape(shape)
                check_tensor(spec, arr, where)
                feeds[inp.name] = arr
            missing = [n for n in specs if n not in feeds]
            if missing:
                raise UserError(f"{where}: missing input tensor {missing[0]}")
        except UserError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        try:
            outs = runner.run(feeds)
        except Exception as err:  # ORT failure on checked input: report, keep serving
            context.abort(grpc.StatusCode.INTERNAL, f"{where}: {err.__class__.__name__}")
        wanted = [o.name for o in request.outputs] or list(outs)
        unknown = [n for n in wanted if n not in outs]
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{where}: unknown output {unknown[0]!r}")
        resp = pb.ModelInferResponse(model_name=request.model_name, model_version="1",
                                     id=request.id)
        for name in wanted:
            arr = np.ascontiguousarray(outs[name])
            resp.outputs.append(pb.ModelInferResponse.InferOutputTensor(
                name=name, datatype=TRITON_DTYPES[arr.dtype.name], shape=list(arr.shape)))
            resp.raw_output_contents.append(arr.tobytes())
        return resp


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
