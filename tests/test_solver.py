"""Unit tests of the planner: canonical pricing, bundle-correctness, errors, plans."""

from __future__ import annotations

import math

import pytest

from partitioner import ir
from partitioner.errors import InfeasibleError, UserError
from partitioner.solver import canonical_bundles, evaluate, solve
from partitioner.solver.synthetic import TableSpec, random_table


def _table(n_layers: int, devices: list[tuple[str, str]], bundle_time, *, mbs: int = 0,
           transfer: float = 0.1, internal: float = 0.0, pseudo: bool = False,
           memory: dict[str, float] | None = None, weights: list[int] | None = None,
           energy=None, links: set[tuple[str, str]] | None = None, hidden: float = 0.0,
           preload: bool = True) -> ir.CostTable:
    """A hand-made table; ``bundle_time(i, j, device)`` prices model-layer bundles."""
    memory = memory or {}
    devs = tuple(ir.Device(n, c, 1e9, 1e9, 1e8, memory=memory.get(n, ir.INF))  # type: ignore[arg-type]
                 for n, c in devices)
    system = ir.System(devs, (), ir.Application(source=devices[0][0],
                                                destination=devices[0][0]))
    pos: list[ir.Position] = []
    if pseudo:
        pos.append(ir.Position(0, "<source>", "source", None, 0, (devices[0][0],)))
    for k in range(n_layers):
        pos.append(ir.Position(len(pos), f"conv{k}", "layer", k,
                               (weights or [0] * n_layers)[k]))
    if pseudo:
        pos.append(ir.Position(len(pos), "<destination>", "destination", None, 0,
                               (devices[0][0],)))
    mbs = mbs or n_layers
    bundles = {}
    off = 1 if pseudo else 0
    for i in range(len(pos)):
        for j in range(i, len(pos)):
            for d, _ in devices:
                if pos[i].kind != "layer":
                    if i == j:
                        bundles[i, j, d, None] = ir.BundleCost(0.0, energy=0.0)
                    continue
                if pos[j].kind != "layer" or j - i + 1 > mbs:
                    continue
                t = bundle_time(i - off, j - off, d)
                e = energy(i - off, j - off, d) if energy else None
                bundles[i, j, d, None] = ir.BundleCost(t, hidden=hidden, energy=e)
    transfers = {}
    for k in range(len(pos) - 1):
        for a, _ in devices:
            for b, _ in devices:
                if a == b:
                    transfers[k, a, b] = ir.TransferCost(internal, 0.0, 0.0)
                elif links is None or (a, b) in links or (b, a) in links:
                    transfers[k, a, b] = ir.TransferCost(transfer, 0.01, 0.02)
    return ir.CostTable("m", "sha", tuple(pos), system,
                        {d: (None,) for d, _ in devices}, bundles, transfers, mbs, preload)


def test_solver_pays_the_bundle_price_when_single_layers_look_cheaper() -> None:
    # On 'a' each layer alone costs 1 but the three together cost 10 (the sum of parts
    # underestimates); on 'b' layers cost 2.5 each and the bundle 7.5.
    def price(i: int, j: int, d: str) -> float:
        if d == "a":
            return 1.0 if i == j else 10.0
        return 2.5 * (j - i + 1)

    table = _table(3, [("a", "edge"), ("b", "hub")], price, transfer=100.0)
    plan = solve(table)
    assert plan.placement == ("b", "b", "b")
    assert math.isclose(plan.estimate.latency, 7.5)
    # The all-'a' plan is priced as its bundle, not as 3 x 1.
    assert math.isclose(evaluate(table, ("a", "a", "a"), {}).latency, 10.0)


def test_greedy_split_hidden_weights_and_internal_transfers() -> None:
    table = _table(5, [("a", "edge"), ("b", "hub")], lambda i, j, d: float(j - i + 1),
                   mbs=2, internal=0.25, hidden=0.5, transfer=1.0)
    bundles = canonical_bundles(table, ("a",) * 5)
    assert [(b.first, b.last) for b in bundles] == [(0, 1), (2, 3), (4, 4)]
    est = evaluate(table, ("a",) * 5, {})
    # 5 layer-seconds + 2 internal transfers; the first bundle has no predecessor.
    assert math.isclose(est.latency, 5.0 + 2 * 0.25)
    est = evaluate(table, ("a", "a", "b", "b", "b"), {})
    # b starts a run at position 2: its first bundle's hidden weight time is subtracted.
    assert math.isclose(est.latency, 5.0 + 1.0 + 0.25 - 0.5)
    assert math.isclose(est.weight_loading, -0.5)
    assert est.energy["a"] == pytest.approx(0.01) and est.energy["b"] == pytest.approx(0.02)
    assert math.isclose(est.bottleneck, max(2.0 + 1.0, 3.0 + 0.25 - 0.5))


def test_missing_link_is_infeasible_in_evaluate_and_explained_by_solve() -> None:
    table = _table(2, [("a", "edge"), ("b", "hub"), ("c", "cloud")],
                   lambda i, j, d: 1.0, pseudo=True, links={("a", "b")})
    with pytest.raises(InfeasibleError, match="no path from 'a' to 'c'"):
        evaluate(table, ("a", "c", "c", "a"), {})
    pinned = [p if p.kind != "layer" else ir.Position(p.index, p.name, p.kind, p.layer,
                                                      0, ("c",))
              for p in table.positions]
    table2 = ir.CostTable(**{**table.__dict__, "positions": tuple(pinned)})
    with pytest.raises(InfeasibleError, match="no path from 'a' to 'c'"):
        solve(table2)


