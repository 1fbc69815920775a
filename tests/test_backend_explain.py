"""Solver plans compiled with their cost table; explain (text, --json, --plot)."""

from __future__ import annotations

import json

import pytest

from partitioner.analysis.costs import build_cost_table
from partitioner.backend import compile_bundle, load_bundle
from partitioner.backend.explain import explain
from partitioner.backend.timeline import placement_of
from partitioner.cli import main
from partitioner.ir import Objective
from partitioner.solver import evaluate, solve
from tests.test_backend import BACK_AND_FORTH, system
from tests.test_slicing import GROUPS
from tests.test_slicing_fixtures import prepare, skip_dag


@pytest.fixture(scope="module")
def solved(tmp_path_factory):
    prepared = prepare(skip_dag(), GROUPS)
    # layers 0..1 are private (trusted edge only), the convolutions pay off on the hub
    table = build_cost_table(prepared.graph, system(), private=2)
    plan = solve(table, Objective("latency"))
    assert [(s.device, s.first, s.last) for s in plan.stages] == [("edge", 0, 1),
                                                                  ("hub", 2, 8)]
    out = compile_bundle(prepared, plan, system(), tmp_path_factory.mktemp("s") / "b",
                         table=table)
    return prepared, table, plan, out


def test_timeline_adds_up_to_the_solver_latency(solved):
    _, table, plan, out = solved
    b = load_bundle(out)
    timeline = b.extra["timeline"]
    assert timeline, "a bundle compiled with its cost table carries a timeline"
    total = sum(s["duration"] for s in timeline)
    assert total == pytest.approx(plan.estimate.latency, rel=1e-9)
    # segments are laid end to end
    for a, c in zip(timeline, timeline[1:], strict=False):
        assert c["start"] == pytest.approx(a["start"] + a["duration"])
    # the per-stage figures are the stage's own segments
    for s in b.stages:
        own = [x for x in timeline if x["stage"] == s.id and x["kind"] == "compute"]
        assert s.estimate["compute"] == pytest.approx(sum(x["duration"] for x in own))


def test_hand_made_plan_is_priced_like_evaluate(tmp_path):
    prepared = prepare(skip_dag(), GROUPS)
    table = build_cost_table(prepared.graph, system())
    out = compile_bundle(prepared, BACK_AND_FORTH, system(), tmp_path / "b", table=table,
                         verify=False)
    placement = placement_of(BACK_AND_FORTH, table)
    assert placement is not None
    want = evaluate(table, placement, {}).latency
    got = sum(s["duration"] for s in load_bundle(out).extra["timeline"])
    assert got == pytest.approx(want, rel=1e-9)


def test_explain_document_counts_bytes_per_cut(solved):
    _, _, plan, out = solved
    doc = explain(load_bundle(out))
    assert [s["device"] for s in doc["stages"]] == [s.device for s in plan.stages]
    assert doc["estimate"]["latency"] == pytest.approx(plan.estimate.latency)
    for s, c in zip(doc["stages"], doc["cuts"], strict=True):
        assert c["bytes"] >= c["forwarded_bytes"] >= 0
        assert s["layer_names"][0] == f"layer{s['layers'][0]}"


def test_explain_cli_json_text_and_plots(tmp_path, capsys):
    out = compile_bundle(prepare(skip_dag(), GROUPS), BACK_AND_FORTH, system(),
                         tmp_path / "b")
    assert main(["explain", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [c["forwarded"] for c in doc["cuts"]] == [["x"], ["x", "a"], ["early"]]
    assert [c["to"] for c in doc["cuts"]] == ["hub", "edge", "edge"]
    assert main(["explain", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stage 1  hub  layers 2..4" in text and "forwarded: x, a" in text
    pytest.importorskip("matplotlib")
    for name in ("plan.png", "plan.svg"):
        assert main(["explain", str(out), "--plot", str(tmp_path / name), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["plot"] == str(tmp_path / name)
        head = (tmp_path / name).read_bytes()[:64]
        assert head.startswith(b"\x89PNG") if name.endswith("png") else b"<?xml" in head
    assert main(["explain", str(out), "--plot", str(tmp_path / "plan.pdf")]) == 2
    assert "expected a .png or .svg" in capsys.readouterr().err
    assert not (tmp_path / "plan.pdf").exists()


def test_explain_cli_bad_bundle(tmp_path, capsys):
    assert main(["explain", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a bundle directory" in err


def _normalise(doc):
    """Golden-file form: hashes masked, floats rounded to 9 significant digits."""
    if isinstance(doc, dict):
        return {k: ("<sha256>" if k in ("sha256", "external_data_sha256") and v else
                    "<diff>" if k in ("max_abs_diff", "max_rel_diff") else _normalise(v))
                for k, v in doc.items()}
    if isinstance(doc, list):
        return [_normalise(x) for x in doc]
    if isinstance(doc, float):
        return float(f"{doc:.9g}")
    return doc


def test_golden_manifest_of_tiny_cnn_on_the_example_system(tmp_path):
    import os
    from pathlib import Path

    import models
    from partitioner.analysis.system import load_system
    from partitioner.backend.manifest import MANIFEST, dumps
    from partitioner.frontend import load_model
    from tests.test_backend_zoo import _plan

    golden = Path(__file__).parent / "testdata" / "manifests" / "tiny_cnn_edge_hub_cloud.json"
    examples = Path(__file__).resolve().parents[1] / "partitioner" / "data"
    sys_ = load_system(examples / "edge-hub-cloud.toml")
    prepared = load_model(models.save_model("tiny_cnn", tmp_path / "tiny_cnn.onnx"))
    table = build_cost_table(prepared.graph, sys_)
    plan = _plan([0, 1, 3], ["pi3", "nano", "gpu1080ti"], len(prepared.graph.layers))
    out = compile_bundle(prepared, plan, sys_, tmp_path / "b", table=table, triton=True)
    doc = _normalise(json.loads((out / MANIFEST).read_text()))
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(dumps(doc) + "\n")
    assert doc == json.loads(golden.read_text())
