"""The throughput label search (``solver/bottleneck.py``): frequency pruning and
exactness against brute force on random small tables with several frequencies."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from partitioner.solver import evaluate
from partitioner.solver.bottleneck import fastest_only, least_bottleneck
from partitioner.solver.runs import run_arrays
from partitioner.solver.synthetic import TableSpec, random_table
from tests.test_solver_bruteforce import enumerate_plans

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(seed=st.integers(0, 10**6), jitter=st.sampled_from([0.0, 0.05, 0.5, 0.9]),
       freqs=st.integers(2, 3))
def test_fastest_only_drops_exactly_the_beaten_frequencies(seed: int, jitter: float,
                                                           freqs: int) -> None:
    table = random_table(TableSpec(layers=5, devices=3, frequencies=freqs, mbs=5,
                                   freq_jitter=jitter), seed)
    full = run_arrays(table)
    kept = fastest_only(full)
    for d in range(len(full.devices)):
        labels = list(full.freqs[d])
        assert set(kept.freqs[d]) <= set(labels) and kept.freqs[d]
        for f, label in enumerate(labels):
            if label in kept.freqs[d]:
                g = kept.freqs[d].index(label)
                assert np.array_equal(kept.time[d, g], full.time[d, f])
                continue
            mine = full.time[d, f]
            finite = np.isfinite(mine)
            beaten = [np.all(kept.time[d, g][finite] <= mine[finite])
                      for g in range(len(kept.freqs[d]))]
            assert any(beaten), (d, label)
    if jitter == 0.0:  # a faster clock is faster on every bundle: one frequency left
        assert all(len(f) == 1 for f in kept.freqs)


@SETTINGS
@given(seed=st.integers(0, 10**6), layers=st.integers(1, 5), devices=st.integers(2, 3),
       freqs=st.integers(2, 3), jitter=st.sampled_from([0.0, 0.05, 0.9]),
       link=st.sampled_from([1.0, 0.6]), pins=st.sampled_from([0.0, 0.3]))
def test_least_bottleneck_is_the_brute_force_optimum(seed: int, layers: int, devices: int,
                                                     freqs: int, jitter: float, link: float,
                                                     pins: float) -> None:
    while devices ** layers * freqs ** devices > 3000 and layers > 1:
        layers -= 1
    table = random_table(TableSpec(layers=layers, devices=devices, frequencies=freqs,
                                   mbs=layers, freq_jitter=jitter, link_prob=link,
                                   pin_prob=pins, spread=0.9), seed)
    plans = enumerate_plans(table)
    found = least_bottleneck(run_arrays(table))
    if not plans:
        assert found is None
        return
    assert found is not None
    best = min(e.bottleneck for *_, e in plans)
    est = evaluate(table, *found[1])
    assert math.isclose(est.bottleneck, best, rel_tol=1e-9)
    assert math.isclose(found[0], best, rel_tol=1e-9)
    ties = [e.latency for *_, e in plans if math.isclose(e.bottleneck, best, rel_tol=1e-6)]
    assert math.isclose(est.latency, min(ties), rel_tol=1e-6)
