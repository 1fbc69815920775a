"""The spatial planner against brute force: every plan with split stages over a small
model, each priced by the estimate (routing + analysis.spatial), agrees with the planner."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from partitioner import ir, pipeline
from partitioner.analysis.costs import build_cost_table
from partitioner.analysis.routing import route_plan
from partitioner.errors import InfeasibleError
from partitioner.solver.spatial_baselines import BASELINES, baseline_plan
from tests.test_spatial_fixtures import conv_chain, mesh, one_conv


def _hand(table: ir.CostTable, stages: list[ir.Stage]) -> ir.Plan:
    est = ir.Estimate(latency=0.0, compute=0.0, communication=0.0, weight_loading=0.0,
                      bottleneck=0.0)
    where = {p.layer: p.index for p in table.positions if p.layer is not None}
    placement = ["src"] * len(table.positions)  # source and destination pseudo layers
    for s in stages:
        for k in range(s.first, s.last + 1):
            placement[where[k]] = s.devices[0]
    return ir.Plan("feasible", "latency", tuple(stages), est, 0.0, tuple(placement),
                   {}, {"source": "src", "destination": "src"})


def _stagings(n_layers: int, splittable: set[int]):  # type: ignore[no-untyped-def]
    """Every cut of layers 0..n-1 into consecutive stages, each flagged split or not."""
    for cuts in itertools.product((False, True), repeat=n_layers - 1):
        bounds, start = [], 0
        for k, cut in enumerate(cuts):
            if cut:
                bounds.append((start, k))
                start = k + 1
        bounds.append((start, n_layers - 1))
        for flags in itertools.product((False, True), repeat=len(bounds)):
            if any(f and not all(k in splittable for k in range(a, b + 1))
                   for f, (a, b) in zip(flags, bounds, strict=True)):
                continue
            yield list(zip(bounds, flags, strict=True))


def _brute(path: Path, system: ir.System, max_split: int) -> float:
    prepared = pipeline._prepare(path, None, "major", None)
    graph = prepared.graph
    table = build_cost_table(graph, system)
    devices = table.device_names
    splittable = {k for k, layer in enumerate(graph.layers) if layer.rows is not None}
    from partitioner.analysis.spatial import volume

    best = float("inf")
    for staging in _stagings(len(graph.layers), splittable):
        if sum(f for _, f in staging) > max_split:
            continue
        options = []
        for (a, b), split in staging:
            if not split:
                options.append([ir.Stage(d, None, a, b) for d in devices])
                continue
            vol = volume(graph, a, b)
            if isinstance(vol, str):
                options.append([])
                continue
            h = vol.height
            choices = []
            for m in range(2, len(devices) + 1):
                for subset in itertools.combinations(devices, m):
                    for cuts in itertools.combinations(range(1, h), m - 1):
                        edges = (0, *cuts, h)
                        choices.append(ir.Stage(None, None, a, b, parts=tuple(
                            ir.Part(d, None, (edges[i], edges[i + 1] - 1))
                            for i, d in enumerate(subset))))
            options.append(choices)
        for stages in itertools.product(*options):
            # neighbouring whole stages on one device are one run (the solver's stages)
            if any(not x.parts and not y.parts and x.device == y.device
                   for x, y in zip(stages, stages[1:], strict=False)):
                continue
            try:
                plan = route_plan(graph, table, _hand(table, list(stages)))
            except InfeasibleError:
                continue
            best = min(best, plan.estimate.latency)
    return best


@pytest.mark.parametrize("bandwidth,latency", [(5e9, 1e-6), (2e8, 1e-5), (1e7, 1e-4)])
def test_one_split_layer_equals_brute_force(tmp_path: Path, bandwidth: float,
                                            latency: float) -> None:
    path = one_conv(tmp_path, height=23, width=31)
    system = mesh([2e9, 5e9], bandwidth=bandwidth, latency=latency, source_flops=1e9,
                  destination=True)
    planned = pipeline.plan(path, system, spatial=True).plan
    want = _brute(path, system, max_split=1)
    assert planned.estimate.latency == pytest.approx(want, rel=1e-6)
    if bandwidth >= 5e9:  # fast links: the optimum splits the conv
        assert any(s.parts for s in planned.stages)


def test_chain_never_above_single_split_brute_force(tmp_path: Path) -> None:
    path = conv_chain(tmp_path, height=9, width=5)
    system = mesh([3e9, 6e9], bandwidth=2e9, latency=1e-6)
    planned = pipeline.plan(path, system, spatial=True).plan
    want = _brute(path, system, max_split=1)
    assert planned.estimate.latency <= want * (1 + 1e-6)


def test_baselines_plan_and_never_beat_the_planner_here(tmp_path: Path) -> None:
    path = conv_chain(tmp_path, height=61, width=41)
    system = mesh([20e9, 40e9, 40e9], bandwidth=5e9, latency=1e-6)
    result = pipeline.plan(path, system, spatial=True)
    table = result.table
    for kind in BASELINES:
        plan = baseline_plan(result.prepared.graph, table, kind)
        assert plan.estimate.latency > 0
        if kind != "offload" and kind != "equal":
            assert any(s.parts for s in plan.stages), kind
        assert result.plan.estimate.latency <= plan.estimate.latency * (1 + 1e-9), kind
