"""The spatial-split planner (DISTREDGE): exact row splits, plans that compile and
reproduce the model, agreement of planner and estimate, and its error messages."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import models
from partitioner import ir, pipeline
from partitioner.errors import UserError
from partitioner.solver.spatial import min_max_split
from tests.test_spatial_fixtures import conv_chain, mesh


def _brute_min_max(costs: list[np.ndarray], max_parts: int, min_parts: int = 1) -> float:
    """Every ordered choice of devices (in the given order) and every set of cuts."""
    h = costs[0].shape[0]
    best = math.inf
    for m in range(min_parts, min(max_parts, len(costs)) + 1):
        for devs in itertools.combinations(range(len(costs)), m):
            for cuts in itertools.combinations(range(1, h), m - 1):
                bounds = (0, *cuts, h)
                worst = max(float(costs[q][bounds[k], bounds[k + 1] - 1])
                            for k, q in enumerate(devs))
                best = min(best, worst)
    return best


def _monotone_costs(rng: np.random.Generator, h: int, n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        per_row = rng.uniform(0.5, 3.0)
        fixed = rng.uniform(0.0, 2.0)
        halo_a = rng.uniform(0, 1, h).cumsum()[::-1] * 0.1  # border bands cheaper
        c = np.full((h, h), math.inf)
        for a in range(h):
            for b in range(a, h):
                c[a, b] = fixed + per_row * (b - a + 1) + halo_a[a] * 0.0 + 0.3 * (a > 0) \
                    + 0.3 * (b < h - 1)
        out.append(c)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_min_max_split_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    h, n = int(rng.integers(3, 9)), int(rng.integers(2, 5))
    costs = _monotone_costs(rng, h, n)
    for max_parts, min_parts in ((m, k) for m in range(1, n + 1) for k in (1, 2) if k <= m):
        got = min_max_split(costs, max_parts, min_parts=min_parts)
        assert got is not None
        value, parts = got
        assert min_parts <= len(parts) <= max_parts
        rows = [r for _, a, b in parts for r in range(a, b + 1)]
        assert rows == list(range(h))
        assert value == pytest.approx(max(costs[q][a, b] for q, a, b in parts))
        assert value <= _brute_min_max(costs, max_parts, min_parts) * (1 + 1e-7)


def test_chain_plan_compiles_and_reproduces(tmp_path: Path) -> None:
    path = conv_chain(tmp_path)
    system = mesh([50e9, 50e9, 50e9])
    out = tmp_path / "bundle"
    result = pipeline.compile(path, system, out, spatial=True)
    split = [s for s in result.plan.stages if s.parts]
    assert split, "fast identical devices: the conv layers are split"
    for s in split:
        assert len(s.parts) >= 2
    assert result.bundle is not None and (out / "manifest.json").exists()
    # compile verified the chained parts against the whole model (it fails otherwise)
    import json
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["verification"]["max_rel_diff"] <= doc["verification"]["tolerance"]


@pytest.mark.parametrize("name,size", [("tiny_cnn", 33), ("resnet18", 33), ("vgg11", 33),
                                       ("mobilenet_v2", 33), ("yolo_small", 64)])
def test_zoo_spatial_plans_compile(tmp_path: Path, name: str, size: int) -> None:
    """Odd input heights; compile verifies the chained parts against the whole model."""
    import onnx

    path = tmp_path / f"{name}.onnx"
    onnx.save(models.build_model(name, image_size=size), path)
    system = mesh([80e9, 80e9, 80e9, 80e9], bandwidth=1.25e10)
    result = pipeline.compile(path, system, tmp_path / "b", spatial=True)
    assert any(s.parts for s in result.plan.stages), f"{name}: no split stage"


def _plan(path: Path, system: ir.System, **kw: object) -> pipeline.PlanResult:
    return pipeline.plan(path, system, **kw)  # type: ignore[arg-type]


def test_vgg16_four_identical_devices_beats_layerwise(tmp_path: Path) -> None:
    path = tmp_path / "vgg16.onnx"
    import onnx
    onnx.save(models.build_model("vgg16"), path)
    system = mesh([100e9] * 4, bandwidth=1.25e10)
    prepared = pipeline._prepare(path, None, "major", None)
    lw = _plan(prepared, system)
    sp = _plan(prepared, system, spatial=True)
    assert lw.plan.estimate.latency / sp.plan.estimate.latency >= 2.5


def test_faster_devices_get_more_rows(tmp_path: Path) -> None:
    path = conv_chain(tmp_path, height=61)
    system = mesh([20e9, 80e9, 40e9], bandwidth=1.25e10)
    sp = _plan(path, system, spatial=True).plan
    split = [s for s in sp.stages if s.parts]
    assert split
    for s in split:
        rows = {p.device: p.rows[1] - p.rows[0] + 1 for p in s.parts}
        if {"d0", "d1"} <= rows.keys():
            assert rows["d1"] > rows["d0"]
        if {"d1", "d2"} <= rows.keys():
            assert rows["d1"] >= rows["d2"]


def test_planner_value_is_the_estimate(tmp_path: Path) -> None:
    from partitioner.analysis.costs import build_cost_table
    from partitioner.solver.dp import phi_vectors
    from partitioner.solver.runs import run_arrays
    from partitioner.solver.spatial import _dp

    path = conv_chain(tmp_path, height=61, width=41)
    system = mesh([3e9, 6e9, 6e9], bandwidth=5e9, latency=1e-6)
    result = _plan(path, system, spatial=True)
    table = build_cost_table(result.prepared.graph, system)
    found = _dp(result.prepared.graph, table, phi_vectors(run_arrays(table))[0], 4, math.inf)
    assert found is not None
    assert any(s.parts for s in result.plan.stages)
    assert found[0] == pytest.approx(result.plan.estimate.latency, rel=1e-9)


def test_never_worse_than_layerwise(tmp_path: Path) -> None:
    path = conv_chain(tmp_path)
    # slow links: splitting does not pay
    system = mesh([50e9, 50e9, 50e9], bandwidth=1e5, latency=0.01)
    lw = _plan(path, system).plan
    sp = _plan(path, system, spatial=True).plan
    assert sp.estimate.latency <= lw.estimate.latency * (1 + 1e-12)


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    path = conv_chain(tmp_path)
    system = mesh([50e9, 50e9])
    with pytest.raises(UserError, match="--max-parts 1"):
        _plan(path, system, spatial=True, max_parts=1)
    with pytest.raises(UserError, match="--max-parts 9"):
        _plan(path, system, spatial=True, max_parts=9)
    with pytest.raises(UserError, match="expected one of"):
        _plan(path, system, spatial_baseline="deepest")
    with pytest.raises(UserError, match="energy"):
        _plan(path, system, spatial=True, objective=ir.Objective(kind="energy"))


def test_cli_max_parts_without_spatial(tmp_path: Path) -> None:
    path = conv_chain(tmp_path)
    sysfile = tmp_path / "s.toml"
    sysfile.write_text('[[device]]\nname = "a"\nclass = "edge"\nflops = 1e9\n'
                       'memory_bandwidth = 1e9\nnetwork_bandwidth = 1e8\n')
    r = subprocess.run([sys.executable, "-m", "partitioner", "plan", str(path), "--system",
                        str(sysfile), "--max-parts", "3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--max-parts 3" in r.stderr


@pytest.mark.parametrize("destination", [False, True])
def test_estimate_of_a_layerwise_plan_is_evaluate(tmp_path: Path, destination: bool) -> None:
    """The split-stage estimate, given a plan without parts, prices it as evaluate does."""
    from partitioner.analysis.routing import messages, placement_of
    from partitioner.analysis.spatial_estimate import estimate_plan

    path = conv_chain(tmp_path)
    system = mesh([3e9, 6e9], bandwidth=1e8, latency=1e-4, destination=destination)
    result = _plan(path, system)
    plan, table, graph = result.plan, result.table, result.prepared.graph
    msgs = messages(graph, plan, plan.routes, table)
    placement = placement_of(plan, table)
    assert placement is not None
    est = estimate_plan(graph, table, plan, msgs, placement, dict(plan.frequencies))
    assert est.latency == pytest.approx(plan.estimate.latency, rel=1e-12)
    assert est.compute + est.communication + est.weight_loading == pytest.approx(est.latency)


def test_throughput_objective_and_memory_caps(tmp_path: Path) -> None:
    from dataclasses import replace

    path = conv_chain(tmp_path, height=61, width=41)
    system = mesh([20e9, 40e9, 40e9], bandwidth=5e9, latency=1e-6)
    lw = _plan(path, system, objective=ir.Objective(kind="throughput")).plan
    sp = _plan(path, system, spatial=True, objective=ir.Objective(kind="throughput")).plan
    assert sp.estimate.bottleneck <= lw.estimate.bottleneck * (1 + 1e-12)
    # d1 cannot hold a conv layer's weights: it takes no part
    small = replace(system, devices=tuple(replace(d, memory=64.0) if d.name == "d1" else d
                                          for d in system.devices))
    capped = _plan(path, small, spatial=True).plan
    assert all(p.device != "d1" for s in capped.stages for p in s.parts or ())


@pytest.mark.parametrize("name", ["resnet18", "yolo_small"])
def test_analytic_part_rows_are_the_back_ends(tmp_path: Path, name: str) -> None:
    """The rows the estimate prices (halo included, residuals, other outputs) are exactly
    the rows the back end's part models read and produce."""
    import onnx

    from partitioner.analysis.spatial import unit_rows
    from partitioner.backend.parts import build_parts

    path = tmp_path / f"{name}.onnx"
    onnx.save(models.build_model(name, image_size=33 if name == "resnet18" else 64), path)
    result = _plan(path, mesh([80e9] * 4, bandwidth=1.25e10), spatial=True)
    rows = unit_rows(result.prepared.graph, result.plan)
    checked = 0
    for s in result.plan.stages:
        if not s.parts:
            continue
        for k, pm in enumerate(build_parts(result.prepared, s)):
            ins, outs = rows(s.id, k)
            for t, r in pm.inputs:
                assert ins.get(t.name) == (None if r is None else tuple(r)), (s.id, k, t.name)
                checked += 1
            for t, r in pm.outputs:
                assert outs.get(t.name) == (None if r is None else tuple(r)), (s.id, k, t.name)
                checked += 1
    assert checked > 20
