"""A stock ``tritonclient.grpc`` client talks to a worker (Open Inference Protocol v2)."""
# ruff: noqa: F811  (pytest fixtures are imported from tests.test_runtime_fixtures)

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from tests.test_runtime_fixtures import (  # noqa: F401  (fixtures)
    TOKEN,
    Cluster,
    built,
    cluster,
    sample,
)

grpcclient = pytest.importorskip("tritonclient.grpc")
InferenceServerException = pytest.importorskip(
    "tritonclient.utils").InferenceServerException

AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def client(cluster: Cluster):
    url = f"127.0.0.1:{cluster.info['hub']['grpc_port']}"
    c = grpcclient.InferenceServerClient(url=url)
    yield c
    c.close()


def _stage_input(built) -> np.ndarray:
    """What stage 1 receives: stage 0's output on a sample image."""
    s0 = ort.InferenceSession(str(built.bundle / "stage0_edge.onnx"))
    return s0.run(None, {s0.get_inputs()[0].name: sample(4)})[0]


def test_live_ready_metadata(client, built) -> None:
    assert client.is_server_live()  # liveness needs no token
    assert client.is_server_ready(headers=AUTH)
    assert client.is_model_ready("stage1", headers=AUTH)
    assert not client.is_model_ready("stage0", headers=AUTH)  # stage 0 runs on the edge
    meta = client.get_model_metadata("stage1", headers=AUTH, as_json=True)
    s1 = ort.InferenceSession(str(built.bundle / "stage1_hub.onnx"))
    assert [i["name"] for i in meta["inputs"]] == [i.name for i in s1.get_inputs()]
    assert meta["inputs"][0]["datatype"] == "FP32"
    assert [int(d) for d in meta["inputs"][0]["shape"]] == list(s1.get_inputs()[0].shape)
    assert [o["name"] for o in meta["outputs"]] == [o.name for o in s1.get_outputs()]


def test_infer_matches_the_stage_file(client, built) -> None:
    x = _stage_input(built)
    s1 = ort.InferenceSession(str(built.bundle / "stage1_hub.onnx"))
    name = s1.get_inputs()[0].name
    inp = grpcclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer("stage1", [inp], headers=AUTH, request_id="oip-1")
    for out in s1.get_outputs():
        np.testing.assert_allclose(res.as_numpy(out.name), s1.run([out.name], {name: x})[0],
                                   rtol=1e-6, atol=1e-6)
    assert res.get_response().id == "oip-1"


def test_bad_token_and_bad_tensor_are_refused(client, built) -> None:
    x = _stage_input(built)
    name = ort.InferenceSession(str(built.bundle / "stage1_hub.onnx")).get_inputs()[0].name
    inp = grpcclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="token"):
        client.infer("stage1", [inp], headers={"authorization": "Bearer wrong"})
    with pytest.raises(InferenceServerException, match="token"):
        client.get_model_metadata("stage1")
    bad = grpcclient.InferInput(name, [1, *x.shape[1:-1], 3], "FP32")
    bad.set_data_from_numpy(x[..., :3].copy())
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer("stage1", [bad], headers=AUTH)
    wrong = grpcclient.InferInput(name, list(x.shape), "INT32")
    wrong.set_data_from_numpy(x.view(np.int32))
    with pytest.raises(InferenceServerException, match="dtype int32"):
        client.infer("stage1", [wrong], headers=AUTH)
    with pytest.raises(InferenceServerException, match="not a stage"):
        client.infer("stage9", [inp], headers=AUTH)
    # and it still serves
    assert client.infer("stage1", [inp], headers=AUTH).as_numpy(
        ort.InferenceSession(str(built.bundle / "stage1_hub.onnx")).get_outputs()[0].name
    ) is not None


