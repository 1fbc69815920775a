"""The spatial-split planner (DISTREDGE's problem, solved without reinforcement learning).

A plan is a path over the extended chain whose arcs are either *runs* (positions
``i..j`` on one device, priced by :mod:`.runs` exactly as the layer-wise solver prices
them) or *split arcs*: a volume of row-splittable layers ``i..j`` cut into row parts on
several devices (priced by :mod:`partitioner.analysis.spatial`). The states at a boundary
are "the data is on device d, made by a run" (``V``), "gathered on d by a split stage"
(``G``) and "still spread over the parts of a split stage" (``P``, which only a further
split stage may follow, its parts fetching their rows, halo included, from the previous
parts). The latency objective is additive over these arcs (the timing model of
:mod:`partitioner.analysis.spatial`), so the least path is found by a forward dynamic
program over the boundaries, as in :mod:`.dp`; the layer-wise optimum
(:func:`partitioner.solver.solve`) is always a candidate, so a spatial plan is never worse.

**The min-max row split of one arc** (volume, source state, gather target, frequencies):
part ``[a, b]`` on device ``q`` costs ``c_q(a, b) = in_q + compute_q + out_q``, which
grows with ``b`` and shrinks with ``a`` (more rows never cost less). For a finishing
time ``T`` and the devices in a fixed order along the height, the largest prefix of rows
that ``m`` parts of the first ``k`` devices can finish within ``T`` is
``F[k][m] = max(F[k-1][m], reach_k(F[k-1][m-1]))`` with ``reach_k(a)`` the last row ``b``
with ``c_k(a, b) <= T`` plus one: by the monotonicity, a larger prefix is never worse, so
this recursion decides exactly whether ``T`` is feasible with at most ``N`` parts (the
subset of devices falls out: a device that cannot finish one row takes none).
Feasibility is monotone in ``T``, so bisection on ``T`` finds the optimum to a relative
1e-7. **Exact** over row cuts, device subsets and parts counts; **bounded**: the order of
the devices along the height is the system file's (the order only decides which device
gets a border band, whose halo is one-sided); a split stage after a split stage is cut
optimally *given* the previous stage's cuts (the DP keeps one configuration per boundary),
which is not a global optimum over chains of volumes.

A split stage has at least two parts (one part is a run, which the run arcs offer); the
recursion then caps each part's reach so a row is left for every part still required.
Pruning (never removes a better plan): a first pass over one-layer volumes finds a plan;
the full pass skips a split arc whose source value, plus the volume's compute-only
min-max, plus :func:`_suffix_bounds_layers` reaches that plan's latency, and an arc with
no split finishing within what is left of it.

Throughput: the latency-optimal spatial plan is offered against the layer-wise
throughput optimum and the lower bottleneck wins (bounded, not proven optimal).
See docs/SPATIAL.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from partitioner import ir
from partitioner.analysis.spatial import (
    PartCosts,
    Volume,
    part_costs,
    transfer_array,
    upper_mask,
    volume,
)
from partitioner.errors import InfeasibleError, fail
from partitioner.solver.dp import phi_vectors
from partitioner.solver.rowsplit import _feasible, min_max_split
from partitioner.solver.runs import run_arrays

__all__ = ["solve_spatial", "min_max_split", "SplitArc", "arc_costs", "MAX_SPATIAL_PHI"]

#: The most frequency vectors the spatial planner enumerates.
MAX_SPATIAL_PHI = 16


@dataclass(frozen=True)
class SplitArc:
    """A solved split: ``parts`` as ``(device, frequency, first row, last row)``."""

    first: int  # positions
    last: int
    cost: float
    parts: tuple[tuple[str, str | None, int, int], ...]


# --------------------------------------------------------------------------- arcs


def _provider_time(system: ir.System, vol: Volume, prev: Volume,
                   prev_parts: Sequence[tuple[str, str | None, int, int]], device: str
                   ) -> np.ndarray | None:
    """``(H, H)``: seconds part ``[a, b]`` of ``vol`` on ``device`` waits for its rows
    from the parts of the previous split stage (one message per provider, received one
    after the other); None when ``vol`` reads a tensor the previous stage does not hold."""
    held = {n for n, _, _ in prev.outputs}
    if any(n not in held for n, *_ in vol.inputs):
        return None
    total = np.zeros((vol.height, vol.height))
    for p_dev, _, a, b in prev_parts:
        if p_dev == device:
            continue
        rows = prev.output_rows(a, b)
        nbytes = np.zeros_like(total)
        for n, lo, hi, rowbytes, _ in vol.inputs:
            h_lo, h_hi = rows[n]
            top = np.minimum(hi, h_hi)
            bottom = np.maximum(lo, h_lo)
            nbytes += np.maximum(top[None, :] - bottom[:, None] + 1, 0) * rowbytes
        total += transfer_array(system, p_dev, device, nbytes)
    return total


def arc_costs(system: ir.System, vol: Volume, compute: Sequence[PartCosts],
              source: str | tuple[Volume, Sequence[tuple[str, str | None, int, int]]],
              target: str | None) -> list[np.ndarray] | None:
    """Per candidate device, ``c_q(a, b)``: incoming + compute + gather to ``target``
    (None: the next stage is split too, its parts count the transfer)."""
    base = arc_base(system, vol, compute, source)
    return None if base is None else with_gather(system, vol, compute, base, target)


def arc_base(system: ir.System, vol: Volume, compute: Sequence[PartCosts],
             source: str | tuple[Volume, Sequence[tuple[str, str | None, int, int]]]
             ) -> list[np.ndarray] | None:
    """Per candidate device: incoming + compute (None: the source lacks an input)."""
    out = []
    for pc in compute:
        if isinstance(source, str):
            wait = transfer_array(system, source, pc.device, vol.input_bytes)
        else:
            got = _provider_time(system, vol, source[0], source[1], pc.device)
            if got is None:
                return None
            wait = got
        out.append(pc.compute + wait)
    return out


def with_gather(system: ir.System, vol: Volume, compute: Sequence[PartCosts],
                base: Sequence[np.ndarray], target: str | None) -> list[np.ndarray]:
    """``base`` plus each part's gather to ``target`` (the empty parts stay infinite)."""
    mask = upper_mask(vol.height)
    out = []
    for pc, c in zip(compute, base, strict=True):
        if target is not None:
            c = c + transfer_array(system, pc.device, target, vol.output_bytes)
        out.append(np.where(mask, c, math.inf))
    return out


