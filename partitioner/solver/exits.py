"""The exact solve of a cost table with early-exit heads (DISS §6.4; docs/EXITS.md).

The objective is the *expected* latency (``latency``) or the expected edge energy, then
the expected latency (``energy``), priced by :mod:`partitioner.analysis.exits`: every
bundle and transfer weighted by the probability ``C_s`` that its segment runs, plus each
head's delivery weighted by the probability of leaving there. That is a sum of arc costs
along the chain, so a shortest path over *runs* (as :mod:`.dp`) is exact:

    V[d, j] = min_i  A[d, i] + run_w(i, j, d)
    A[d, i] = min_{d' != d}  V[d', i - 1] + C_s * cut(i - 1, d', d)

where ``run_w`` is a run's canonical bundles (split at every exit head, then in ``mbs``
chunks) with their weights, and the head deliveries of the heads inside the run. The
worst-case latency cap (``--max-latency``, on every outcome) and binding device memories
are not additive in the same way, so the program keeps, per state, the Pareto set of
labels (objective, worst-case running latency, bytes on each device with a finite
memory); with neither, one label per state remains and it is the plain dynamic program.
One frequency per device (FreDDI) is handled by enumerating frequency vectors.

Memory: each run adds :func:`~.memory.memory_of` its positions, so an initialiser shared
by two runs on one device is counted twice (conservative); the chosen plan is checked
with shared weights held once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from partitioner import ir
from partitioner.analysis.estimate import Bundle, canonical_bundles
from partitioner.analysis.exits import (
    apply_price,
    bundle_segment,
    continuation,
    cut_segment,
    delivery,
    destination,
    price_chain,
)
from partitioner.errors import InfeasibleError, fail
from partitioner.solver.fast import binding_memories
from partitioner.solver.memory import memory_of, placement_memory

__all__ = ["solve_exits", "split_at_exits", "KINDS"]

KINDS = ("latency", "energy")
_TOL = 1e-12


@dataclass(frozen=True)
class _Run:
    """A run's weighted objective terms and its unweighted latency."""

    latency: float     # expected (weighted) seconds, including head deliveries
    energy: float      # expected edge joules, including head deliveries
    worst: float       # unweighted seconds of the run (the continuing outcome)
    outcomes: tuple[float, ...]  # unweighted seconds up to each head inside, plus delivery
    memory: float


@dataclass
class _Label:
    key: tuple[float, float]
    worst: float
    memory: tuple[float, ...]
    back: tuple[_Label | None, int, int, int]  # (previous label, first, last, device)


def _first_bundles(table: ir.CostTable) -> list[list[Bundle]]:
    """For each start ``i``: the canonical bundles of a run from ``i`` to the end."""
    n = len(table.positions)
    out = []
    for i in range(n):
        placement = ["\0"] * i + ["\1"] * (n - i)
        out.append([b for b in canonical_bundles(table, placement) if b.first >= i])
    return out


def _edge(table: ir.CostTable) -> set[str]:
    return {d.name for d in table.system.devices if d.device_class == "edge"}


def _run_cost(table: ir.CostTable, bundles: list[Bundle], i: int, j: int, dev: str,
              freq: str | None, cont: list[float], edge: set[str]) -> _Run | None:
    """Price run ``i..j`` on ``dev`` (None: a position may not run there or no price)."""
    pos = table.positions
    if any(p.allowed is not None and dev not in p.allowed for p in pos[i:j + 1]):
        return None
    heads = {p: k for k, (p, *_) in enumerate(table.exits)}
    lat = energy = worst = 0.0
    outcomes: list[float] = []
    for idx, b in enumerate(bundles):
        if b.first > j:
            break
        last = min(b.last, j)
        cost = table.bundles.get((b.first, last, dev, freq))
        if cost is None:
            return None
        hidden = cost.hidden if (table.preload and idx == 0 and i > 0) else 0.0
        c = cont[bundle_segment(table, b.first)]
        lat += c * (cost.time - hidden)
        worst += cost.time - hidden
        if dev in edge:
            energy += c * (cost.energy or 0.0)
        if last in heads:
            k = heads[last]
            tr = delivery(table, k, dev)
            if tr is None:
                return None
            p = cont[k] * table.exits[k][1].probability
            lat += p * tr.time
            outcomes.append(worst + tr.time)
            if dev in edge:
                energy += p * (tr.sender_energy or 0.0)
            dest = destination(table)
            if dest in edge and dest != dev:
                energy += p * (tr.receiver_energy or 0.0)
        if last < j:  # an internal cut between two bundles of the run
            tr = table.transfers.get((last, dev, dev))
            if tr is None:
                return None
            c = cont[cut_segment(table, last)]
            lat += c * tr.time
            worst += tr.time
            if dev in edge:
                energy += c * ((tr.sender_energy or 0.0) + (tr.receiver_energy or 0.0))
    return _Run(lat, energy, worst, tuple(outcomes), memory_of(table, range(i, j + 1)))


def _dominated(a: _Label, b: _Label, capped: bool) -> bool:
    """Whether ``b`` is at least as good as ``a`` in every component that matters (the
    running worst case only under a cap)."""
    return (b.key <= a.key and (not capped or b.worst <= a.worst + _TOL)
            and all(y <= x + _TOL for x, y in zip(a.memory, b.memory, strict=True)))


def _insert(front: list[_Label], new: _Label, pareto: bool, capped: bool) -> None:
    if not pareto:
        if not front:
            front.append(new)
        elif new.key < front[0].key:
            front[0] = new
        return
    if any(_dominated(new, old, capped) for old in front):
        return
    front[:] = [old for old in front if not _dominated(old, new, capped)]
    front.append(new)