def test_latency_cap_names_the_fastest_plan() -> None:
    table = _table(3, [("a", "edge"), ("b", "hub")], lambda i, j, d: 1.0 * (j - i + 1))
    with pytest.raises(InfeasibleError, match=r"latency cap 0\.5 s cannot be met: the "
                       r"fastest plan takes 3 s"):
        solve(table, ir.Objective(max_latency=0.5))


def test_memory_of_pinned_layers() -> None:
    table = _table(3, [("a", "edge"), ("b", "hub")], lambda i, j, d: 1.0, pseudo=True,
                   memory={"a": 100.0}, weights=[80, 80, 0])
    pinned = tuple(ir.Position(p.index, p.name, p.kind, p.layer, p.weight_bytes,
                               ("a",) if p.layer in (0, 1) else p.allowed)
                   for p in table.positions)
    table = ir.CostTable(**{**table.__dict__, "positions": pinned})
    with pytest.raises(InfeasibleError, match=r"memory of 'a' \(100 B\) cannot hold the "
                       r"pinned layers 0\.\.1 \(160 B\)"):
        solve(table)


def test_memory_moves_layers_off_a_small_device() -> None:
    table = _table(3, [("a", "edge"), ("b", "hub")],
                   lambda i, j, d: (1.0 if d == "a" else 2.0) * (j - i + 1),
                   memory={"a": 100.0}, weights=[60, 60, 60])
    plan = solve(table)
    assert sum(60 for d in plan.placement if d == "a") <= 100
    assert plan.placement.count("a") == 1


def test_energy_cap_names_the_least_energy() -> None:
    # 'a' holds the source and the destination: at best it sends the input (0.01 J)
    # and receives the result (0.02 J).
    table = _table(2, [("a", "edge"), ("b", "hub")], lambda i, j, d: 1.0, pseudo=True,
                   energy=lambda i, j, d: 2.0 * (j - i + 1))
    with pytest.raises(InfeasibleError, match=r"energy cap of 'a' \(0\.001 J\) cannot be "
                       r"met: its least energy is 0\.03 J"):
        solve(table, ir.Objective(max_energy={"a": 0.001}))


def test_energy_objective_needs_edge_energies() -> None:
    table = _table(2, [("a", "edge"), ("b", "hub")], lambda i, j, d: 1.0)
    table = ir.CostTable(**{**table.__dict__, "transfers": {
        k: ir.TransferCost(v.time) for k, v in table.transfers.items()},
        "bundles": {k: ir.BundleCost(v.compute) for k, v in table.bundles.items()}})
    with pytest.raises(UserError, match="edge device 'a'"):
        solve(table, ir.Objective(kind="energy"))
    with pytest.raises(UserError, match="not in the system"):
        solve(table, ir.Objective(max_energy={"zz": 1.0}))


def test_carbon_needs_a_duration() -> None:
    table = random_table(TableSpec(layers=2), 0)
    system = ir.System(table.system.devices, (), ir.Application())
    table = ir.CostTable(**{**table.__dict__, "system": system})
    with pytest.raises(UserError, match="duration"):
        solve(table, ir.Objective(kind="carbon"))
    plan = solve(table, ir.Objective(kind="carbon", duration=60.0))
    assert plan.estimate.carbon is not None and plan.estimate.inferences is not None
    assert math.isclose(plan.estimate.inferences, 60.0 / plan.estimate.bottleneck)


def test_plan_stages_pseudo_and_json_round_trip() -> None:
    table = random_table(TableSpec(layers=6, devices=3, frequencies=2, mbs=3,
                                   preprocess=True), 4)
    plan = solve(table)
    layer_devs = [d for p, d in zip(table.positions, plan.placement, strict=True)
                  if p.kind == "layer"]
    covered = []
    for st in plan.stages:
        assert all(layer_devs[k] == st.device for k in range(st.first, st.last + 1))
        assert st.frequency == plan.frequencies[st.device]
        covered.extend(range(st.first, st.last + 1))
    assert covered == list(range(6))
    for a, b in zip(plan.stages, plan.stages[1:], strict=False):
        assert a.device != b.device  # maximal runs
    assert set(plan.pseudo) == {"source", "preprocess", "destination"}
    assert plan.pseudo["source"] == "d0"
    back = ir.Plan.from_json(plan.to_json())
    assert back.stages == plan.stages and back.estimate.latency == plan.estimate.latency


def test_time_limit_gives_a_valid_plan() -> None:
    table = random_table(TableSpec(layers=30, devices=4, frequencies=3, mbs=5), 1)
    plan = solve(table, ir.Objective(kind="throughput", time_limit=5.0))
    assert plan.status in ("optimal", "feasible")
    assert plan.estimate == evaluate(table, plan.placement, plan.frequencies)


def test_bad_objective_values_are_user_errors() -> None:
    table = random_table(TableSpec(layers=2), 0)
    with pytest.raises(UserError, match="time limit"):
        solve(table, ir.Objective(time_limit=-1.0))
    with pytest.raises(UserError, match="solver 'NOPE'"):
        solve(table, ir.Objective(solver="NOPE"))
