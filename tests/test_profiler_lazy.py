"""Lazy profiling: measures only the bundles plans use; exact when estimates are lower bounds."""

from __future__ import annotations

import numpy as np
import pytest

from partitioner.analysis.costs import build_cost_table
from partitioner.analysis.estimate import evaluate
from partitioner.analysis.lazy import lazy_profile, plan_bundles
from partitioner.analysis.profiler import bundle_count, bundle_ranges
from partitioner.analysis.profiles import Profile, ProfiledBundle
from partitioner.analysis.system import parse_system
from partitioner.errors import UserError
from partitioner.ir import Cut, Layer, LayerGraph, TensorInfo
from partitioner.pipeline import planner
from partitioner.solver import solve

N_LAYERS = 6


def chain(n: int = N_LAYERS) -> LayerGraph:
    inp = TensorInfo("x", (1, 1000), "float32", 4000)
    tensors = {"x": inp}
    layers, cuts = [], [Cut(-1, ("x",), 4000)]
    for k in range(n):
        t = TensorInfo(f"t{k}", (1, 500), "float32", 2000)
        tensors[t.name] = t
        layers.append(Layer(k, f"l{k}", ("MatMul",), (k,), 2_000_000, 1000, 4000, 2000, 2000))
        cuts.append(Cut(k, (t.name,), 2000))
    return LayerGraph("chain", "c" * 64, "major", tuple(layers), tuple(cuts), (inp,),
                      (tensors[f"t{n - 1}"],), tensors)


SYSTEM = parse_system({
    "device": [
        {"name": "edge", "class": "edge", "flops": 1e8, "memory_bandwidth": 1e9,
         "network_bandwidth": 1e7},
        {"name": "host", "class": "hub", "flops": 1e10, "memory_bandwidth": 1e10,
         "network_bandwidth": 1e7}],
    "link": [{"between": ["edge", "host"], "bandwidth": 1e7}],
    "application": {"source": "edge", "destination": "edge"}}, "lazy.toml")


def truth(seed: int, synergy: float) -> dict[tuple[int, int], float]:
    """Random single latencies; a bundle costs its singles' sum times a random factor.

    ``synergy`` is the smallest factor: >= 1 makes every sum-of-singles estimate a lower
    bound of the bundle's true latency.
    """
    rng = np.random.default_rng(seed)
    single = rng.uniform(1e-3, 2e-2, N_LAYERS)
    out = {}
    for a, b in bundle_ranges(N_LAYERS, N_LAYERS):
        factor = 1.0 if a == b else rng.uniform(synergy, synergy + 0.6)
        out[(a, b)] = float(single[a:b + 1].sum() * factor)
    return out


def base_profile(graph: LayerGraph) -> Profile:
    return Profile(device="host", sha256=graph.sha256, granularity="major",
                   layers=tuple(layer.name for layer in graph.layers), runs=5, trim=0.1)


def run_lazy(values: dict[tuple[int, int], float], mbs: int | None = None,
             estimate: str = "sum"):
    graph = chain()
    calls: list[tuple[int, int]] = []

    def measure(a: int, b: int) -> ProfiledBundle:
        calls.append((a, b))
        return ProfiledBundle(a, b, None, values[(a, b)])

    result = lazy_profile(graph, SYSTEM, "host", base_profile(graph), measure,
                          planner=planner(), mbs=mbs, estimate=estimate)
    full = Profile(**{**base_profile(graph).__dict__, "bundles": tuple(
        ProfiledBundle(a, b, None, t) for (a, b), t in values.items()
        if b - a + 1 <= (mbs or N_LAYERS))})
    full_table = build_cost_table(graph, SYSTEM, profiles=[full], mbs=mbs)
    return graph, calls, result, full_table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lazy_matches_full_profile_when_estimates_are_lower_bounds(seed: int) -> None:
    values = truth(seed, synergy=1.0)
    graph, calls, result, full_table = run_lazy(values)
    assert len(calls) == len(set(calls)) == result.measured
    assert calls[:N_LAYERS] == [(k, k) for k in range(N_LAYERS)]  # singles first
    assert result.measured < result.full == bundle_count(N_LAYERS, N_LAYERS)
    # every bundle the final plan runs on the host was measured: its price is exact
    used = plan_bundles(result.table, result.plan, "host")
    assert used and all(r in set(calls) for r in used)
    exact = evaluate(full_table, result.plan.placement, result.plan.frequencies)
    assert exact.latency == pytest.approx(result.plan.estimate.latency, rel=1e-9)
    best = solve(full_table)
    assert exact.latency == pytest.approx(best.estimate.latency, rel=1e-6)
    assert result.rounds[-1].measured == ()
    assert sum(len(r.measured) for r in result.rounds) == result.measured - N_LAYERS


