"""Early-exit planning (DISS §6.4): the solver's expected latency equals brute force over
every placement, caps bound the worst case, and the C2 figures of DISS Fig 6.4."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest

import models
from partitioner import ir, pipeline
from partitioner.analysis.exits import price_chain
from partitioner.errors import InfeasibleError, UserError
from partitioner.solver import solve
from partitioner.solver.memory import placement_memory
from partitioner.solver.synthetic import TableSpec, random_table


def _with_exits(table: ir.CostTable, layers: list[int], probs: list[float],
                nbytes: int = 4000) -> ir.CostTable:
    """``table`` with exit heads after model layers ``layers`` and links between all
    devices (so a head's output can reach the destination from anywhere)."""
    at = {p.layer: p.index for p in table.positions if p.kind == "layer"}
    exits = tuple((at[k], ir.ExitHead(f"exit{n}", p), nbytes)
                  for n, (k, p) in enumerate(zip(layers, probs, strict=True)))
    names = table.device_names
    links = tuple(ir.Link(a, b, 1e5 * (1 + i + j), latency=0.001)
                  for i, a in enumerate(names) for j, b in enumerate(names) if i < j)
    return replace(table, exits=exits, system=replace(table.system, links=links))


def _brute(table: ir.CostTable, objective: ir.Objective) -> tuple[float, float] | None:
    """(least objective, its expected latency) over every placement and frequency."""
    names = table.device_names
    choices = [p.allowed or names for p in table.positions]
    freq_sets = [table.frequencies.get(d, (None,)) for d in names]
    best: tuple[float, float] | None = None
    for placement in itertools.product(*choices):
        if any(used > table.system.device(d).memory
               for d, used in placement_memory(table, placement).items()):
            continue
        for combo in itertools.product(*freq_sets):
            freqs = dict(zip(names, combo, strict=True))
            try:
                price = price_chain(table, placement, freqs)
            except UserError:
                continue
            if objective.max_latency is not None and \
                    price.worst_latency > objective.max_latency * (1 + 1e-9):
                continue
            if objective.kind == "energy":
                edge = sum(price.energy.get(d.name, 0.0) for d in table.system.devices
                           if d.device_class == "edge")
                key = (edge, price.expected_latency)
            else:
                key = (price.expected_latency, 0.0)
            if best is None or key < best:
                best = key
    return best


def _solve_as_brute(table: ir.CostTable, objective: ir.Objective) -> ir.Plan | None:
    """The solver's plan, checked against brute force (None: both find no plan)."""
    best = _brute(table, objective)
    if best is None:
        with pytest.raises(InfeasibleError):
            solve(table, objective)
        return None
    plan = solve(table, objective)
    assert plan.estimate.expected_latency == pytest.approx(best[0], rel=1e-9, abs=1e-12)
    return plan


CASES = [
    # (spec, exit layers, probabilities)
    (TableSpec(layers=5, devices=3), [1], [0.6]),
    (TableSpec(layers=5, devices=3, mbs=2), [2], [0.3]),
    (TableSpec(layers=6, devices=2, frequencies=2), [1, 3], [0.5, 0.4]),
    (TableSpec(layers=5, devices=3, pin_prob=0.3, spread=1.0), [0, 3], [0.9, 0.2]),
    (TableSpec(layers=5, devices=3, memory_frac=0.5), [2], [0.7]),
    (TableSpec(layers=6, devices=2, hidden_by_end=True), [4], [0.5]),
]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_expected_latency_equals_brute_force(case: int, seed: int) -> None:
    spec, layers, probs = CASES[case]
    table = _with_exits(random_table(spec, seed), layers, probs)
    plan = _solve_as_brute(table, ir.Objective())
    if plan is None:
        return
    # the plan's own price agrees, and the worst case is reported as latency
    price = price_chain(table, plan.placement, plan.frequencies)
    assert plan.estimate.latency == pytest.approx(price.worst_latency)
    assert plan.estimate.expected_latency <= plan.estimate.latency + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_worst_case_cap_equals_brute_force(seed: int) -> None:
    table = _with_exits(random_table(TableSpec(layers=5, devices=3, spread=1.0), seed),
                        [1, 3], [0.5, 0.5])
    free = solve(table, ir.Objective())
    # a cap just under the unconstrained optimum's worst case binds
    cap = free.estimate.latency * 0.97
    plan = _solve_as_brute(table, ir.Objective(max_latency=cap))
    if plan is not None:
        assert plan.estimate.latency <= cap * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_energy_objective_equals_brute_force(seed: int) -> None:
    table = _with_exits(random_table(TableSpec(layers=5, devices=3), seed), [2], [0.6])
    objective = ir.Objective(kind="energy")
    best = _brute(table, objective)
    assert best is not None
    plan = solve(table, objective)
    assert plan.estimate.expected_latency == pytest.approx(best[1], rel=1e-9, abs=1e-12)


def test_probability_zero_and_one_price_one_outcome() -> None:
    table = random_table(TableSpec(layers=5, devices=3), 4)
    never_t, always_t = _with_exits(table, [2], [0.0]), _with_exits(table, [2], [1.0])
    never, always = solve(never_t, ir.Objective()), solve(always_t, ir.Objective())
    # p = 0: every request continues; p = 1: every request leaves at the head
    outcomes = price_chain(never_t, never.placement, never.frequencies).outcomes
    assert never.estimate.expected_latency == pytest.approx(outcomes[-1][2])
    assert [p for _, p, _ in outcomes] == [0.0, 1.0]
    outcomes = price_chain(always_t, always.placement, always.frequencies).outcomes
    assert always.estimate.expected_latency == pytest.approx(outcomes[0][2])
    assert always.estimate.expected_latency < never.estimate.expected_latency


def test_stage_ends_in_the_exit_head() -> None:
    table = _with_exits(random_table(TableSpec(layers=5, devices=2), 1), [2], [0.5])
    plan = solve(table, ir.Objective())
    heads = [s for s in plan.stages if s.exit is not None]
    assert len(heads) == 1 and heads[0].last == 2
    assert plan.exits[0][1].output == "exit0"


def test_objectives_not_supported_with_exits_are_one_line_errors() -> None:
    table = _with_exits(random_table(TableSpec(layers=4, devices=2), 0), [1], [0.5])
    with pytest.raises(UserError, match="throughput objective is not supported"):
        solve(table, ir.Objective(kind="throughput"))


# --------------------------------------------------------------------------- DISS C2



@pytest.fixture(scope="module")
def branchy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.save_model("branchy_alexnet",
                             tmp_path_factory.mktemp("exits") / "branchy_alexnet.onnx")


def _c2(tmp: Path, bw: float) -> Path:
    """DISS configuration C2 (benchmarks/exits.py) with the Pi-cloud link at ``bw``."""
    from benchmarks.exits import C2

    path = tmp / f"c2-{bw:g}.toml"
    path.write_text(C2.replace("bandwidth = 1e6", f"bandwidth = {bw!r}"))
    return path


def test_c2_low_bandwidth_keeps_the_branch_on_the_pi(branchy: Path, tmp_path: Path) -> None:
    system = _c2(tmp_path, 5e5)
    prepared = pipeline.plan(branchy, system).prepared  # loaded once for both plans
    plain = pipeline.plan(prepared, system)
    early = pipeline.plan(prepared, system, exits=[f"exit1={models.exits.EXIT_PROBABILITY}"])
    names = [layer.name for layer in prepared.graph.layers]
    on_pi = [names[k] for s in early.plan.stages if s.device == "pi3"
             for k in range(s.first, s.last + 1)]
    # DISS: conv1, conv2 and the three branch layers on the Pi
    assert on_pi == ["features.0", "features.3", "exit1.conv1", "exit1.conv2", "exit1.fc"]
    assert early.plan.estimate.expected_latency < 0.8 * plain.plan.estimate.latency
    # the worst case (a request that continues) is what --max-latency would cap
    assert early.plan.estimate.latency > early.plan.estimate.expected_latency
    assert early.plan.to_json()["exits"][0]["stage"] == 0


def test_c2_high_bandwidth_gains_nothing(branchy: Path, tmp_path: Path) -> None:
    system = _c2(tmp_path, 1e8)
    prepared = pipeline.plan(branchy, system).prepared
    plain = pipeline.plan(prepared, system)
    early = pipeline.plan(prepared, system, exits=["exit1=0.656"])
    branch = {k for k, layer in enumerate(prepared.graph.layers)
              if layer.name.startswith("exit1.")}
    pi_layers = {k for s in early.plan.stages if s.device == "pi3"
                 for k in range(s.first, s.last + 1)}
    assert not branch & pi_layers
    # the cloud runs everything, branch included: what is left to gain is the cloud's
    # own skipped work (its weight loading, analytically), a few per cent, against
    # more than 20 % at 5e5 B/s
    assert early.plan.estimate.expected_latency > 0.9 * plain.plan.estimate.latency
    assert early.plan.estimate.latency == pytest.approx(plain.plan.estimate.latency,
                                                        rel=1e-6)
