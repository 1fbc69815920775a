"""The benchmark's floor chain (benchmarks/chain_floor.py) computes the model: three real
stage processes on loopback, passing tensors with the least framing, give ORT's outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import models
from benchmarks.chain_floor import FloorChain, recv_tensors, send_tensors
from benchmarks.common import chain_plan
from partitioner.backend import compile_bundle
from partitioner.frontend import load_model


@pytest.mark.parametrize(("name", "framing"), [("tiny_cnn", "least"), ("resnet18", "least"),
                                              ("resnet18", "runtime")])
def test_the_floor_chain_reproduces_the_whole_model(name, framing, tmp_path) -> None:
    path = tmp_path / f"{name}.onnx"
    onnx.save(models.build_model(name, **({"image_size": 64} if name == "resnet18" else {})),
              str(path))
    prepared = load_model(path)
    plan, _ = chain_plan([layer.flops for layer in prepared.graph.layers],
                         ("edge", "hub", "cloud"))
    bundle = compile_bundle(prepared, plan, None, tmp_path / "bundle", verify=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.random.default_rng(1).standard_normal(
        [d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32)
        for i in sess.get_inputs()}
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    with FloorChain(bundle, threads=1, framing=framing) as floor:
        for _ in range(3):  # the ring keeps its connections between requests
            out = floor.infer(feeds)
            assert set(out) == set(ref)
            for k, v in ref.items():
                np.testing.assert_allclose(out[k], v, rtol=1e-4, atol=1e-5, err_msg=k)


def test_a_message_carries_several_tensors_and_dtypes() -> None:
    import socket

    a, b = socket.socketpair()
    with a, b:
        sent = {"x": np.arange(6, dtype=np.float32).reshape(2, 3),
                "ids": np.array([7, -1], dtype=np.int64), "empty": np.zeros((0, 4), np.float16)}
        send_tensors(a, sent)
        got = recv_tensors(b)
    assert list(got) == list(sent)
    for k, v in sent.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