# --------------------------------------------------------------------------- planner


def _volume_weights(graph: ir.LayerGraph, first: int, last: int) -> int:
    names = {w for layer in graph.layers[first:last + 1] for w in layer.weights}
    return sum(graph.initializer_bytes.get(w, 0) for w in names) or sum(
        layer.weight_bytes for layer in graph.layers[first:last + 1])


@dataclass
class _Best:
    value: float = math.inf
    back: tuple | None = None  # type: ignore[type-arg]


def _suffix_bounds_layers(table: ir.CostTable, freq: dict[str, str | None],
                          graph: ir.LayerGraph, max_parts: int) -> list[float]:
    """``lb[j]``: a lower bound on the latency after position ``j``.

    A position no split stage can hold (pseudo layers, layers without row geometry)
    takes at least its least compute time. For a splittable layer ``k`` with compute
    ``t_kq`` on device ``q``, the parts of any stage that holds it compute shares
    ``s_q`` of its rows with ``sum_q s_q >= 1``, so for any weights ``w_q > 0`` the stage
    takes at least ``min_q(w_q t_kq) / sum_{N largest} w_q`` per such layer, and these
    bounds add up over the layers of the stage (also a whole stage on one device obeys
    it). ``w_q = 1 / sum_k t_kq`` makes it the ideal parallel time for analytic devices.
    """
    pos = table.positions
    rows_none = [layer.rows is None for layer in graph.layers]
    singles = []
    for k in range(len(pos)):
        got = {d: table.bundles.get((k, k, d, f)) for d, f in freq.items()}
        singles.append({d: c.compute for d, c in got.items() if c is not None})
    totals: dict[str, float] = {}
    for k, p in enumerate(pos):
        if p.layer is not None and not rows_none[p.layer]:
            for d, t in singles[k].items():
                totals[d] = totals.get(d, 0.0) + t
    weights = {d: 1.0 / t for d, t in totals.items() if t > 0}
    top = sum(sorted(weights.values(), reverse=True)[:max_parts])
    out = [0.0] * (len(pos) + 1)
    for k in range(len(pos) - 1, -1, -1):
        times = singles[k]
        layer = pos[k].layer
        if not times:
            add = 0.0
        elif layer is None or rows_none[layer] or not top:
            add = min(times.values())
        else:
            add = min(weights.get(d, 0.0) * t for d, t in times.items()) / top
            add = min(add, min(times.values()))
        out[k] = out[k + 1] + add
    return out[1:] + [0.0]


