"""Lazy profiling: measure only the bundles the plans actually use (beyond DISS/DIME).

Full bundle profiling measures ``L*MBS - MBS*(MBS-1)/2`` bundles per device and frequency
(SPEC §3). Lazy profiling instead:

1. measures every single layer;
2. builds the cost table with every unmeasured bundle *estimated* as the sum of its
   measured single layers plus its internal cuts over the device's memory bandwidth
   (:func:`partitioner.analysis.costs.estimate_bundle`);
3. solves, and measures exactly the bundles of the profiled device that the plan uses
   (the canonical split of its runs, :func:`partitioner.analysis.estimate.canonical_bundles`);
4. re-plans, and repeats until every bundle the plan uses on the device is measured.

Each round measures at least one new bundle, so it ends after at most the full set.

``estimate="adaptive"`` scales every estimate by the smallest ratio ``measured bundle /
its estimate`` seen so far (capped at 1): when bundles turn out cheaper than their
singles, unmeasured ones are priced more optimistically, so the search measures more of
them and misses fewer better plans (at the cost of more measurements). The
final plan's price is exact (it uses measured bundles only), but the plan is optimal only
with respect to measured bundles *plus estimates of the unmeasured ones*. It is certified
globally optimal only when every estimate is a lower bound of the true latency, i.e. when
bundles are never faster than the sum of their singles on this host; where bundling helps
(fusion, cache reuse) an unmeasured bundle may be cheaper than its estimate and a better
plan may remain unseen. ``benchmarks/lazy_profiling.py`` measures how often that happens.

The host measures at one frequency label (``frequency``). When the profiled device lists
DVFS frequencies in the system file, that label must be one of them, and the lazy plans
run the device at that frequency only (the other frequencies have nothing measured; a
profile per frequency, each measured at its own label, prices them all afterwards).

The solver is not imported here: the caller passes a ``planner`` (``CostTable -> Plan``),
normally :func:`partitioner.pipeline.planner`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from partitioner.analysis.costs import build_cost_table, estimate_bundle
from partitioner.analysis.profiler import bundle_count, bundle_ranges
from partitioner.analysis.profiles import Profile, ProfiledBundle
from partitioner.errors import fail
from partitioner.ir import CostTable, LayerGraph, Plan, System

__all__ = ["LazyRound", "LazyResult", "lazy_profile", "plan_bundles", "at_frequency"]


@dataclass(frozen=True)
class LazyRound:
    """One plan-and-measure round: the plan's estimated objective and what it measured."""

    latency: float
    stages: tuple[tuple[str | None, int, int], ...]
    measured: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class LazyResult:
    """Outcome of :func:`lazy_profile`.

    Attributes:
        profile: the lazy profile (all singles plus the bundles the plans used).
        plan: the final plan (every bundle it uses on the device is measured).
        table: the cost table the final plan was solved on.
        rounds: the plan-and-measure rounds, in order.
        measured: bundles measured (singles included).
        full: bundles a full profile at this MBS would measure.
    """

    profile: Profile
    plan: Plan
    table: CostTable
    rounds: tuple[LazyRound, ...]
    measured: int
    full: int


def plan_bundles(table: CostTable, plan: Plan, device: str) -> list[tuple[int, int]]:
    """Model-layer ranges ``(first, last)`` of the bundles ``plan`` runs on ``device``."""
    from partitioner.analysis.estimate import canonical_bundles

    out = []
    for b in canonical_bundles(table, plan.placement):
        first, last = table.positions[b.first], table.positions[b.last]
        if b.device == device and first.kind == "layer":
            assert first.layer is not None and last.layer is not None
            out.append((first.layer, last.layer))
    return out


def _complete(profile: Profile, graph: LayerGraph, mbs: int, frequency: str | None,
              bandwidth: float, adaptive: bool) -> Profile:
    """``profile`` plus an estimate for every unmeasured bundle up to ``mbs``."""
    have = profile.bundle_map()
    singles = [have[(k, k, frequency)] for k in range(len(graph.layers))]

    def guess(first: int, last: int) -> tuple[float, float | None]:
        internal = sum(graph.cut_after(k).nbytes for k in range(first, last)) / bandwidth
        return estimate_bundle(singles[first:last + 1], internal)

    factor = 1.0
    if adaptive:
        for (first, last, freq), b in have.items():
            if freq == frequency and last > first:
                factor = min(factor, b.latency / guess(first, last)[0])
    bundles = list(profile.bundles)
    for first, last in bundle_ranges(len(graph.layers), mbs):
        if (first, last, frequency) not in have:
            latency, energy = guess(first, last)
            bundles.append(ProfiledBundle(first, last, frequency, factor * latency,
                                          None if energy is None else factor * energy))
    return replace(profile, bundles=tuple(bundles), lazy=False)


