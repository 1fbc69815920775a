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


def test_timeline_adds_up_to_the_routed_estimate(solved):
    _, table, plan, out = solved
    b = load_bundle(out)
    timeline = b.extra["timeline"]
    assert timeline, "a bundle compiled with its cost table carries a timeline"
    routed = b.plan["estimate"]
    total = sum(s["duration"] for s in timeline)
    assert total == pytest.approx(routed["latency"], rel=1e-9)
    # routing after the solve never costs more than the chain the solver priced
    assert routed["latency"] <= plan.estimate.latency * (1 + 1e-12)
    # segments are laid end to end
    for a, c in zip(timeline, timeline[1:], strict=False):
        assert c["start"] == pytest.approx(a["start"] + a["duration"])
    # the parts add up: stages' compute + weight loading + internal + sends, plus the
    # pseudo layers' segments, are the estimate's compute + weight loading + communication
    pseudo = [x for x in timeline if x["stage"] is None]
    for key, part in (("compute", "compute"), ("weight_loading", "weight_loading")):
        staged = sum(s.estimate[key] for s in b.stages)
        rest = sum(x[part] for x in pseudo if x["kind"] == "compute")
        assert staged + rest == pytest.approx(routed[key], rel=1e-9, abs=1e-15)
    comm = sum(s.estimate["internal"] + s.estimate["send"] for s in b.stages)
    comm += sum(x["internal"] if x["kind"] == "compute" else x["duration"] for x in pseudo)
    assert comm == pytest.approx(routed["communication"], rel=1e-9)


def test_hand_made_plan_is_priced_like_evaluate(tmp_path):
    from partitioner.analysis.routing import route_plan

    prepared = prepare(skip_dag(), GROUPS)
    table = build_cost_table(prepared.graph, system())
    plan = route_plan(prepared.graph, table, BACK_AND_FORTH, mode="forwarded")
    out = compile_bundle(prepared, plan, system(), tmp_path / "b", table=table,
                         verify=False)
    placement = placement_of(BACK_AND_FORTH, table)
    assert placement is not None
    got = sum(s["duration"] for s in load_bundle(out).extra["timeline"])
    assert got == pytest.approx(plan.estimate.latency, rel=1e-9)
    # forwarded is the chain evaluate prices, except that the fixture's cuts also count
    # the Constant k (4 B) that every stage file regenerates: edge->hub and hub->edge
    want = evaluate(table, placement, {}).latency
    assert want - plan.estimate.latency == pytest.approx(2 * 4 / 1e7, rel=1e-6)


def test_explain_document_counts_bytes_per_link(solved):
    _, _, plan, out = solved
    b = load_bundle(out)
    doc = explain(b)
    assert [s["device"] for s in doc["stages"]] == [s.device for s in plan.stages]
    assert doc["estimate"]["latency"] == pytest.approx(b.plan["estimate"]["latency"])
    for s in doc["stages"]:
        assert s["layer_names"][0] == f"layer{s['layers'][0]}"
    # a link's bytes are the network sends between its two devices
    for link in doc["links"]:
        sends = [x for s in doc["stages"] for u in s["units"] if u["device"] == link["from"]
                 for x in u["sends"] if x["to_device"] == link["to"]]
        sends += [x for x in doc["input_sends"] if x["to_device"] == link["to"]
                  and doc["source"] == link["from"]]
        assert link["bytes"] == sum(x["bytes"] for x in sends) > 0


def test_explain_cli_json_text_and_plots(tmp_path, capsys):
    out = compile_bundle(prepare(skip_dag(), GROUPS), BACK_AND_FORTH, system(),
                         tmp_path / "b")
    assert main(["explain", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["transfer"] == "direct" and doc["schema_version"] == 2
    # the A-B-A plan: a (and x) stay on the edge for stage 2; only a goes to the hub
    assert [(x["from"], x["to"], x["tensors"]) for x in doc["links"]] == [
        ("edge", "hub", ["a"]), ("hub", "edge", ["early", "c"])]
    assert [x["bytes"] for x in doc["links"]] == [4 * 4 * 64, 2 * 4 * 4 * 64]
    assert main(["explain", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stage 1  hub  layers 2..4" in text and "c from 1 (direct)" in text
    assert "edge -> hub: 1.0 KiB (a)" in text
    pytest.importorskip("matplotlib")
    for name in ("plan.png", "plan.svg"):
        assert main(["explain", str(out), "--plot", str(tmp_path / name), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["plot"] == str(tmp_path / name)
        head = (tmp_path / name).read_bytes()[:64]
        assert head.startswith(b"\x89PNG") if name.endswith("png") else b"<?xml" in head
    assert main(["explain", str(out), "--plot", str(tmp_path / "plan.pdf")]) == 2
    assert "expected a .png or .svg" in capsys.readouterr().err
    assert not (tmp_path / "plan.pdf").exists()
    (tmp_path / "afile").write_text("x")
    for where, said in (("afile", "is a file, not a folder"), ("nowhere", "does not exist")):
        assert main(["explain", str(out), "--plot", str(tmp_path / where / "p.png")]) == 2
        assert said in capsys.readouterr().err


def test_svg_plot_shows_times_bytes_and_totals(solved, tmp_path):
    pytest.importorskip("matplotlib")
    from partitioner.backend.draw import plot

    doc = explain(load_bundle(solved[3]))
    text = plot(doc, tmp_path / "p.svg").read_text()
    from partitioner.backend.draw import _ms
    from partitioner.backend.explain import size_text as _size

    assert f"latency {_ms(doc['estimate']['latency'])}" in text
    sends = [x for s in doc["stages"] for u in s["units"] for x in u["sends"] if x["network"]]
    assert sends
    for x in sends:  # every network send is an arrow labelled with its bytes
        assert f"{_size(x['bytes'])} direct" in text
    assert "stage 0" in text  # compute bars name their stage


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