def _dp(graph: ir.LayerGraph, table: ir.CostTable, phi: np.ndarray, max_parts: int,
        bound: float, max_len: int | None = None
        ) -> tuple[float, list[tuple]] | None:  # type: ignore[type-arg]
    """The least-latency path (runs and split arcs) for one frequency vector.

    Split arcs whose source value plus the volume's compute-only min-max plus
    :func:`_suffix_bounds_layers` reach ``bound`` (the latency of a known plan) cannot lead to a
    better plan and are skipped; ``max_len`` caps the volume length (a first, cheap pass
    that finds such a plan)."""
    arrays = run_arrays(table)
    devices = arrays.devices
    n = arrays.n
    pos = table.positions
    system = table.system
    freq = {d: arrays.freqs[k][int(phi[k])] for k, d in enumerate(devices)}
    nd = len(devices)
    V = [[_Best() for _ in range(n)] for _ in range(nd)]
    G = [[_Best() for _ in range(n)] for _ in range(nd)]
    P = [_Best() for _ in range(n)]
    P_cfg: list[tuple[Volume, tuple] | None] = [None] * n  # type: ignore[type-arg]
    layer_of = [p.layer for p in pos]
    vols: dict[tuple[int, int], Volume | None] = {}
    comp_cache: dict[tuple[int, int], list[PartCosts]] = {}

    def vol_at(i: int, j: int) -> Volume | None:
        if (i, j) not in vols:
            li, lj = layer_of[i], layer_of[j]
            got = None if li is None or lj is None else volume(graph, li, lj)
            vols[(i, j)] = None if isinstance(got, str) or got is None else got
        return vols[(i, j)]

    def computes(i: int, j: int, vol: Volume) -> list[PartCosts]:
        if (i, j) not in comp_cache:
            share = vol.layer_share
            weights = _volume_weights(graph, vol.first, vol.last)
            out = []
            for d in devices:
                if system.device(d).memory < weights:
                    continue
                if any(d not in (pos[k].allowed or (d,)) for k in range(i, j + 1)):
                    continue
                pc = part_costs(table, vol, d, freq[d], share)
                if pc is not None:
                    out.append(pc)
            comp_cache[(i, j)] = out
        return comp_cache[(i, j)]

    def lower(i: int, j: int, vol: Volume, comp: list[PartCosts]) -> float:
        got = min_max_split([c.compute for c in comp], max_parts)
        return math.inf if got is None else got[0]

    lbs: dict[tuple[int, int], float] = {}
    rest = _suffix_bounds_layers(table, freq, graph, max_parts)
    for j in range(n):
        # runs ending at j
        for d in range(nd):
            row = arrays.time[d, int(phi[d]), :j + 1, j]
            for i in range(j + 1):
                t = row[i]
                if not math.isfinite(t):
                    continue
                back: tuple  # type: ignore[type-arg]
                if i == 0:
                    start, back = 0.0, ("start",)
                else:
                    start, back = G[d][i - 1].value, ("G", d, i - 1)
                    for e in range(nd):
                        if e == d:
                            continue
                        cut = arrays.cut_time[i - 1, e, d]
                        if V[e][i - 1].value + cut < start:
                            start, back = V[e][i - 1].value + cut, ("V", e, i - 1)
                if start + t < V[d][j].value:
                    V[d][j] = _Best(start + t, ("run", d, i, j, back))
        # split arcs ending at j
        if layer_of[j] is None:
            continue
        last_pos = j == n - 1
        for i in range(j, -1, -1):
            layer_i = layer_of[i]
            if layer_i is None or i == 0 or graph.layers[layer_i].rows is None:
                break
            if max_len is not None and j - i + 1 > max_len:
                break
            vol = vol_at(i, j)
            if vol is None:
                continue
            comp = computes(i, j, vol)
            if len(comp) < 2:
                continue
            if (i, j) not in lbs:
                lbs[(i, j)] = lower(i, j, vol, comp)
            lb = lbs[(i, j)] + rest[j]
            sources: list[tuple[float, object, tuple]] = []  # type: ignore[type-arg]
            for s in range(nd):
                v = min(V[s][i - 1].value, G[s][i - 1].value)
                if v + lb < bound:
                    back = ("V", s, i - 1) if V[s][i - 1].value <= G[s][i - 1].value \
                        else ("G", s, i - 1)
                    sources.append((v, devices[s], back))
            cfg = P_cfg[i - 1]
            if cfg is not None and P[i - 1].value + lb < bound:
                sources.append((P[i - 1].value, cfg, ("P", i - 1)))
            targets: list[int | None] = [] if last_pos else list(range(nd))
            if not last_pos and layer_of[j + 1] is not None:
                targets.append(None)
            for v, src, back in sources:
                base = arc_base(system, vol, comp, src)  # type: ignore[arg-type]
                if base is None:
                    continue
                for t in targets:
                    costs = with_gather(system, vol, comp, base,
                                        None if t is None else devices[t])
                    # no split within what is left of the bound: the arc cannot help
                    if _feasible(costs, min(max_parts, len(costs)), bound - v - rest[j],
                                 2) is None:
                        continue
                    got = min_max_split(costs, max_parts, lbs[(i, j)], min_parts=2)
                    if got is None:
                        continue
                    cost, chosen = got
                    parts = tuple((comp[q].device, comp[q].frequency, a, b)
                                  for q, a, b in chosen)
                    total = v + cost
                    if t is None:
                        if total < P[j].value:
                            P[j] = _Best(total, ("split", i, j, parts, back))
                            P_cfg[j] = (vol, parts)
                    elif total < G[t][j].value:
                        G[t][j] = _Best(total, ("split", i, j, parts, back))
    best = _Best()
    for d in range(nd):
        for state in (V[d][n - 1], G[d][n - 1]):
            if state.value < best.value:
                best = state
    if best.back is None:
        return None
    # walk back
    segments: list[tuple] = []  # type: ignore[type-arg]
    node = best.back
    while node is not None:
        segments.append(node)
        prev = node[-1]
        if prev[0] == "start":
            break
        kind = prev[0]
        if kind == "V":
            node = V[prev[1]][prev[2]].back
        elif kind == "G":
            node = G[prev[1]][prev[2]].back
        else:
            node = P[prev[1]].back
    return best.value, segments[::-1]


