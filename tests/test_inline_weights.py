"""Inline weights left in the model file at load (issue 16): same model, same bundle.

``read_model`` leaves every big inline initialiser in the ``.onnx`` file as an inline
reference; the threshold is lowered here so that the small test models have some.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from partitioner.backend import compile_bundle
from partitioner.backend.units import write_unit
from partitioner.errors import UserError
from partitioner.frontend import inline_weights, load_model
from partitioner.frontend.inline_weights import is_inline_ref, read_model
from partitioner.frontend.slicing import extract_layers
from partitioner.frontend.stagefile import loaded
from partitioner.ir import Estimate, Plan, Stage


def _lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inline_weights, "LAZY_MIN_BYTES", 256)


def _halves(n: int) -> Plan:
    return Plan("optimal", "latency", (Stage("a", None, 0, n // 2 - 1), Stage("b", None, n // 2,
                                                                               n - 1)),
                Estimate(0.0, 0.0, 0.0, 0.0, 0.0), 0.0)


def _files(bundle: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(bundle.iterdir()) if p.is_file()}


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "tiny.onnx"
    path.parent.mkdir()
    models.save_model("tiny_cnn", path)
    return path


def test_read_model_equals_onnx_load_below_the_threshold(tiny, tmp_path, monkeypatch):
    # the field walker with no tensor above the threshold reads what onnx.load reads
    monkeypatch.setattr(inline_weights, "LAZY_MIN_BYTES", 1 << 62)
    want = onnx.load(str(tiny), load_external_data=False).SerializeToString()
    assert read_model(tiny).SerializeToString() == want
    assert read_model(tiny, lazy=False).SerializeToString() == want
    # a file with the graph field twice (the stage writer's inline layout) reads the same
    prepared = load_model(tiny)
    stage = extract_layers(prepared, 0, len(prepared.graph.layers) - 1)
    stage.save(tmp_path / "stage.onnx")
    assert (read_model(tmp_path / "stage.onnx").SerializeToString()
            == onnx.load(str(tmp_path / "stage.onnx")).SerializeToString())


def test_big_weights_stay_in_the_file_and_resolve_to_the_same_bytes(tiny, monkeypatch):
    _lazy(monkeypatch)
    eager = onnx.load(str(tiny))
    assert not any(is_inline_ref(t) for t in read_model(tiny, lazy=False).graph.initializer)
    lazy = read_model(tiny)
    refs = [t for t in lazy.graph.initializer if is_inline_ref(t)]
    assert refs, "tiny_cnn has weights above 256 bytes"
    assert all(not t.HasField("raw_data") for t in refs)  # the proto holds no weight bytes
    by_name = {t.name: t for t in eager.graph.initializer}
    for t in lazy.graph.initializer:
        got = loaded(t, tiny.parent)
        assert got.SerializeToString() == by_name[t.name].SerializeToString()


def test_bundle_is_byte_identical_with_lazy_and_eager_loading(tiny, tmp_path, monkeypatch):
    _lazy(monkeypatch)
    eager = load_model(tiny)
    assert not any(is_inline_ref(t) for t in eager.model.graph.initializer)
    plan = _halves(len(eager.graph.layers))
    want = _files(compile_bundle(eager, plan, None, tmp_path / "eager"))
    lazy = load_model(tiny, lazy_weights=True)
    assert any(is_inline_ref(t) for t in lazy.model.graph.initializer)
    got = _files(compile_bundle(lazy, plan, None, tmp_path / "lazy"))
    assert got == want  # stage files (inline, no .data files) and the manifest
    assert not any(name.endswith(".data") for name in got)


def _folding_model() -> onnx.ModelProto:
    """y = x * ReduceSum(w): the sum of a big weight folds into a scalar constant."""
    w = numpy_helper.from_array(np.arange(512, dtype=np.float32) / 7, "w")
    nodes = [helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0),
             helper.make_node("Mul", ["x", "s"], ["y"])]
    graph = helper.make_graph(nodes, "fold", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 4])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_constants_folded_from_a_left_out_weight_are_the_same(tmp_path, monkeypatch):
    path = tmp_path / "fold.onnx"
    onnx.save(_folding_model(), str(path))
    _lazy(monkeypatch)
    eager = load_model(path)
    lazy = load_model(path, lazy_weights=True)
    assert eager.folded == lazy.folded == 1
    assert lazy.model.graph.node[0].op_type == "Mul"
    assert lazy.model.SerializeToString() == eager.model.SerializeToString()


def test_truncated_file_is_a_user_error(tiny, tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    with pytest.raises(UserError, match="not a valid ONNX file"):
        load_model(cut)


def test_checker_still_refuses_a_bad_inline_unit(tiny, tmp_path, monkeypatch):
    _lazy(monkeypatch)
    prepared = load_model(tiny, lazy_weights=True)
    sub = extract_layers(prepared, 0, 0)
    sub.shell.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(UserError, match="fails the ONNX checker"):
        write_unit(sub, tmp_path, "bad.onnx", "stage 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "src"]  # no stub left


def test_verification_opens_big_units_through_an_identical_external_view(tiny, tmp_path,
                                                                         monkeypatch):
    from partitioner.backend.verify import _unit_source, session

    _lazy(monkeypatch)
    prepared = load_model(tiny, lazy_weights=True)
    stage = extract_layers(prepared, 0, len(prepared.graph.layers) - 1)
    unit = tmp_path / "unit.onnx"
    stage.save(unit)
    feeds = {"input": np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(
        np.float32)}
    name = prepared.model.graph.input[0].name
    feeds = {name: feeds["input"]}
    want = session(unit, "unit").run(None, feeds)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with _unit_source(unit, scratch) as view:
        assert view != unit and (view.parent / "unit.onnx.data").is_file()
        got = session(view, "view").run(None, feeds)
    assert not any(scratch.iterdir())  # the view is gone with its session
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    with _unit_source(unit, None) as plain:  # no scratch: the file itself
        assert plain == unit


def test_compile_keeps_the_weights_in_the_model_file(tiny, tmp_path, monkeypatch):
    """``pipeline.compile`` (``partitioner compile``) loads lazily, ``plan`` does not; the
    bundles are the same."""
    from partitioner import pipeline
    from tests.test_pipeline import SYSTEM

    _lazy(monkeypatch)
    system = tmp_path / "system.toml"
    system.write_text(SYSTEM)
    compiled = pipeline.compile(tiny, system, tmp_path / "bundle")
    raw = [t for t in compiled.prepared.model.graph.initializer if t.HasField("raw_data")]
    assert all(len(t.raw_data) <= 256 for t in raw)  # no weight above the threshold held
    planned = pipeline.plan(tiny, system)
    assert not any(is_inline_ref(t) for t in planned.prepared.model.graph.initializer)
    pipeline.compile(planned.prepared, system, tmp_path / "again")
    got, want = _files(tmp_path / "bundle"), _files(tmp_path / "again")
    assert _timeless(got.pop("manifest.json")) == _timeless(want.pop("manifest.json"))
    assert got == want


def _timeless(manifest: bytes) -> dict:
    """The manifest without the solver's wall time (two solves never take the same)."""
    doc = json.loads(manifest)
    doc["plan"].pop("solve_seconds")
    return doc


