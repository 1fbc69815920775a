"""Front end on the model zoo: published parameter and MAC counts, and prepared models that
still compute what the originals compute."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from partitioner.frontend import load_model

models = pytest.importorskip("models")


@pytest.fixture(scope="module")
def alexnet():
    return load_model(models.build_model("alexnet"))


@pytest.fixture(scope="module")
def resnet50():
    return load_model(models.build_model("resnet50"))


@pytest.mark.parametrize("name", ["alexnet", "resnet50"])
def test_published_params_and_macs(name, request):
    # torchvision's table: AlexNet 61.1 M params / 0.71 GMAC, ResNet-50 25.6 M / 4.09 GMAC.
    # Our params also count BatchNorm running statistics (they are weights of the ONNX
    # model), hence the ~2 % tolerance.
    published = models.PUBLISHED[name]
    prepared = request.getfixturevalue(name)
    assert prepared.stats.total_weight_count == pytest.approx(published["params"], rel=0.02)
    assert sum(prepared.stats.macs) == pytest.approx(published["macs"], rel=0.02)
    # FLOPs count a MAC as 2 plus the cheap ops: a little over twice the MACs.
    flops = sum(layer.flops for layer in prepared.graph.layers)
    assert 2 * sum(prepared.stats.macs) < flops < 2.05 * sum(prepared.stats.macs)


def test_alexnet_has_eight_major_layers(alexnet):
    # SPEC §2: AlexNet's ops collapse into 8 major layers (5 convs, 3 fully connected).
    assert len(alexnet.graph.layers) == 8
    assert [layer.ops[0] for layer in alexnet.graph.layers] == ["Conv"] * 5 + ["Gemm"] * 3


def test_resnet50_residual_cuts(resnet50):
    # Inside a bottleneck the block input stays live until the residual Add: the cut after
    # the first conv of a block carries two tensors; between blocks only one.
    cuts = [len(c.tensors) for c in resnet50.graph.cuts]
    assert cuts[0] == 1 and cuts[-1] == 1
    assert max(cuts) == 2 and cuts.count(1) > 10


@pytest.mark.parametrize(("name", "size"), [("vit_tiny", 224), ("yolo_small", 256),
                                            ("lstm_small", 32), ("mobilenet_v2", 96)])
def test_prepared_model_matches_original(name, size):
    model = models.build_model(name, dynamic_batch=True, image_size=size)
    first = model.graph.input[0]
    dims = [d.dim_value for d in first.type.tensor_type.shape.dim]
    shape = (2, *dims[1:])
    prepared = load_model(model, shapes={first.name: shape})
    # No shape arithmetic survives preparation (it would be a fake partition point).
    assert not {"Shape", "Size", "Constant"} & {n.op_type for n in prepared.model.graph.node}
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {first.name: x})
    got = ort.InferenceSession(prepared.model.SerializeToString()).run(None, {first.name: x})
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert [t.shape for t in prepared.graph.outputs] == [w.shape for w in want]