def _plan_of(table: ir.CostTable, segments: list[tuple], freq: dict[str, str | None],  # type: ignore[type-arg]
             value: float, seconds: float, objective: ir.Objective) -> ir.Plan:
    pos = table.positions
    placement = [""] * len(pos)
    stages: list[ir.Stage] = []
    pseudo: dict[str, str] = {}
    for seg in segments:
        if seg[0] == "run":
            _, d, i, j, _ = seg
            dev = table.device_names[d]
            layers: list[int] = []
            for k in range(i, j + 1):
                placement[k] = dev
                layer = pos[k].layer
                if pos[k].kind == "layer" and layer is not None:
                    layers.append(layer)
                else:
                    pseudo[pos[k].kind] = dev
            if layers:
                stages.append(ir.Stage(dev, freq.get(dev), min(layers), max(layers)))
        else:
            _, i, j, parts, _ = seg
            for k in range(i, j + 1):
                placement[k] = parts[0][0]
            first, last = pos[i].layer, pos[j].layer
            assert first is not None and last is not None
            stages.append(ir.Stage(None, None, first, last, parts=tuple(
                ir.Part(d, f, (a, b)) for d, f, a, b in parts)))
    used = dict.fromkeys(d for s in stages for d in s.devices)
    est = ir.Estimate(latency=value, compute=0.0, communication=0.0, weight_loading=0.0,
                      bottleneck=0.0)
    return ir.Plan(status="optimal", objective=objective.kind, stages=tuple(stages),
                   estimate=est, solve_seconds=seconds, placement=tuple(placement),
                   frequencies={d: freq.get(d) for d in used}, pseudo=pseudo)