def test_compile_with_int8_layers_is_the_same_with_lazy_weights(tiny, tmp_path, monkeypatch):
    """The int8 variant (QUANT) is built from a lazily loaded model as from an eager one."""
    from partitioner import pipeline
    from partitioner.frontend import quantize
    from tests.test_pipeline import SYSTEM

    _lazy(monkeypatch)
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path / "cache"))
    system = tmp_path / "system.toml"
    system.write_text(SYSTEM)
    eager = load_model(tiny)
    calibration = quantize.random_calibration(eager, n=4, seed=1)
    options = dict(quantize=True, quantize_layers=4, calibration=calibration, max_noise=10.0)
    lazy = pipeline.compile(tiny, system, tmp_path / "lazy", **options)
    assert any(is_inline_ref(t) for t in lazy.prepared.model.graph.initializer)
    assert any(s.quantized for s in lazy.plan.stages)
    pipeline.compile(eager, system, tmp_path / "eager", **options)
    got, want = _files(tmp_path / "lazy"), _files(tmp_path / "eager")
    assert _timeless(got.pop("manifest.json")) == _timeless(want.pop("manifest.json"))
    assert got == want


def test_no_verify_load_check_opens_the_units_through_the_view(tiny, tmp_path, monkeypatch):
    """``--no-verify`` still opens every unit in ORT (through the external-data view that
    verification uses, so no more memory) and refuses one ORT cannot load, by name."""
    from partitioner.backend.manifest import load_bundle
    from partitioner.backend.verify import check_units_load

    _lazy(monkeypatch)
    prepared = load_model(tiny, lazy_weights=True)
    out = compile_bundle(prepared, _halves(len(prepared.graph.layers)), None,
                         tmp_path / "bundle", verify=False)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no view left behind
    bundle = load_bundle(out)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    check_units_load(bundle, scratch)  # the bundle as written loads
    unit = bundle.unit_path(bundle.stages[1])
    model = onnx.load(unit)
    assert any(is_inline_ref(t) for t in read_model(unit, lazy=True).graph.initializer)
    model.graph.node[0].op_type, model.graph.node[0].domain = "NoSuchOp", "org.example"
    model.opset_import.append(helper.make_opsetid("org.example", 1))
    onnx.save(model, unit)
    with pytest.raises(UserError, match=r"^stage 1 \(.*\): ONNX Runtime cannot load it"):
        check_units_load(bundle, scratch)
    assert not any(scratch.iterdir())