def at_frequency(system: System, device: str, frequency: str | None) -> System:
    """``system`` with ``device`` running only at ``frequency`` (the one measured here).

    A device without DVFS frequencies is left as it is (the cost table takes its
    frequency from the profile). One with frequencies keeps ``frequency`` and its aligned
    ``frequency_flops`` / ``frequency_power`` entries.

    Raises:
        UserError: the device lists frequencies and ``frequency`` is None or not one of them.
    """
    dev = system.device(device)
    if not dev.frequencies:
        return system
    listed = ", ".join(dev.frequencies)
    where = system.path or "the system file"
    if frequency is None:
        fail(f"--device {device}: {where} lists its frequencies ({listed}); give "
             f"--frequency LABEL, the one this host runs at")
    if frequency not in dev.frequencies:
        fail(f"--frequency {frequency!r}: not a frequency of device {device!r} in {where} "
             f"({listed})")
    k = dev.frequencies.index(frequency)
    only = replace(dev, frequencies=(frequency,),
                   frequency_flops=dev.frequency_flops[k:k + 1],
                   frequency_power=dev.frequency_power[k:k + 1])
    return replace(system, devices=tuple(only if d.name == device else d
                                         for d in system.devices))


def lazy_profile(graph: LayerGraph, system: System, device: str, base: Profile,
                 measure: Callable[[int, int], ProfiledBundle], *,
                 planner: Callable[[CostTable], Plan], mbs: int | None = None,
                 preload: bool = True, private: int = 0, frequency: str | None = None,
                 others: Sequence[Profile] = (), estimate: str = "sum",
                 on_measured: Callable[[Profile], None] | None = None) -> LazyResult:
    """Profile ``device`` lazily and return the final plan (see the module docstring).

    Args:
        graph: the model.
        system: the system; ``device`` must be in it, other devices are priced from
            ``others`` or analytically.
        device: the device this host stands for.
        base: the profile to extend (settings, fingerprint, bundles already measured).
        measure: measures one bundle ``(first, last)`` on this host.
        planner: solves a cost table (what it minimises is the caller's choice), e.g.
            ``partitioner.pipeline.planner(objective)``.
        mbs: maximum bundle size (default: all layers).
        preload / private: as in :func:`build_cost_table`.
        frequency: the frequency label the bundles are measured at; when ``device`` lists
            frequencies it must be one of them, and the plans use only it.
        others: profiles of other devices.
        estimate: ``"sum"`` (an unmeasured bundle costs its singles plus its internal
            cuts) or ``"adaptive"`` (that, scaled by the smallest measured/estimated
            ratio so far, at most 1).
        on_measured: called with the profile after every new bundle (to save it).

    Returns:
        The :class:`LazyResult`.

    Raises:
        UserError: ``device`` is not in the system, a frequency it does not list, or the
            planner finds no plan.
    """
    if device not in {d.name for d in system.devices}:
        fail(f"--device {device!r} is not in {system.path or 'the system file'}")
    if estimate not in ("sum", "adaptive"):
        fail(f"lazy estimate {estimate!r}: expected 'sum' or 'adaptive'")
    system = at_frequency(system, device, frequency)
    n_layers = len(graph.layers)
    mbs = n_layers if mbs is None else min(mbs, n_layers)
    profile = replace(base, lazy=True)

    def take(first: int, last: int) -> None:
        nonlocal profile
        if (first, last, frequency) in profile.bundle_map():
            return
        profile = profile.with_bundle(replace(measure(first, last), frequency=frequency))
        if on_measured is not None:
            on_measured(profile)

    for k in range(n_layers):
        take(k, k)
    bandwidth = system.device(device).memory_bandwidth
    rounds: list[LazyRound] = []
    while True:
        priced = _complete(profile, graph, mbs, frequency, bandwidth, estimate == "adaptive")
        table = build_cost_table(graph, system, profiles=[priced, *others], mbs=mbs,
                                 preload=preload, private=private)
        plan = planner(table)
        have = profile.bundle_map()
        missing = [r for r in plan_bundles(table, plan, device)
                   if (r[0], r[1], frequency) not in have]
        rounds.append(LazyRound(
            latency=plan.estimate.latency,
            stages=tuple((s.device, s.first, s.last) for s in plan.stages),
            measured=tuple(missing)))
        if not missing:
            break
        for first, last in missing:
            take(first, last)
    return LazyResult(profile=profile, plan=plan, table=table, rounds=tuple(rounds),
                      measured=sum(1 for b in profile.bundles if b.frequency == frequency),
                      full=bundle_count(n_layers, mbs))
