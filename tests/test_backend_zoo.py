"""Zoo models compiled into 2-5 stages reproduce the whole model run by ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import models
from partitioner.backend import compile_bundle, load_bundle
from partitioner.backend.verify import run_bundle, sample_inputs
from partitioner.frontend import load_model
from partitioner.ir import Estimate, Plan, Stage
from tests.test_slicing_fixtures import run_model

# (model, stage boundaries as first layers, devices); yolo's cuts make its FPN/PAN skips
# (model.4 / model.9 activations) and its early p3 output cross several stages.
CASES = [
    ("tiny_cnn", [0, 2], ["edge", "cloud"]),
    ("resnet18", [0, 5, 12], ["edge", "hub", "cloud"]),
    ("yolo_small", [0, 15, 23, 36, 45], ["edge", "hub", "cloud", "hub", "edge"]),
    ("lstm_small", [0, 1], ["edge", "hub"]),
    ("vit_tiny", [0, 9, 18, 22], ["edge", "hub", "cloud", "hub"]),
]


# Smaller images keep the test fast; the graphs are the same.
SMALL = {"resnet18": {"image_size": 64}, "yolo_small": {"image_size": 160}}


def _plan(starts: list[int], devices: list[str], n_layers: int) -> Plan:
    ends = [*starts[1:], n_layers]
    return Plan("optimal", "latency",
                tuple(Stage(d, None, a, b - 1) for d, a, b in zip(devices, starts, ends,
                                                                  strict=True)),
                Estimate(0.0, 0.0, 0.0, 0.0, 0.0), 0.0)


def _check_against_original(path: Path, bundle_dir: Path, seed: int = 7) -> None:
    """Chain the stages and run the *original* file: same outputs (1e-4 of their scale)."""
    b = load_bundle(bundle_dir)
    feeds = sample_inputs(b.inputs, seed)
    got = run_bundle(b, feeds)
    want = run_model(path, feeds)
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        scale = max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(got[name], ref, rtol=0, atol=1e-4 * scale, err_msg=name)


@pytest.mark.parametrize("name, starts, devices", CASES, ids=[c[0] for c in CASES])
def test_zoo_model_chains_back_to_the_whole_model(tmp_path, name, starts, devices):
    path = models.save_model(name, tmp_path / f"{name}.onnx", **SMALL.get(name, {}))
    prepared = load_model(path)
    plan = _plan(starts, devices, len(prepared.graph.layers))
    out = compile_bundle(prepared, plan, None, tmp_path / "bundle")
    b = load_bundle(out)
    assert len(b.stages) == len(starts)
    assert b.verification["max_rel_diff"] <= 1e-4
    assert [t.name for t in b.outputs] == [o.name for o in onnx.load(path).graph.output]
    _check_against_original(path, out)
    if name == "yolo_small":
        # a neck skip crossing two cuts goes straight to its reader, relayed by nobody
        assert not any(s.forward for s in b.stages)
        skip = "model.4.cv2.act"
        sent = [(u.key, s.to) for u in b.units() for s in u.sends
                for p in s.tensors if p.name == skip]
        readers = [st.id for st in b.stages if skip in {t.name for t in st.inputs}]
        assert len(sent) == len(readers) and max(readers) >= 2
        assert len(b.outputs) == 3


def test_dynamic_batch_fixed_by_shapes(tmp_path):
    path = models.save_model("tiny_cnn", tmp_path / "dyn.onnx", dynamic_batch=True)
    name = onnx.load(path).graph.input[0].name
    prepared = load_model(path, shapes={name: (2, 3, 32, 32)})
    out = compile_bundle(prepared, _plan([0, 1, 3], ["a", "b", "c"], 4), None,
                         tmp_path / "bundle")
    b = load_bundle(out)
    assert b.inputs[0].shape == (2, 3, 32, 32)
    assert all(t.shape[0] == 2 for s in b.stages for t in (*s.inputs, *s.outputs))
    _check_against_original(path, out)


def test_external_data_model_compiles_into_external_stages(tmp_path):
    path = models.save_model("resnet18", tmp_path / "r18.onnx", external_data=True,
                             image_size=64)
    prepared = load_model(path)
    out = compile_bundle(prepared, _plan([0, 8, 15], ["a", "b", "c"],
                                         len(prepared.graph.layers)), None, tmp_path / "b")
    b = load_bundle(out)
    sizes = [(b.path / s.external_data).stat().st_size for s in b.stages]
    total = (tmp_path / "r18.onnx.data").stat().st_size
    # each stage holds its own weights only: together about the model's (plus alignment)
    assert all(s > 0 for s in sizes) and sum(sizes) <= total + 4096 * 200
    assert sum(sizes) >= 0.9 * total
    _check_against_original(path, out)


def test_node_granularity(tmp_path):
    path = models.save_model("tiny_cnn", tmp_path / "t.onnx")
    prepared = load_model(path, granularity="node")
    n = len(prepared.graph.layers)
    assert n > 4  # every node is a layer
    out = compile_bundle(prepared, _plan([0, n // 3, 2 * n // 3], ["a", "b", "a"], n), None,
                         tmp_path / "b")
    b = load_bundle(out)
    assert b.model.granularity == "node" and len(b.model.layers) == n
    _check_against_original(path, out)
