"""The carbon objective without the integer program (``solver/carbon.py``): exact.

Dinkelbach over the run DPs, with dual bounds and label searches for the vectors whose
bottleneck term cannot be linearised, must reach the brute-force optimum on random small
tables by itself (not by handing over to the integer program), and agree with the
integer program beyond brute-force sizes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner import ir
from partitioner.solver import evaluate, fast, solve
from partitioner.solver.carbon import least_carbon
from partitioner.solver.runs import run_arrays
from partitioner.solver.synthetic import TableSpec, random_table
from tests.test_solver_bruteforce import enumerate_plans


def _carbon(table: ir.CostTable, placement: tuple[str, ...],
            freqs: dict[str, str | None]) -> float:
    est = evaluate(table, placement, freqs)
    assert est.carbon is not None
    return est.carbon


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), layers=st.integers(1, 5), devices=st.integers(2, 4),
       freqs=st.integers(1, 2), spread=st.sampled_from([0.0, 0.5, 0.9]),
       link=st.sampled_from([1.0, 0.6]), pins=st.sampled_from([0.0, 0.3]),
       source=st.booleans(), preload=st.booleans())
def test_least_carbon_is_the_brute_force_optimum(seed: int, layers: int, devices: int,
                                                 freqs: int, spread: float, link: float,
                                                 pins: float, source: bool,
                                                 preload: bool) -> None:
    while devices ** layers * freqs ** devices > 3000 and layers > 1:
        layers -= 1
    table = random_table(TableSpec(layers=layers, devices=devices, frequencies=freqs,
                                   mbs=layers, spread=spread, link_prob=link,
                                   pin_prob=pins, source=source, destination=source,
                                   preload=preload), seed)
    plans = enumerate_plans(table)
    status, chosen = least_carbon(table, run_arrays(table))
    assert status == "optimal"
    if not plans:
        assert chosen is None
        return
    assert chosen is not None
    best = min(e.carbon for *_, e in plans if e.carbon is not None)
    got = _carbon(table, *chosen)
    assert math.isclose(got, best, rel_tol=1e-9, abs_tol=1e-12), (got, best)
    assert any(p == chosen[0] and f == chosen[1] for p, f, _ in plans)


def test_carbon_runs_fast_only_without_caps() -> None:
    table = random_table(TableSpec(layers=4, devices=3, frequencies=2), 0)
    assert fast.applies(table, ir.Objective(kind="carbon"))
    assert not fast.applies(table, ir.Objective(kind="carbon", max_latency=1.0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_carbon_matches_the_integer_program(seed: int) -> None:
    """Ten layers, three devices, two frequencies: the MIP (forced by a latency cap no
    plan reaches) is the reference."""
    table = random_table(TableSpec(layers=10, devices=3, frequencies=2, mbs=10,
                                   preprocess=True, spread=0.9), seed)
    status, chosen = least_carbon(table, run_arrays(table))
    assert status == "optimal" and chosen is not None
    mip = solve(table, ir.Objective(kind="carbon", max_latency=1e9))
    quick = solve(table, ir.Objective(kind="carbon"))
    assert mip.status == quick.status == "optimal"
    assert mip.estimate.carbon is not None and quick.estimate.carbon is not None
    assert math.isclose(quick.estimate.carbon, mip.estimate.carbon, rel_tol=1e-7)
    assert math.isclose(_carbon(table, *chosen), mip.estimate.carbon, rel_tol=1e-7)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), layers=st.integers(1, 5), devices=st.integers(2, 3),
       c=st.floats(0.01, 20.0), shift=st.floats(-1.0, 1.0), which=st.integers(0, 10**6))
def test_label_search_finds_the_least_linear_plus_bottleneck(
        seed: int, layers: int, devices: int, c: float, shift: float, which: int) -> None:
    """``_label_min``: the least ``N(x) + c B(x)`` under one vector, when it is < 0."""
    from partitioner.analysis.estimate import device_busy
    from partitioner.solver.carbon import _label_min, _Model

    while devices ** layers > 300 and layers > 1:
        layers -= 1
    table = random_table(TableSpec(layers=layers, devices=devices, frequencies=2,
                                   mbs=layers, spread=0.9), seed)
    arrays = run_arrays(table)
    model = _Model(table, arrays)
    p = which % len(model.phi)
    phi = model.phi[p]
    devs = {d.name: d for d in table.system.devices}
    values = []
    for placement, freqs, est in enumerate_plans(table):
        ok = all(model.uses[p, arrays.devices.index(d)]
                 and arrays.freqs[arrays.devices.index(d)][phi[arrays.devices.index(d)]] == f
                 for d, f in freqs.items())
        if not ok:
            continue
        busy = device_busy(table, placement, freqs)
        num = sum((devs[d].carbon_intensity or 0.0)
                  * (est.energy.get(d, 0.0) - (devs[d].idle_power or 0.0) * busy[d])
                  for d in busy)
        values.append(num + c * max(busy.values()))
    # Shift the target so that both answers (a plan below 0, or none) occur.
    offset = (min(values) + shift * abs(min(values))) if values else 0.0
    model.cut_n = model.cut_n.copy()
    # N - offset: subtract it from every first run (each plan has exactly one).
    model.run_n = model.run_n.copy()
    model.run_n[:, :, 0, :] -= offset
    lams = [np.full(devices, 1.0 / devices)]
    out = _label_min(model, p, c, 0.0, lams)
    below = [v - offset for v in values if v - offset < 0]
    scale = max((abs(v) for v in values), default=1.0)
    if values and min(abs(v - offset) for v in values) < 1e-9 * scale:
        return  # at the rounding boundary either answer is right
    if not below:
        assert out is None
        return
    assert out is not None
    assert math.isclose(out[0], min(below), rel_tol=1e-9, abs_tol=1e-12), (out[0], below)

