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
