"""Bundles of plans with int8 layers (QUANT): stage files sliced from the quantised model,
quantised cut tensors in the manifest, bit-identical chains, real workers receiving uint8."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

import models
from partitioner.backend import compile_bundle, load_bundle
from partitioner.backend.explain import explain
from partitioner.backend.verify import run_bundle, sample_inputs
from partitioner.errors import UserError
from partitioner.frontend import load_model
from partitioner.frontend import quantize as Q
from partitioner.ir import Estimate, Plan, Stage
from runtime.executor import RemoteExecutor
from runtime.stages import check_message, open_bundle
from stagebundle.manifest import MANIFEST
from tests.test_runtime_fixtures import TOKEN, Built, Cluster
from tests.test_runtime_graph import _ready

# yolo11_small at 64x64: the cut after layer 6 (model.3.conv, stride 8) carries one tensor
STARTS, DEVICES = (0, 7, 41), ("edge", "hub", "cloud")


@pytest.fixture(autouse=True)
def no_disk_cache(monkeypatch):
    monkeypatch.setenv("PARTITIONER_CACHE", "")


@pytest.fixture(scope="module")
def yolo11(tmp_path_factory):
    path = tmp_path_factory.mktemp("yolo11") / "yolo11_small.onnx"
    models.save_model("yolo11_small", path, image_size=64)
    return path, load_model(path)


def _plan(n_layers: int, quantized: tuple[int, ...]) -> Plan:
    ends = [*STARTS[1:], n_layers]
    return Plan("optimal", "latency", tuple(
        Stage(d, None, a, b - 1, quantized=tuple(k for k in quantized if a <= k < b))
        for d, a, b in zip(DEVICES, STARTS, ends, strict=True)),
        Estimate(0.0, 0.0, 0.0, 0.0, 0.0, noise=0.01), 0.0)


@pytest.fixture(scope="module")
def compiled(yolo11, tmp_path_factory):
    """The bundle, the variant it was sliced from, and the calibration."""
    os.environ["PARTITIONER_CACHE"] = ""  # (module scope: before the autouse fixture)
    _, prepared = yolo11
    cal = Q.random_calibration(prepared, 4, seed=3)
    layers = Q.candidate_layers(prepared.graph, 12)
    assert 6 in layers  # its output is the cut tensor between the edge and the hub
    plan = _plan(len(prepared.graph.layers), layers)
    out = compile_bundle(prepared, plan, None, tmp_path_factory.mktemp("b") / "bundle",
                         calibration=cal)
    return load_bundle(out), Q.quantize_model(prepared, layers, cal), cal


def _whole(variant: Q.QuantizedModel, feeds: dict) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(variant.prepared.model.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def test_stage_files_come_from_the_variant_with_uint8_cuts(compiled, yolo11):
    bundle, variant, _ = compiled
    _, prepared = yolo11
    assert [list(s.quantized) for s in bundle.stages] == [
        [k for k in variant.layers if s.first <= k <= s.last] for s in bundle.stages]
    hub_in = {t.name: t for t in bundle.stages[1].inputs}
    q_name = dict(variant.int8_outputs[6])["model.3.act"]
    assert set(hub_in) == {q_name}
    t = hub_in[q_name]
    assert t.dtype == "uint8" and t.nbytes * 4 == prepared.graph.tensors["model.3.act"].nbytes
    # the routes name the 8-bit tensors, the plan's own estimate is kept
    doc = json.loads((bundle.root / MANIFEST).read_text())
    routed = {r["tensor"] for r in doc["plan"]["routes"]}
    assert q_name in routed and "model.3.act" not in routed
    assert doc["plan"]["estimate"]["noise"] == 0.01
    quantised_inputs = [x for s in bundle.stages for x in s.inputs if x.dtype == "uint8"]
    assert len(quantised_inputs) >= 2  # not just the one cut
    # explain --json carries the verification, the measured noise with it
    assert explain(bundle)["verification"]["noise"] == bundle.verification["noise"]


def test_chained_stages_are_bit_identical_to_the_quantised_model(compiled, yolo11):
    bundle, variant, _ = compiled
    _, prepared = yolo11
    v = bundle.verification
    assert v["max_abs_diff"] == 0.0 and v["reference"] == "quantized model"
    assert v["quantized"] == list(variant.layers)
    for seed in (1, 2):
        feeds = sample_inputs(bundle.inputs, seed)
        got, want = run_bundle(bundle, feeds), _whole(variant, feeds)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # the reported noise is rho of the chain against the float model on the seed-0 input
    feeds = sample_inputs(bundle.inputs, 0)
    sess = ort.InferenceSession(prepared.model.SerializeToString(),
                                providers=["CPUExecutionProvider"])
    floats = sess.run(None, feeds)
    chained = run_bundle(bundle, feeds)
    names = [o.name for o in sess.get_outputs()]
    expect = Q.noise_of([floats], [[chained[n] for n in names]])
    assert v["noise"] == pytest.approx(expect, rel=1e-12) and v["noise"] > 0


def test_a_quantized_layer_outside_its_stage_is_refused(yolo11, tmp_path):
    _, prepared = yolo11
    plan = _plan(len(prepared.graph.layers), ())
    stages = list(plan.stages)
    stages[0] = Stage("edge", None, 0, 6, quantized=(9,))
    bad = Plan("optimal", "latency", tuple(stages), plan.estimate, 0.0)
    with pytest.raises(UserError, match="plan stage 0: quantized layer 9 is not one of its "
                                        "layers 0..6") as err:
        compile_bundle(prepared, bad, None, tmp_path / "b",
                       calibration=Q.random_calibration(prepared, 2))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "b").exists()


def test_runtime_refuses_a_float_tensor_where_the_manifest_says_uint8(compiled):
    bundle, variant, _ = compiled
    view = open_bundle(bundle.root)
    (t,) = bundle.stages[1].inputs
    as_float = {t.name: np.zeros(t.shape, np.float32)}
    with pytest.raises(UserError, match=f"tensor {t.name} has dtype float32, expected uint8"):
        check_message(view, "0", "1", as_float, {t.name: None}, "hub")
    check_message(view, "0", "1", {t.name: np.zeros(t.shape, np.uint8)}, {t.name: None},
                  "hub")


def test_uint8_travels_between_real_workers(compiled, yolo11, tmp_path):
    """Three ``runtime serve`` processes on loopback: the hub receives the cut tensor as
    uint8 (the worker counts the bytes it received per tensor), and the destination gets
    exactly what the quantised whole model computes."""
    bundle, variant, _ = compiled
    path, _ = yolo11
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    os.chmod(token, 0o600)
    cluster = Cluster(Built(path, path, bundle.root, token), tmp_path)
    xs = [sample_inputs(bundle.inputs, 10 + i) for i in range(3)]
    try:
        cluster.start_all(DEVICES)
        with RemoteExecutor(bundle.root, cluster.hosts, token=TOKEN, timeout=60) as ex:
            outs = [ex.submit(x).result(120) for x in xs]
        received = {d: _ready(cluster, d)["received"] for d in DEVICES}
    finally:
        cluster.stop()
    for x, got in zip(xs, outs, strict=True):
        want = _whole(variant, x)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    (t,) = bundle.stages[1].inputs
    assert received["hub"] == {t.name: len(xs) * t.nbytes}  # 1 byte an element
    assert t.nbytes == int(np.prod(t.shape))
    cloud_in = {s.name: s for s in bundle.stages[2].inputs}
    assert received["cloud"] == {n: len(xs) * s.nbytes for n, s in cloud_in.items()}
    assert any(s.dtype == "uint8" for s in cloud_in.values())


def _every_cut_matches(prepared, variant, feeds) -> list[tuple[int, float]]:
    """(cut, max |chain - whole|) for every two-stage split that differs."""
    from partitioner.frontend.slicing import extract_layers

    vp, n = variant.prepared, len(variant.prepared.graph.layers)
    want = _whole(variant, feeds)
    bad = []
    for cut in range(n - 1):
        held = dict(feeds)
        for first, last in ((0, cut), (cut + 1, n - 1)):
            sub = extract_layers(vp, first, last)
            sess = ort.InferenceSession(sub.to_bytes(), providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            held.update(zip(names, sess.run(names, {t.name: held[t.name] for t in sub.inputs}),
                            strict=True))
        diff = max(float(np.abs(want[k] - held[k]).max()) for k in want)
        if diff:
            bad.append((cut, diff))
    return bad


@pytest.mark.parametrize("name", ["crnn", "resnet18"])
def test_every_single_cut_is_bit_identical_to_the_whole_variant(name):
    """The model cut in two after each layer: the halves chained give exactly what the
    whole variant gives. resnet18 (its 12 heaviest layers int8) has float convs between a
    DQ and a Q, which ORT fuses into int8 kernels in the whole model; crnn (every
    quantisable layer int8) has nameless nodes, weights shared by two layers and an int8
    model output (its Gemm head)."""
    if name == "crnn":
        from tests.test_frontend_shared_weights import crnn

        prepared = load_model(crnn())
        layers = [x.index for x in prepared.graph.layers
                  if any(op in Q.QUANTIZABLE_OPS for op in x.ops)]
    else:
        prepared = load_model(models.build_model("resnet18", image_size=64))
        layers = list(Q.candidate_layers(prepared.graph, 12))
    variant = Q.quantize_model(prepared, layers, Q.random_calibration(prepared, 3, seed=1))
    feeds = sample_inputs(prepared.graph.inputs, 4)
    assert _every_cut_matches(prepared, variant, feeds) == []
