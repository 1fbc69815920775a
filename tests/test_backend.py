"""compile_bundle / load_bundle on hand-built models and hand-made plans."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from partitioner.backend import compile_bundle, load_bundle
from partitioner.backend.manifest import MANIFEST, dumps
from partitioner.backend.verify import run_chain, sample_inputs
from partitioner.errors import UserError
from partitioner.ir import Application, Device, Estimate, Link, Plan, Stage, System
from tests.test_slicing import GROUPS
from tests.test_slicing_fixtures import prepare, run_model, skip_dag

GOLDEN = Path(__file__).parent / "testdata" / "manifests"


def plan_of(*stages: tuple[str, int, int]) -> Plan:
    return Plan("optimal", "latency", tuple(Stage(d, None, a, b) for d, a, b in stages),
                Estimate(0.5, 0.4, 0.1, 0.0, 0.4, {"edge": 0.2}), 0.01)


def system() -> System:
    dev = [Device("edge", "edge", 1e9, 1e9, 1e7, trusted=True),
           Device("hub", "hub", 1e11, 1e10, 1e8), Device("cloud", "cloud", 1e13, 1e11, 1e8)]
    links = (Link("edge", "hub", 1e7), Link("hub", "cloud", 1e6), Link("edge", "cloud", 1e5))
    return System(tuple(dev), links, Application(source="edge", destination="edge"))


BACK_AND_FORTH = plan_of(("edge", 0, 1), ("hub", 2, 4), ("edge", 5, 8))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "bundle"
    return compile_bundle(prepare(skip_dag(), GROUPS), BACK_AND_FORTH, system(), out,
                          triton=True)


def _names(specs) -> list[str]:
    return [t.name for t in specs]


def test_forwarding_lists_follow_the_chain(bundle_dir):
    b = load_bundle(bundle_dir)
    s0, s1, s2 = b.stages
    assert [s.device for s in b.stages] == ["edge", "hub", "edge"]  # back and forth
    assert [s.next for s in b.stages] == [1, 2, None]
    assert (b.source, b.destination) == ("edge", "edge")
    assert _names(s0.inputs) == ["x"] and s0.inputs[0].source == "input"
    assert [(t.name, t.targets) for t in s0.outputs] == [("a", (1, 2))]
    # x is read by concat in stage 2: stage 0 receives it and forwards it, so does stage 1
    assert [(t.name, t.source, t.targets) for t in s0.forward] == [("x", "input", (2,))]
    assert [(t.name, t.source) for t in s1.forward] == [("x", "input"), ("a", 0)]
    # early is a model output made by stage 1: it rides through stage 2 to the destination
    assert ("early", ("output",)) in [(t.name, t.targets) for t in s1.outputs]
    assert [(t.name, t.source, t.targets) for t in s2.forward] == [("early", 1, ("output",))]
    assert [(t.name, t.source) for t in s2.inputs] == [("x", "input"), ("a", 0), ("c", 1)]
    # bytes crossing the cut after stage 1: early + c + x + a
    assert s1.send_bytes == 4 * (4 * 64 + 4 * 64 + 3 * 64 + 4 * 64)


def test_chained_stages_reproduce_the_model_and_hold_only_their_weights(bundle_dir):
    b = load_bundle(bundle_dir)
    feeds = sample_inputs(b.inputs, seed=3)
    got = run_chain(b.path, b.stages, feeds)
    want = run_model(skip_dag(), feeds)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5)
    inits = [sorted(t.name for t in onnx.load_model(b.stage_path(s)).graph.initializer)
             for s in b.stages]
    assert inits == [["w1"], ["w2"], ["w3", "w4"]]
    assert b.verification["inputs"] == "seeded random"
    assert 0 <= b.verification["max_abs_diff"] <= 1e-4
    for s in b.stages:
        onnx.checker.check_model(str(b.stage_path(s)), full_check=True)


def test_golden_manifest(bundle_dir):
    doc = json.loads((bundle_dir / MANIFEST).read_text())
    # stable across onnx/protobuf versions and float noise: hashes and measured diffs
    for s in doc["stages"]:
        assert re.fullmatch(r"[0-9a-f]{64}", s["sha256"])
        s["sha256"] = "<sha256>"
    assert re.fullmatch(r"[0-9a-f]{64}", doc["model"]["sha256"])
    doc["model"]["sha256"] = "<sha256>"
    doc["verification"]["max_abs_diff"] = doc["verification"]["max_rel_diff"] = "<diff>"
    golden = GOLDEN / "skip_dag_back_and_forth.json"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(dumps(doc) + "\n")
    assert doc == json.loads(golden.read_text())


def test_existing_output_is_refused_unless_forced(tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    prepared = prepare(skip_dag(), GROUPS)
    plan = plan_of(("edge", 0, 4), ("cloud", 5, 8))
    with pytest.raises(UserError, match="not empty.*--force"):
        compile_bundle(prepared, plan, system(), out, verify=False)
    assert (out / "keep.txt").exists()
    compile_bundle(prepared, plan, system(), out, verify=False, force=True)
    assert not (out / "keep.txt").exists()
    assert len(load_bundle(out).stages) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp dirs left behind


@pytest.mark.parametrize("stages, message", [
    ((("edge", 0, 3), ("hub", 5, 8)), "stage 1 .*start at layer 4"),
    ((("edge", 0, 3),), "end at layer 3"),
    ((("edge", 0, 3), ("mars", 4, 8)), "device 'mars' is not in the system"),
])
def test_bad_plan_leaves_nothing(tmp_path, stages, message):
    with pytest.raises(UserError, match=message):
        compile_bundle(prepare(skip_dag(), GROUPS), plan_of(*stages), system(),
                       tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def _copy_bundle(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_manifest(path: Path, edit) -> None:
    doc = json.loads((path / MANIFEST).read_text())
    edit(doc)
    (path / MANIFEST).write_text(json.dumps(doc))


def test_missing_stage_file_is_rejected(bundle_dir, tmp_path):
    b = _copy_bundle(bundle_dir, tmp_path / "b")
    (b / "stage1_hub.onnx").unlink()
    with pytest.raises(UserError, match=r"stage 1 \(hub\): file 'stage1_hub.onnx' is missing"):
        load_bundle(b)


def test_tampered_stage_file_is_rejected(bundle_dir, tmp_path):
    b = _copy_bundle(bundle_dir, tmp_path / "b")
    data = bytearray((b / "stage2_edge.onnx").read_bytes())
    data[-1] ^= 0xFF
    (b / "stage2_edge.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError, match="stage 2 .*'stage2_edge.onnx' does not match its sha256"):
        load_bundle(b)


def test_tampered_sha256_in_manifest_is_rejected(bundle_dir, tmp_path):
    b = _copy_bundle(bundle_dir, tmp_path / "b")
    _edit_manifest(b, lambda d: d["stages"][0].update(sha256="0" * 64))
    with pytest.raises(UserError, match="stage 0 .*does not match its sha256"):
        load_bundle(b)


@pytest.mark.parametrize("file, message", [
    ("../outside.onnx", r"escapes the bundle directory \('..'\)"),
    ("/etc/passwd", "must be relative"),
    ("sub/../../outside.onnx", "escapes the bundle"),
])
def test_paths_escaping_the_bundle_are_rejected(bundle_dir, tmp_path, file, message):
    b = _copy_bundle(bundle_dir, tmp_path / "b")
    (tmp_path / "outside.onnx").write_bytes((b / "stage0_edge.onnx").read_bytes())
    _edit_manifest(b, lambda d: d["stages"][0].update(file=file))
    with pytest.raises(UserError, match=f"stage 0 .*{message}"):
        load_bundle(b)


def test_symlink_out_of_the_bundle_is_rejected(bundle_dir, tmp_path):
    b = _copy_bundle(bundle_dir, tmp_path / "b")
    outside = tmp_path / "elsewhere.onnx"
    os.replace(b / "stage0_edge.onnx", outside)
    (b / "stage0_edge.onnx").symlink_to(outside)
    with pytest.raises(UserError, match="stage 0 .*leads outside the bundle directory"):
        load_bundle(b)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema_version=3), "schema_version 3 is not supported"),
    (lambda d: d.pop("model"), "missing required key 'model'"),
    (lambda d: d["stages"][1].pop("file"), "manifest stage 1: missing required key 'file'"),
    (lambda d: d["stages"][0].update(next=2), "stage 0 has next 2, expected 1"),
    (lambda d: d["stages"][0]["inputs"][0].update({"from": 2}), "stage 0 input 'x' comes from"),
])
def test_malformed_manifest_is_rejected(bundle_dir, tmp_path, edit, message):
    b = _copy_bundle(bundle_dir, tmp_path / "b")
    _edit_manifest(b, edit)
    with pytest.raises(UserError, match=message):
        load_bundle(b)


def test_not_a_bundle(tmp_path):
    with pytest.raises(UserError, match="not a bundle directory"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_bundle(tmp_path)


def test_external_data_model_keeps_external_stages(tmp_path):
    """The >2 GB path, cheaply: weights stay in external files, per stage, and are checked."""
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(skip_dag(), src / "m.onnx", save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    loaded = onnx.load_model(src / "m.onnx", load_external_data=False)
    prepared = prepare(loaded, GROUPS, base_dir=src)
    out = compile_bundle(prepared, BACK_AND_FORTH, system(), tmp_path / "b")
    b = load_bundle(out)
    assert [s.external_data for s in b.stages] == [f"{s.file}.data" for s in b.stages]
    assert b.verification["max_abs_diff"] <= 1e-4
    for s in b.stages:
        m = onnx.load_model(b.stage_path(s), load_external_data=False)
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer)
    # tampering with the weights is caught like tampering with the graph
    data = b.path / b.stages[2].external_data
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"stage 2 \(edge\): file 'stage2_edge.onnx.data' does "
                                        "not match"):
        load_bundle(out)


def test_stage_reading_undeclared_external_file_is_rejected(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save_model(skip_dag(), src / "m.onnx", save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    prepared = prepare(onnx.load_model(src / "m.onnx", load_external_data=False), GROUPS,
                       base_dir=src)
    out = compile_bundle(prepared, plan_of(("edge", 0, 8)), None, tmp_path / "b", verify=False)
    _edit_manifest(out, lambda d: d["stages"][0].update(external_data=None,
                                                       external_data_sha256=None))
    with pytest.raises(UserError, match="reads external data from 'stage0_edge.onnx.data', "
                                        "which the manifest does not declare"):
        load_bundle(out)


def test_triton_repository(bundle_dir):
    b = load_bundle(bundle_dir)
    assert [s.triton for s in b.stages] == ["triton/edge/m_stage0", "triton/hub/m_stage1",
                                            "triton/edge/m_stage2"]
    for s in b.stages:
        folder = bundle_dir / s.triton
        assert (folder / "1" / "model.onnx").read_bytes() == b.stage_path(s).read_bytes()
        text = (folder / "config.pbtxt").read_text()
        try:
            from google.protobuf import text_format
            from tritonclient.grpc import model_config_pb2
        except ImportError:  # structure check only
            assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 0" in text
            continue
        cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert cfg.name == f"m_stage{s.id}" and cfg.platform == "onnxruntime_onnx"
        assert cfg.max_batch_size == 0
        assert [i.name for i in cfg.input] == [t.name for t in s.inputs]
        assert [o.name for o in cfg.output] == [t.name for t in s.outputs]
        assert [list(i.dims) for i in cfg.input] == [list(t.shape) for t in s.inputs]
        assert {i.data_type for i in (*cfg.input, *cfg.output)} == {
            model_config_pb2.DataType.TYPE_FP32}