def _fits_memory(graph: ir.LayerGraph, table: ir.CostTable, plan: ir.Plan) -> bool:
    held: dict[str, set[str]] = {}
    extra: dict[str, int] = {}
    for s in plan.stages:
        names = {w for layer in graph.layers[s.first:s.last + 1] for w in layer.weights}
        for d in s.devices:
            held.setdefault(d, set()).update(names)
            if not names:
                extra[d] = extra.get(d, 0) + sum(
                    layer.weight_bytes for layer in graph.layers[s.first:s.last + 1])
    for d, names in held.items():
        need = sum(graph.initializer_bytes.get(w, 0) for w in names) + extra.get(d, 0)
        if need > table.system.device(d).memory:
            return False
    return True


def solve_spatial(graph: ir.LayerGraph, table: ir.CostTable,
                  objective: ir.Objective | None = None, max_parts: int | None = None
                  ) -> ir.Plan:
    """The best plan with split stages, or the layer-wise optimum when that is better.

    Returns a routed plan (its estimate from
    :func:`partitioner.analysis.spatial_estimate.estimate_plan` when it has parts).

    Raises:
        UserError: ``max_parts`` below 2 or an objective other than latency/throughput.
    """
    from partitioner.analysis.routing import route_plan
    from partitioner.solver import solve

    objective = objective or ir.Objective()
    if objective.kind not in ("latency", "throughput"):
        fail(f"--spatial plans for the latency or throughput objective, not "
             f"{objective.kind!r}")
    n_dev = len(table.device_names)
    if max_parts is None:
        max_parts = n_dev
    if max_parts < 2:
        fail(f"--max-parts {max_parts}: a split stage needs at least 2 parts")
    t0 = time.perf_counter()
    layerwise = route_plan(graph, table, solve(table, objective))
    arrays = run_arrays(table)
    phis = phi_vectors(arrays)
    if len(phis) > MAX_SPATIAL_PHI:
        fail(f"--spatial: {len(phis)} frequency vectors (at most {MAX_SPATIAL_PHI}); give "
             f"fewer frequencies per device")
    def key(p: ir.Plan) -> float:
        return p.estimate.latency if objective.kind == "latency" else p.estimate.bottleneck

    bound = layerwise.estimate.latency * (1 + 1e-12) + 1e-15
    best = layerwise
    for phi in phis:
        # a cheap first pass (one-layer volumes) gives a plan whose latency bounds the
        # full search, which then skips every split arc that cannot beat it
        quick = _dp(graph, table, phi, max_parts, bound, max_len=1)
        limit = bound if quick is None else min(bound, quick[0] * (1 + 1e-9) + 1e-15)
        found = _dp(graph, table, phi, max_parts, limit)
        if found is None:
            found = quick
        if found is None:
            continue
        value, segments = found
        if not any(s[0] == "split" for s in segments):
            continue
        freq = {d: arrays.freqs[k][int(phi[k])] for k, d in enumerate(arrays.devices)}
        cand = _plan_of(table, segments, freq, value, time.perf_counter() - t0, objective)
        if not _fits_memory(graph, table, cand):
            continue
        try:
            cand = route_plan(graph, table, cand)
        except InfeasibleError:
            continue
        cap = objective.max_latency
        if cap is not None and cand.estimate.latency > cap:
            continue
        if key(cand) < key(best):
            best = cand
    return replace(best, solve_seconds=time.perf_counter() - t0)