def test_triton_names_and_the_stage_alias(client, built) -> None:
    """The OIP port serves the names of the bundle's Triton repositories, plus stage<id>."""
    import json

    from partitioner.backend.triton import triton_model_name

    model = json.loads((built.bundle / "manifest.json").read_text())["model"]["name"]
    triton_name = triton_model_name(model, 1)
    assert triton_name != "stage1"
    for name in (triton_name, "stage1"):
        assert client.is_model_ready(name, headers=AUTH)
        assert client.get_model_metadata(name, headers=AUTH, as_json=True)["name"] == name
    assert not client.is_model_ready(triton_model_name(model, 0), headers=AUTH)  # edge's
    x = _stage_input(built)
    s1 = ort.InferenceSession(str(built.bundle / "stage1_hub.onnx"))
    inp = grpcclient.InferInput(s1.get_inputs()[0].name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = s1.get_outputs()[0].name
    np.testing.assert_allclose(client.infer(triton_name, [inp], headers=AUTH).as_numpy(out),
                               s1.run([out], {s1.get_inputs()[0].name: x})[0],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [
    [2 ** 62, 4],  # np.prod on int64 wraps round to 0: must not pass as an empty tensor
    [2 ** 31, 2 ** 31, 2 ** 31],  # giant, no wrap
    [-1, 16],  # reshape would infer it
    [1] * 40,  # rank
])
def test_lying_shapes_are_one_line_refusals(cluster: Cluster, built, shape) -> None:
    """Raw protobuf requests (a stock client checks shapes itself) with impossible shapes."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pbg

    name = ort.InferenceSession(str(built.bundle / "stage1_hub.onnx")).get_inputs()[0].name
    req = pb.ModelInferRequest(model_name="stage1", id="lie")
    req.inputs.append(pb.ModelInferRequest.InferInputTensor(name=name, datatype="FP32",
                                                            shape=shape))
    req.raw_input_contents.append(b"")
    with grpc.insecure_channel(f"127.0.0.1:{cluster.info['hub']['grpc_port']}") as channel:
        stub = pbg.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(req, metadata=tuple(AUTH.items()), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        message = err.value.details()
        assert "shape" in message and "\n" not in message and "Traceback" not in message
        # and the port still serves
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live


def test_large_tensors_pass_both_transports(tmp_path) -> None:
    """A 4.9 MB activation (above gRPC's 4 MB default) over OIP/gRPC and the TCP frames."""
    from onnx import TensorProto, helper, numpy_helper

    from partitioner import ir
    from partitioner.backend import compile_bundle
    from partitioner.frontend import load_model
    from runtime.executor import RemoteExecutor
    from runtime.transport import format_address
    from runtime.worker import Worker

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), n)
             for n in ("w1", "w2")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 640, 640])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 640, 640])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    import onnx

    onnx.save(model, str(tmp_path / "big.onnx"))
    prepared = load_model(tmp_path / "big.onnx")
    plan = ir.Plan("optimal", "latency", (ir.Stage("a", None, 0, 0), ir.Stage("b", None, 1, 1)),
                   ir.Estimate(0.0, 0.0, 0.0, 0.0, 0.0), 0.0)
    bundle = compile_bundle(prepared, plan, None, tmp_path / "bundle")
    x = rng.standard_normal((1, 3, 640, 640)).astype(np.float32)
    ref = ort.InferenceSession(str(tmp_path / "big.onnx")).run(None, {"x": x})[0]
    workers = [Worker(bundle, "a").start(), Worker(bundle, "b", grpc_port=0).start()]
    try:
        hosts = {w.device: format_address(w.address) for w in workers}
        with RemoteExecutor(bundle, hosts, timeout=20) as ex:
            np.testing.assert_allclose(ex.infer({"x": x})["y"], ref, rtol=1e-5, atol=1e-5)
        s1 = ort.InferenceSession(str(next(bundle.glob("stage1_*.onnx"))))
        mid = ort.InferenceSession(str(next(bundle.glob("stage0_*.onnx")))).run(
            None, {"x": x})[0]
        assert mid.nbytes > 4 * 1024 * 1024
        name = s1.get_inputs()[0].name
        client = grpcclient.InferenceServerClient(
            url=f"127.0.0.1:{workers[1].grpc_address[1]}")  # type: ignore[index]
        inp = grpcclient.InferInput(name, list(mid.shape), "FP32")
        inp.set_data_from_numpy(mid)
        res = client.infer("stage1", [inp])
        np.testing.assert_allclose(res.as_numpy(s1.get_outputs()[0].name), ref, rtol=1e-5,
                                   atol=1e-5)
        client.close()
    finally:
        for w in workers:
            w.close()


def test_triton_name_prefers_the_folder_the_compiler_recorded() -> None:
    from types import SimpleNamespace as NS

    from partitioner.backend.triton import triton_model_name
    from runtime.oip import model_names, triton_name

    bundle = NS(model=NS(name="my model"), stages=[NS(id=1, triton="triton/hub/custom_stage1"),
                                                   NS(id=2, triton=None)])
    assert triton_name(bundle, "1") == "custom_stage1"
    assert triton_name(bundle, "2") == triton_model_name("my model", 2) == "my_model_stage2"
    assert triton_name(bundle, "1.0") is None  # a part of a split stage
    assert model_names("fallback/without-hub", "2", "my_model_stage2") == (
        "without-hub.my_model_stage2", "without-hub.stage2")
