"""solve() against exhaustive enumeration on random small instances (property tests).

Every placement and frequency choice is enumerated, priced with ``evaluate`` (the
canonical pricing, independent of the MIP) and filtered by pins, memory and caps; the
solver's plan must reach the same optimum, its estimate must be ``evaluate`` of its own
placement, and an instance without feasible plans must raise ``InfeasibleError``.
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner import ir
from partitioner.analysis.estimate import edge_energy
from partitioner.errors import InfeasibleError
from partitioner.solver import evaluate, solve
from partitioner.solver.synthetic import TableSpec, random_table

REL = 1e-6


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)


def enumerate_plans(table: ir.CostTable, objective: ir.Objective | None = None,
                    ) -> list[tuple[tuple[str, ...], dict[str, str | None], ir.Estimate]]:
    """Every feasible (placement, frequencies, estimate), by brute force."""
    names = table.device_names
    choices = [[d for d in names if p.allowed is None or d in p.allowed]
               for p in table.positions]
    mem = {d.name: d.memory for d in table.system.devices}
    out = []
    for placement in itertools.product(*choices):
        used = sorted(set(placement))
        load = {d: 0.0 for d in used}
        held: dict[str, set[str]] = {d: set() for d in used}
        for p, d in zip(table.positions, placement, strict=True):
            # a weight shared by several positions is held once by the device
            shared = [s for s in p.weights if s in table.weight_sizes]
            load[d] += p.weight_bytes - sum(table.weight_sizes[s] for s in shared)
            held[d].update(shared)
        for d in used:
            load[d] += sum(table.weight_sizes[s] for s in held[d])
        if any(load[d] > mem[d] for d in used):
            continue
        for fs in itertools.product(*(table.frequencies[d] for d in used)):
            freqs = dict(zip(used, fs, strict=True))
            try:
                est = evaluate(table, placement, freqs)
            except InfeasibleError:
                continue
            if objective is not None:
                if objective.max_latency is not None and est.latency > objective.max_latency:
                    continue
                if any(est.energy.get(d, 0.0) > cap
                       for d, cap in objective.max_energy.items()):
                    continue
            out.append((placement, freqs, est))
    return out


def objective_value(table: ir.CostTable, kind: str, est: ir.Estimate,
                    bounds: list[tuple[float, float]] | None = None,
                    weights: tuple[float, float] = (0.5, 0.5)) -> float:
    if kind == "latency":
        return est.latency
    if kind == "energy":
        return edge_energy(table, est.energy)
    if kind == "throughput":
        return est.bottleneck
    if kind == "carbon":
        assert est.carbon is not None
        return est.carbon
    assert bounds is not None
    total = 0.0
    values = (est.latency, edge_energy(table, est.energy))
    for (lo, hi), v, w in zip(bounds, values, weights, strict=True):
        if hi - lo > 1e-9 * abs(hi) + 1e-15:
            total += w * (v - lo) / (hi - lo)
    return total


def _bounds(table: ir.CostTable, plans: list) -> list[tuple[float, float]]:
    lat = [e.latency for _, _, e in plans]
    en = [edge_energy(table, e.energy) for _, _, e in plans]
    return [(min(lat), max(lat)), (min(en), max(en))]


def _size(spec: TableSpec) -> int:
    free = spec.layers + (1 if spec.preprocess else 0)
    return spec.devices ** free * spec.frequencies ** spec.devices


@st.composite
def specs(draw: st.DrawFn) -> TableSpec:
    devices = draw(st.integers(2, 4))
    freqs = draw(st.integers(1, 2))
    source = draw(st.booleans())
    destination = draw(st.booleans())
    preprocess = draw(st.booleans())
    layers = draw(st.integers(1, 5))
    spec = TableSpec(
        layers=layers, devices=devices, frequencies=freqs,
        mbs=draw(st.integers(1, layers)), source=source, destination=destination,
        preprocess=preprocess, spread=draw(st.sampled_from([0.0, 0.3, 0.9])),
        link_prob=draw(st.sampled_from([1.0, 0.8, 0.5])),
        pin_prob=draw(st.sampled_from([0.0, 0.3])),
        memory_frac=draw(st.sampled_from([0.0, 0.0, 0.4, 0.8])),
        shared_prob=draw(st.sampled_from([0.0, 0.0, 0.6])),
        preload=draw(st.booleans()), hidden_by_end=draw(st.booleans()),
        freq_jitter=draw(st.sampled_from([0.0, 0.05, 0.5])))
    # Keep the enumeration small: fewer layers until it is.
    while _size(spec) > 3000 and spec.layers > 1:
        spec = TableSpec(**{**spec.__dict__, "layers": spec.layers - 1,
                            "mbs": min(spec.mbs, spec.layers - 1)})
    return spec


def _check(table: ir.CostTable, objective: ir.Objective) -> None:
    everything = enumerate_plans(table)
    plans = enumerate_plans(table, objective)
    if not plans:
        with pytest.raises(InfeasibleError) as info:
            solve(table, objective)
        message = str(info.value)
        assert "\n" not in message
        assert "cannot" in message or "no path" in message or "no plan" in message, message
        return
    bounds = _bounds(table, plans) if objective.kind == "weighted" else None
    weights = (objective.latency_weight, objective.energy_weight)
    best = min(objective_value(table, objective.kind, e, bounds, weights) for *_, e in plans)
    plan = solve(table, objective)
    assert plan.status == "optimal"
    again = evaluate(table, plan.placement, plan.frequencies)
    assert plan.estimate == again
    got = objective_value(table, objective.kind, plan.estimate, bounds, weights)
    assert _close(got, best), (got, best)
    # The plan is one of the feasible ones (pins, memory, caps, frequency per device).
    assert any(p == plan.placement and f == dict(plan.frequencies) for p, f, _ in plans)
    if objective.kind in ("energy", "throughput"):
        # Lexicographic: least latency among the optima of the first objective.
        ties = [e.latency for *_, e in plans
                if _close(objective_value(table, objective.kind, e), best)]
        assert _close(plan.estimate.latency, min(ties))
    assert everything  # caps only shrink the set


def _objective(draw: st.DrawFn, table: ir.CostTable, kind: str) -> ir.Objective:
    caps = draw(st.sampled_from(["none", "none", "latency", "energy", "both"]))
    plans = enumerate_plans(table)
    max_latency = None
    max_energy: dict[str, float] = {}
    if plans and caps in ("latency", "both"):
        lat = sorted(e.latency for *_, e in plans)
        q = draw(st.floats(-0.05, 1.0))
        max_latency = lat[0] * 0.9 if q < 0 else lat[int(q * (len(lat) - 1))]
    if plans and caps in ("energy", "both"):
        dev = "d0"
        en = sorted(e.energy.get(dev, 0.0) for *_, e in plans)
        q = draw(st.floats(-0.05, 1.0))
        max_energy[dev] = en[0] * 0.9 if q < 0 else en[int(q * (len(en) - 1))]
    w = draw(st.floats(0.0, 1.0))
    return ir.Objective(kind=kind, max_latency=max_latency, max_energy=max_energy,  # type: ignore[arg-type]
                        latency_weight=w, energy_weight=1.0 - w)


SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("kind", ["latency", "energy", "throughput", "carbon", "weighted"])
@SETTINGS
@given(data=st.data(), spec=specs(), seed=st.integers(0, 10**6))
def test_solve_matches_brute_force(kind: str, data: st.DataObject, spec: TableSpec,
                                   seed: int) -> None:
    table = random_table(spec, seed)
    objective = _objective(data.draw, table, kind)
    _check(table, objective)


@SETTINGS
@given(seed=st.integers(0, 10**6), layers=st.integers(2, 5), devices=st.integers(2, 3))
def test_mbs_equal_to_layers_is_exhaustive_optimum(seed: int, layers: int,
                                                   devices: int) -> None:
    """With MBS = L every run is priced by its own profile: the exhaustive optimum."""
    table = random_table(TableSpec(layers=layers, devices=devices, mbs=layers, spread=0.9),
                         seed)
    best = min(e.latency for *_, e in enumerate_plans(table))
    assert _close(solve(table).estimate.latency, best)
