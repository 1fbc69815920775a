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