def _solve_phi(table: ir.CostTable, objective: ir.Objective, freqs: Mapping[str, str | None],
               bundles: list[list[Bundle]]) -> _Label | None:
    n = len(table.positions)
    devices = table.device_names
    cont = continuation(table)
    edge = _edge(table)
    cap = objective.max_latency
    limited = binding_memories(table)
    pareto = cap is not None or bool(limited)
    energy_first = objective.kind == "energy"
    runs: dict[tuple[int, int, str], _Run | None] = {}
    for i in range(n):
        for j in range(i, n):
            for d in devices:
                runs[(i, j, d)] = _run_cost(table, bundles[i], i, j, d, freqs.get(d), cont,
                                            edge)
    fronts: dict[tuple[int, str], list[_Label]] = {}
    zero = tuple(0.0 for _ in limited)

    def extend(prev: _Label | None, i: int, j: int, d: str, add_lat: float,
               add_energy: float, add_worst: float) -> None:
        run = runs[(i, j, d)]
        if run is None:
            return
        base_worst = (prev.worst if prev is not None else 0.0) + add_worst
        worst = base_worst + run.worst
        if cap is not None and (worst > cap * (1 + 1e-9) + _TOL or any(
                base_worst + o > cap * (1 + 1e-9) + _TOL for o in run.outcomes)):
            return
        memory = list(prev.memory if prev is not None else zero)
        if d in limited:
            k = limited.index(d)
            memory[k] += run.memory
            if memory[k] > table.system.device(d).memory:
                return
        key0 = prev.key if prev is not None else (0.0, 0.0)
        lat = key0[1 if energy_first else 0] + add_lat + run.latency
        energy = key0[0] + add_energy + run.energy if energy_first else 0.0
        key = (energy, lat) if energy_first else (lat, 0.0)
        label = _Label(key, worst, tuple(memory), (prev, i, j, devices.index(d)))
        _insert(fronts.setdefault((j, d), []), label, pareto, cap is not None)

    for j in range(n):
        for d in devices:
            extend(None, 0, j, d, 0.0, 0.0, 0.0)
    for i in range(1, n):
        c = cont[cut_segment(table, i - 1)]
        for d_prev in devices:
            for prev in fronts.get((i - 1, d_prev), []):
                for d in devices:
                    if d == d_prev:
                        continue
                    tr = table.transfers.get((i - 1, d_prev, d))
                    if tr is None:
                        continue
                    e = 0.0
                    if d_prev in edge:
                        e += c * (tr.sender_energy or 0.0)
                    if d in edge:
                        e += c * (tr.receiver_energy or 0.0)
                    for j in range(i, n):
                        extend(prev, i, j, d, c * tr.time, e, tr.time)
    finals = [lab for d in devices for lab in fronts.get((n - 1, d), [])]
    return min(finals, key=lambda lab: lab.key) if finals else None


def _placement(label: _Label, devices: Sequence[str], n: int) -> tuple[str, ...]:
    out = [""] * n
    cur: _Label | None = label
    while cur is not None:
        prev, i, j, d = cur.back
        out[i:j + 1] = [devices[d]] * (j - i + 1)
        cur = prev
    return tuple(out)


def split_at_exits(table: ir.CostTable, plan: ir.Plan) -> ir.Plan:
    """The plan's stages cut after every exit head's layer, that stage carrying the head."""
    heads = {table.positions[pos].layer: head for pos, head, _ in table.exits}
    stages: list[ir.Stage] = []
    for s in plan.stages:
        first = s.first
        for layer in range(s.first, s.last + 1):
            if layer in heads:
                stages.append(replace(s, first=first, last=layer, exit=heads[layer], id=-1))
                first = layer + 1
        if first <= s.last:
            stages.append(replace(s, first=first, id=-1))
    return replace(plan, stages=tuple(stages))


def solve_exits(table: ir.CostTable, objective: ir.Objective) -> ir.Plan:
    """The plan of least expected latency (or edge energy) with exit heads.

    Raises:
        UserError: an objective or cap this solve does not support with exit heads.
        InfeasibleError: no placement meets the caps, memories and links.
    """
    from partitioner.solver.solve import build_plan

    t0 = time.perf_counter()
    if objective.kind not in KINDS:
        fail(f"--exit: the {objective.kind} objective is not supported with exit heads "
             f"(use {' or '.join(KINDS)})")
    if objective.max_energy:
        fail("--exit: --max-energy is not supported with exit heads")
    devices = table.device_names
    options = [table.frequencies.get(d, (None,)) or (None,) for d in devices]
    bundles = _first_bundles(table)
    best: tuple[_Label, dict[str, str | None]] | None = None
    for combo in itertools.product(*options):
        freqs = dict(zip(devices, combo, strict=True))
        found = _solve_phi(table, objective, freqs, bundles)
        if found is not None and (best is None or found.key < best[0].key):
            best = (found, freqs)
    if best is None:
        cap = "" if objective.max_latency is None else (
            f" within the worst-case latency cap of {objective.max_latency:g} s")
        fail(f"no placement with the exit heads meets the links, pins and memories{cap}",
             error=InfeasibleError)
    label, freqs = best
    placement = _placement(label, devices, len(table.positions))
    for dev, used in placement_memory(table, placement).items():
        if used > table.system.device(dev).memory:
            fail(f"device {dev}: the plan needs {used:.0f} B of weights, above its memory",
                 error=InfeasibleError)
    used_freqs = {d: freqs.get(d) for d in dict.fromkeys(placement)}
    plan = build_plan(table, objective, placement, used_freqs, "optimal",
                      time.perf_counter() - t0)
    plan = split_at_exits(table, plan)
    price = price_chain(table, placement, used_freqs)
    return replace(plan, estimate=apply_price(plan.estimate, price),
                   solve_seconds=time.perf_counter() - t0)
