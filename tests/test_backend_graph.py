"""Schema-2 stage graphs from the back end: zoo models, direct against forwarded, and
schema-1 bundles that still load, run and explain."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import models
from partitioner.analysis.routing import route_plan
from partitioner.backend import compile_bundle, load_bundle
from partitioner.backend.explain import explain, format_text
from partitioner.backend.manifest import MANIFEST, sha256_file
from partitioner.backend.verify import run_bundle, sample_inputs
from partitioner.frontend import load_model
from tests.test_backend import BACK_AND_FORTH, GOLDEN, system
from tests.test_backend_zoo import SMALL, _plan
from tests.test_slicing import GROUPS
from tests.test_slicing_fixtures import prepare, run_model, skip_dag

# yolo's FPN/PAN skips (model.4 / model.6 activations) cross several of these stages
ZOO = [("resnet18", [0, 5, 12], ["edge", "hub", "cloud"]),
       ("yolo_small", [0, 15, 23, 36], ["edge", "hub", "cloud", "edge"])]


def _network_bytes(bundle) -> int:
    """Bytes sent between units on different devices per request (source included)."""
    size = {t.name: t.nbytes for s in bundle.stages for t in (*s.inputs, *s.outputs,
                                                               *s.forward) if t.rows is None}
    size.update({t.name: t.nbytes for t in (*bundle.inputs, *bundle.outputs)})
    device = {u.key: u.device for u in bundle.units()}
    device["output"] = bundle.destination or bundle.stages[-1].device
    device["input"] = bundle.source or bundle.stages[0].device
    total = 0
    sends = [("input", s) for s in bundle.input_sends] + [
        (u.key, s) for u in bundle.units() for s in u.sends]
    for key, s in sends:
        if device[key] != device[s.to]:
            total += sum(size[p.name] for p in s.tensors)
    return total


@pytest.mark.parametrize("name, starts, devices", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_stage_graphs_reproduce_the_model_direct_and_forwarded(tmp_path, name, starts,
                                                                   devices):
    path = models.save_model(name, tmp_path / f"{name}.onnx", **SMALL.get(name, {}))
    prepared = load_model(path)
    plan = _plan(starts, devices, len(prepared.graph.layers))
    feeds = sample_inputs(prepared.graph.inputs, seed=5)
    want = run_model(path, feeds)
    sent = {}
    for mode in ("direct", "forwarded"):
        routed = route_plan(prepared.graph, None, plan, mode=mode)
        b = load_bundle(compile_bundle(prepared, routed, None, tmp_path / mode))
        assert b.schema_version == 2 and b.transfer == mode
        assert b.verification["max_rel_diff"] <= 1e-4
        got = run_bundle(b, feeds)
        for k, ref in want.items():
            scale = max(1.0, float(np.abs(ref).max()))
            np.testing.assert_allclose(got[k], ref, rtol=0, atol=1e-4 * scale, err_msg=k)
        assert bool(any(s.forward for s in b.stages)) == (mode == "forwarded" and
                                                          name == "yolo_small")
        sent[mode] = _network_bytes(b)
    if name == "yolo_small":  # skips and early outputs no longer ride through stages
        assert sent["direct"] < sent["forwarded"]
    else:  # a chain without skips over a cut: both are the same sends
        assert sent["direct"] == sent["forwarded"]


def test_schema1_bundle_still_loads_runs_and_explains(tmp_path):
    """The schema-1 manifest of this bundle (the golden file of the chain era, with the
    real hashes) is upgraded on load to the sends its chain implies."""
    prepared = prepare(skip_dag(), GROUPS)
    plan = route_plan(prepared.graph, None, BACK_AND_FORTH, mode="forwarded")
    out = compile_bundle(prepared, plan, system(), tmp_path / "b", triton=True)
    doc = json.loads((GOLDEN / "skip_dag_back_and_forth_schema1.json").read_text())
    assert doc["schema_version"] == 1
    doc.pop("input_sends")  # written by no schema-1 producer: a chain implies its sends
    doc["model"]["sha256"] = prepared.graph.sha256
    doc["verification"] = None  # the golden masks the measured differences
    for s in doc["stages"]:
        s.pop("sends")
        s["sha256"] = sha256_file(out / s["file"])
    (out / MANIFEST).write_text(json.dumps(doc))
    b = load_bundle(out)
    assert b.schema_version == 1
    assert [(s.to, [p.name for p in s.tensors]) for s in b.stages[1].sends] == [
        ("2", ["x", "a", "early", "c"])]
    feeds = sample_inputs(b.inputs, seed=1)
    got, want = run_bundle(b, feeds), run_model(skip_dag(), feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5)
    report = explain(b)
    assert report["schema_version"] == 1 and report["transfer"] == "forwarded"
    assert [x["tensors"] for x in report["links"]] == [["x", "a"], ["x", "a", "early", "c"]]
    assert "(forwarded)" in format_text(report)


def test_direct_bundle_of_a_model_with_a_model_input_skip(tmp_path):
    """x is read by stages 0 and 2 of an A-B-A plan: the source sends it once, to stage 0,
    which hands it to stage 2 on the same device; nothing crosses the hub for it."""
    b = load_bundle(compile_bundle(prepare(skip_dag(), GROUPS), BACK_AND_FORTH, system(),
                                   tmp_path / "b"))
    assert [(s.to, [p.name for p in s.tensors]) for s in b.input_sends] == [("0", ["x"])]
    hub = b.stages[1]
    assert "x" not in {p.name for s in hub.sends for p in s.tensors}
    assert "x" not in {t.name for t in b.unit("1").receives}


def test_triton_skips_split_stages_with_a_note(tmp_path, capsys):
    from dataclasses import replace

    from partitioner.backend.triton import write_repository

    b = load_bundle(compile_bundle(prepare(skip_dag(), GROUPS), BACK_AND_FORTH, system(),
                                   tmp_path / "b"))
    fake_split = replace(b.stages[1], parts=(), device=None, file=None)  # as if split
    out = write_repository(replace(b, stages=(b.stages[0], fake_split, b.stages[2])),
                           Path(tmp_path / "b"))
    assert out.stages[1].triton is None and out.stages[0].triton is not None
    assert "stages 1 are split into row parts" in out.extra["triton_note"]
    assert "no Triton model" in capsys.readouterr().err


@dataclass(frozen=True)
class PartModel:
    """The contract of partitioner.backend.parts.PartModel (helper "parts")."""

    index: int
    device: str
    frequency: str | None
    rows: tuple[int, int]
    model: object
    inputs: tuple
    outputs: tuple


def test_split_stage_is_written_as_parts_with_their_sends(tmp_path, monkeypatch):
    """The emission plumbing of a split stage, against a stand-in for the row-part back
    end whose two "parts" each run the whole stage (rows None): one file and PartSpec per
    part, the stage's own device and file null, the producer sending to each part, a
    single copy of each output going on; the bundle still reproduces the model."""
    import sys
    import types

    from partitioner.frontend.slicing import extract_layers
    from partitioner.ir import Estimate, Part, Plan, Stage

    def build_parts(prepared, stage):
        sub = extract_layers(prepared, stage.first, stage.last)
        return [PartModel(k, p.device, p.frequency, p.rows, sub,
                          tuple((t, None) for t in sub.inputs),
                          tuple((t, None) for t in sub.outputs))
                for k, p in enumerate(stage.parts)]

    monkeypatch.setitem(sys.modules, "partitioner.backend.parts",
                        types.SimpleNamespace(build_parts=build_parts))
    plan = Plan("optimal", "latency", (
        Stage("edge", None, 0, 1),
        Stage(None, None, 2, 4, parts=(Part("hub", None, (0, 3)), Part("cloud", None, (4, 7)))),
        Stage("edge", None, 5, 8)), Estimate(0, 0, 0, 0, 0), 0.0)
    b = load_bundle(compile_bundle(prepare(skip_dag(), GROUPS), plan, system(),
                                   tmp_path / "b"))
    split = b.stages[1]
    assert (split.device, split.file) == (None, None)
    assert [(p.file, p.device, p.rows) for p in split.parts] == [
        ("stage1_part0_hub.onnx", "hub", (0, 3)), ("stage1_part1_cloud.onnx", "cloud", (4, 7))]
    assert {s.to for s in b.stages[0].sends} == {"1.0", "1.1", "2"}
    assert [s.to for s in split.parts[0].sends] == ["output", "2"]  # the one whole copy
    assert not split.parts[1].sends
    feeds = sample_inputs(b.inputs, seed=2)
    got, want = run_bundle(b, feeds), run_model(skip_dag(), feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5)
    assert "split in 2 parts" in format_text(explain(b))
