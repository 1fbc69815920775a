"""The integer-program-free paths: when they run, that they agree with the MIP beyond
brute-force sizes, and that the throughput search honours the time limit."""

from __future__ import annotations

import math

import pytest

from partitioner import ir
from partitioner.analysis.estimate import edge_energy
from partitioner.solver import evaluate, fast, solve
from partitioner.solver.synthetic import TableSpec, random_table


def _value(table: ir.CostTable, kind: str, plan: ir.Plan) -> float:
    est = plan.estimate
    return {"latency": est.latency, "throughput": est.bottleneck,
            "energy": edge_energy(table, est.energy)}[kind]


def test_fast_path_only_without_caps_or_binding_memory() -> None:
    table = random_table(TableSpec(layers=4, devices=3, frequencies=2), 0)
    assert fast.applies(table, ir.Objective(kind="throughput"))
    assert not fast.applies(table, ir.Objective(max_latency=1.0))
    assert not fast.applies(table, ir.Objective(max_energy={"d0": 1.0}))
    assert fast.applies(table, ir.Objective(kind="carbon"))
    tight = random_table(TableSpec(layers=4, devices=3, memory_frac=0.4), 0)
    assert not fast.applies(tight, ir.Objective())


@pytest.mark.parametrize("kind", ["latency", "energy", "throughput"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_matches_the_integer_program(kind: str, seed: int) -> None:
    """Twelve layers, three devices, two frequencies: too big to enumerate quickly, so
    the MIP (forced by a latency cap no plan reaches) is the reference."""
    table = random_table(TableSpec(layers=12, devices=3, frequencies=2, mbs=12,
                                   preprocess=True, spread=0.9), seed)
    quick = solve(table, ir.Objective(kind=kind))  # type: ignore[arg-type]
    mip = solve(table, ir.Objective(kind=kind, max_latency=1e9))  # type: ignore[arg-type]
    assert quick.status == mip.status == "optimal"
    assert math.isclose(_value(table, kind, quick), _value(table, kind, mip), rel_tol=1e-7)
    assert quick.estimate == evaluate(table, quick.placement, quick.frequencies)
    if kind != "latency":  # lexicographic: then the least latency
        assert math.isclose(quick.estimate.latency, mip.estimate.latency, rel_tol=1e-6)


@pytest.mark.parametrize("kind", ["throughput", "carbon"])
def test_search_stops_at_the_time_limit_with_a_valid_plan(kind: str) -> None:
    table = random_table(TableSpec(layers=40, devices=4, frequencies=3, mbs=40,
                                   source=False, destination=False), 0)
    plan = solve(table, ir.Objective(kind=kind, time_limit=1e-6))  # type: ignore[arg-type]
    assert plan.status == "feasible"
    assert plan.estimate == evaluate(table, plan.placement, plan.frequencies)
    assert plan.estimate.bottleneck > 0
    if kind == "carbon":
        assert plan.estimate.carbon is not None and plan.estimate.carbon > 0
