"""The timeline and per-stage figures of a compiled spatial plan: priced by the one spatial
cost model (parts in parallel, each its scatter, compute and gather), consistent with the
plan's estimate, and shown by ``explain``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from partitioner import pipeline
from partitioner.backend.explain import explain, format_text
from partitioner.backend.manifest import load_bundle
from tests.test_spatial_fixtures import conv_chain, mesh

REL = 1e-9


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict, str]:
    tmp = tmp_path_factory.mktemp("sptl")
    path = conv_chain(tmp, height=61, width=41)
    # heterogeneous devices, slow enough links that scatter and gather matter
    system = mesh([3e9, 6e9, 4e9], bandwidth=2e8, latency=1e-4, destination=True)
    result = pipeline.compile(path, system, tmp / "bundle", spatial=True)
    assert any(s.parts for s in result.plan.stages), "no split stage to test"
    bundle = load_bundle(tmp / "bundle")
    doc = explain(bundle)
    return result, doc, format_text(doc)


def test_timeline_ends_at_the_estimate(compiled: tuple) -> None:
    result, doc, _ = compiled
    est = result.plan.estimate
    segs = doc["timeline"]
    assert segs, "a compiled spatial plan has a priced timeline"
    end = max(s["start"] + s["duration"] for s in segs)
    assert end == pytest.approx(est.latency, rel=REL)
    crit = [s for s in segs if s["critical"]]
    comp = [s for s in crit if s["kind"] == "compute"]
    assert sum(s["compute"] for s in comp) == pytest.approx(est.compute, rel=REL)
    assert sum(s["weight_loading"] for s in comp) == pytest.approx(est.weight_loading,
                                                                   rel=REL, abs=1e-15)
    moved = sum(s["duration"] for s in crit if s["kind"] == "transfer") \
        + sum(s["internal"] for s in comp)
    assert moved == pytest.approx(est.communication, rel=REL, abs=1e-15)


def test_parts_run_in_parallel_after_a_barrier(compiled: tuple) -> None:
    result, doc, _ = compiled
    segs = doc["timeline"]
    for stage in (s for s in result.plan.stages if s.parts):
        mine = [s for s in segs if s["stage"] == stage.id]
        parts = {s["part"] for s in mine}
        assert parts == set(range(len(stage.parts)))
        starts = {k: min(s["start"] for s in mine if s["part"] == k) for k in parts}
        assert len(set(starts.values())) == 1, "every part starts when the stage starts"
        t0 = next(iter(starts.values()))
        ends = {k: max(s["start"] + s["duration"] for s in mine if s["part"] == k)
                for k in parts}
        critical = {s["part"] for s in mine if s["critical"]}
        assert len(critical) == 1
        assert ends[critical.pop()] == pytest.approx(max(ends.values()), rel=REL)
        # each part's lane: its scatter, then its compute on its device, then its gather
        for k, part in enumerate(stage.parts):
            lane = sorted((s for s in mine if s["part"] == k), key=lambda s: s["start"])
            kinds = [s["kind"] for s in lane]
            assert kinds.count("compute") == 1
            compute = lane[kinds.index("compute")]
            assert compute["device"] == part.device
            assert all(s.get("receive") for s in lane[:kinds.index("compute")])
            assert not any(s.get("receive") for s in lane[kinds.index("compute") + 1:])
            assert lane[0]["start"] == pytest.approx(t0)
        # the next step starts after the slowest part
        later = [s for s in segs if s["start"] > t0 and s["stage"] != stage.id]
        if later:
            assert min(s["start"] for s in later) >= max(ends.values()) * (1 - REL)


def test_stage_figures_add_up_to_the_estimate(compiled: tuple) -> None:
    result, doc, _ = compiled
    est = result.plan.estimate
    stages = doc["stages"]
    assert all(s["estimate"] is not None for s in stages)
    pseudo = [s for s in doc["timeline"] if s["stage"] is None]
    total_time = sum(s["estimate"]["time"] for s in stages) + sum(s["duration"] for s in pseudo)
    assert total_time == pytest.approx(est.latency, rel=REL)
    compute = sum(s["estimate"]["compute"] for s in stages) + sum(
        s["compute"] for s in pseudo if s["kind"] == "compute")
    assert compute == pytest.approx(est.compute, rel=REL)
    comm = sum(s["estimate"][k] for s in stages for k in ("receive", "send", "internal")) \
        + sum(s["duration"] if s["kind"] == "transfer" else s["internal"] for s in pseudo)
    assert comm == pytest.approx(est.communication, rel=REL, abs=1e-15)
    for s in stages:
        figs = s["estimate"]
        if not s["split"]:
            assert "parts" not in figs
            continue
        parts = figs["parts"]
        assert [p["device"] for p in parts] == [u["device"] for u in s["units"]]
        # the stage's time is its slowest part's scatter + compute + gather
        assert figs["time"] == pytest.approx(max(p["time"] for p in parts), rel=REL)
        for p in parts:
            assert p["time"] == pytest.approx(p["receive"] + p["compute"] + p["send"], rel=REL)
        # a part pays for the rows it receives over the network, not for those it holds
        netted = {x["to"] for x in doc["input_sends"] if x["network"]}
        for p, u in zip(parts, s["units"], strict=True):
            if s["id"] == 0:
                assert (p["receive"] > 0) == (u["key"] in netted), u["key"]


def test_explain_shows_split_stage_figures(compiled: tuple) -> None:
    _, doc, text = compiled
    json.dumps(doc)  # --json is plain JSON
    for s in doc["stages"]:
        if not s["split"]:
            continue
        crit = next(p for p in s["estimate"]["parts"] if p["critical"])
        assert f"stage time {s['estimate']['time'] * 1e3:.3f} ms" in text
        assert f"critical part {s['id']}.{crit['part']}" in text
        for p in s["estimate"]["parts"]:
            assert f"scatter {p['receive'] * 1e3:.3f} ms + compute " \
                   f"{p['compute'] * 1e3:.3f} ms + gather {p['send'] * 1e3:.3f} ms" in text


def test_a_layerwise_plan_keeps_its_timeline(tmp_path: Path) -> None:
    """Without parts the timeline is the layer-wise walk (no ``part`` fields) and the
    stage figures keep their four entries."""
    path = conv_chain(tmp_path, height=21)
    system = mesh([3e9, 6e9], bandwidth=2e8, latency=1e-4)
    pipeline.compile(path, system, tmp_path / "b")
    doc = explain(load_bundle(tmp_path / "b"))
    assert doc["timeline"] and all("part" not in s for s in doc["timeline"])
    for s in doc["stages"]:
        assert set(s["estimate"]) == {"compute", "weight_loading", "internal", "send"}