def test_lazy_with_synergy_is_exact_for_its_own_plan_and_respects_mbs() -> None:
    # Bundles up to 40 % faster than their singles: estimates are not lower bounds, so the
    # plan is only optimal w.r.t. measured + estimated prices, but its price is exact.
    values = truth(7, synergy=0.6)
    graph, calls, result, full_table = run_lazy(values, mbs=3)
    assert all(b - a + 1 <= 3 for a, b in calls)
    assert result.full == bundle_count(N_LAYERS, 3)
    exact = evaluate(full_table, result.plan.placement, result.plan.frequencies)
    assert exact.latency == pytest.approx(result.plan.estimate.latency, rel=1e-9)
    assert exact.latency >= solve(full_table).estimate.latency * (1 - 1e-9)
    assert result.profile.lazy


def test_adaptive_estimates_find_a_plan_that_plain_sums_miss() -> None:
    # Seed 9 with bundles down to half their singles' sum: the plain-sum search stops at a
    # plan that is not optimal; the adaptive search, pricing unmeasured bundles with the
    # best ratio seen, measures more and reaches the full-profile optimum.
    values = truth(9, synergy=0.5)
    _, _, plain, full_table = run_lazy(values, mbs=4)
    _, _, adaptive, _ = run_lazy(values, mbs=4, estimate="adaptive")
    best = solve(full_table).estimate.latency
    plain_exact = evaluate(full_table, plain.plan.placement, plain.plan.frequencies).latency
    adapt_exact = evaluate(full_table, adaptive.plan.placement,
                           adaptive.plan.frequencies).latency
    assert plain_exact > best * (1 + 1e-6)
    assert adapt_exact == pytest.approx(best, rel=1e-9)
    assert plain.measured < adaptive.measured < adaptive.full
    with pytest.raises(UserError, match="lazy estimate 'max'"):
        run_lazy(values, estimate="max")


def test_lazy_profiling_uses_the_planner_it_is_given() -> None:
    # The analysis stage gets its solver as a callable: every round's table goes through it.
    values = truth(3, synergy=1.0)
    graph = chain()
    tables = []

    def counting(table):
        tables.append(table)
        return solve(table)

    result = lazy_profile(graph, SYSTEM, "host", base_profile(graph),
                          lambda a, b: ProfiledBundle(a, b, None, values[(a, b)]),
                          planner=counting)
    assert len(tables) == len(result.rounds) >= 1
    assert result.table is tables[-1]


DVFS = parse_system({
    "device": [
        {"name": "edge", "class": "edge", "flops": 1e8, "memory_bandwidth": 1e9,
         "network_bandwidth": 1e7},
        {"name": "host", "class": "hub", "flops": 1e10, "memory_bandwidth": 1e10,
         "network_bandwidth": 1e7, "frequencies": ["low", "high"],
         "frequency_flops": [2e9, 1e10], "frequency_power": [2.0, 6.0]}],
    "link": [{"between": ["edge", "host"], "bandwidth": 1e7}],
    "application": {"source": "edge", "destination": "edge"}}, "dvfs.toml")


def test_lazy_profiling_on_a_dvfs_device_plans_at_the_measured_frequency() -> None:
    values = truth(4, synergy=1.0)
    graph = chain()
    seen = []

    def measure(a: int, b: int) -> ProfiledBundle:
        seen.append((a, b))
        return ProfiledBundle(a, b, None, values[(a, b)])

    result = lazy_profile(graph, DVFS, "host", base_profile(graph), measure,
                          planner=planner(), frequency="high")
    assert result.plan.status == "optimal"
    assert {b.frequency for b in result.profile.bundles} == {"high"}
    assert result.table.frequencies["host"] == ("high",)
    assert plan_bundles(result.table, result.plan, "host")
    assert all(result.plan.frequencies.get(s.device) in (None, "high")
               for s in result.plan.stages)
    assert result.measured == len(set(seen)) < result.full


@pytest.mark.parametrize("frequency, message", [
    (None, r"--device host: dvfs.toml lists its frequencies \(low, high\); give --frequency"),
    ("turbo", r"--frequency 'turbo': not a frequency of device 'host' in dvfs.toml"),
])
def test_lazy_profiling_on_a_dvfs_device_names_a_missing_or_unknown_frequency(
        frequency, message) -> None:
    graph = chain()
    calls = []
    with pytest.raises(UserError, match=message):
        lazy_profile(graph, DVFS, "host", base_profile(graph),
                     lambda a, b: calls.append((a, b)), planner=planner(),
                     frequency=frequency)
    assert calls == []  # refused before measuring anything
