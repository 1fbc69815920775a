"""Exact arc pruning by shortest-path bounds (reduced-cost fixing on the DAG).

For a linear quantity ``c`` (latency, a device's energy or busy time) the network's
shortest distances ``f(v)`` from the source and ``g(v)`` to the sink give, for every
arc ``(u, v)``, a lower bound ``f(u) + c_uv + g(v)`` on ``c`` of *every* plan using the
arc. An arc whose bound exceeds a value ``U`` that every wanted plan respects (a cap, or
the value of a feasible plan when ``c`` is the objective) lies on no wanted plan and is
dropped before the MIP is built. Nothing is approximated: the MIP over the pruned network
has the same optimum, it is only smaller (the LP of a 100-layer, MBS = L network takes
Clp about a second; after pruning it is a few hundred arcs).

The feasible plan comes from the same shortest path when it happens to respect the
coupling constraints (one frequency per device, memory, caps), else from re-running it
with each device's frequency fixed to the first one the path used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from partitioner import ir
from partitioner.analysis.estimate import evaluate
from partitioner.solver.memory import placement_memory
from partitioner.solver.network import Arc, Network, rebuild

__all__ = ["costs_of", "busy_costs", "energy_costs", "time_costs", "distances", "prune_by",
           "shortest_plan", "bottleneck_plan"]

Chosen = tuple[tuple[str, ...], dict[str, str | None]]


def costs_of(net: Network, pick: Callable[[Arc], float]) -> list[float]:
    return [pick(arc) for arc in net.arcs]


def busy_costs(net: Network, device: str) -> list[float]:
    """Per arc, the seconds it adds to ``device``'s busy time."""
    return [sum(t for x, t in arc.busy if x == device) for arc in net.arcs]


def energy_costs(net: Network, devices: set[str]) -> list[float]:
    """Per arc, the joules it adds to the devices of ``devices``."""
    return [sum(e for x, e in arc.energy if x in devices) for arc in net.arcs]


def time_costs(net: Network) -> list[float]:
    """Per arc, the seconds it adds to the single-inference latency."""
    return [arc.time for arc in net.arcs]


def distances(net: Network, costs: list[float]) -> tuple[list[float], list[float], list[int]]:
    """Shortest distances from the source and to the sink, and the best in-arc per node."""
    order = net.topo_order()
    n = len(net.keys)
    out: list[list[int]] = [[] for _ in range(n)]
    inc: list[list[int]] = [[] for _ in range(n)]
    for a, arc in enumerate(net.arcs):
        out[arc.tail].append(a)
        inc[arc.head].append(a)
    f = [math.inf] * n
    pred = [-1] * n
    f[net.source] = 0.0
    arcs = net.arcs
    for v in order:
        fv = f[v]
        if fv == math.inf:
            continue
        for a in out[v]:
            h = arcs[a].head
            w = fv + costs[a]
            if w < f[h]:
                f[h] = w
                pred[h] = a
    g = [math.inf] * n
    g[net.sink] = 0.0
    for v in reversed(order):
        gv = g[v]
        if gv == math.inf:
            continue
        for a in inc[v]:
            t = arcs[a].tail
            w = gv + costs[a]
            if w < g[t]:
                g[t] = w
    return f, g, pred


def prune_by(net: Network, costs: list[float], upper: float) -> Network:
    """Drop the arcs on which every source-sink path has ``sum costs > upper``."""
    f, g, _ = distances(net, costs)
    tol = 1e-9 * abs(upper) + 1e-12
    keep = [f[arc.tail] + c + g[arc.head] <= upper + tol
            for arc, c in zip(net.arcs, costs, strict=True)]
    return rebuild(net, keep)


def _path(net: Network, pred: list[int]) -> list[int] | None:
    path = []
    v = net.sink
    while v != net.source:
        a = pred[v]
        if a < 0:
            return None
        path.append(a)
        v = net.arcs[a].tail
    return path[::-1]


def shortest_plan(net: Network, table: ir.CostTable, objective: ir.Objective,
                  costs: list[float]) -> Chosen | None:
    """A feasible plan near the shortest path of ``costs``, or None if none was found."""
    fixed: dict[str, str | None] = {}
    for _ in range(len(table.device_names) + 1):
        masked = [math.inf if (arc.bundle is not None and arc.bundle[2] in fixed
                               and fixed[arc.bundle[2]] != arc.bundle[3]) else c
                  for arc, c in zip(net.arcs, costs, strict=True)]
        _, _, pred = distances(net, masked)
        path = _path(net, pred)
        if path is None:
            return None
        placement: list[str] = [""] * len(table.positions)
        freqs: dict[str, str | None] = {}
        clash = False
        for a in path:
            b = net.arcs[a].bundle
            if b is None:
                continue
            i, j, d, fq = b
            placement[i:j + 1] = [d] * (j - i + 1)
            if freqs.setdefault(d, fq) != fq:
                clash = True
        if not clash:
            return _check(table, objective, (tuple(placement), freqs))
        for d, fq in freqs.items():
            fixed.setdefault(d, fq)
    return None


def _check(table: ir.CostTable, objective: ir.Objective, chosen: Chosen) -> Chosen | None:
    placement, freqs = chosen
    load = placement_memory(table, placement)
    if any(load[d.name] > d.memory for d in table.system.devices if d.name in load):
        return None
    est = evaluate(table, placement, freqs)
    if objective.max_latency is not None and est.latency > objective.max_latency:
        return None
    if any(est.energy.get(d, 0.0) > cap for d, cap in objective.max_energy.items()):
        return None
    return chosen


def bottleneck_plan(net: Network, table: ir.CostTable, objective: ir.Objective,
                    rounds: int = 25) -> Chosen | None:
    """A feasible plan with a small bottleneck, by multiplicative weights on devices.

    Each round takes the shortest path of ``sum_d lam_d * busy_d`` (plus a little latency
    to break ties) and raises the weight of the devices that are busiest relative to the
    bottleneck. Only an upper bound for pruning: optimality comes from the MIP.
    """
    devices = table.device_names
    lam = {d: 1.0 for d in devices}
    busy_cost = {d: busy_costs(net, d) for d in devices}
    times = time_costs(net)
    best: Chosen | None = None
    best_b = math.inf
    for r in range(rounds):
        costs = [1e-3 * t + sum(lam[d] * busy_cost[d][a] for d in devices)
                 for a, t in enumerate(times)]
        chosen = shortest_plan(net, table, objective, costs)
        if chosen is None:
            break
        busy = _busy(table, chosen)
        b = max(busy.values())
        if b < best_b - 1e-15:
            best, best_b = chosen, b
        step = 2.0 / math.sqrt(r + 1)
        for d in devices:
            lam[d] *= math.exp(step * (busy.get(d, 0.0) / b - 1.0)) if b > 0 else 1.0
        total = sum(lam.values())
        lam = {d: v * len(devices) / total for d, v in lam.items()}
    return best


def _busy(table: ir.CostTable, chosen: Chosen) -> dict[str, float]:
    from partitioner.analysis.estimate import device_busy

    return device_busy(table, chosen[0], chosen[1])


def bottleneck_window(net: Network, table: ir.CostTable, objective: ir.Objective,
                      upper: float, steps: int = 8) -> tuple[float, float, Network]:
    """Narrow ``[lower, upper]`` around the least bottleneck by bisection.

    A threshold ``tau`` whose pruned network (every arc kept only if some path through
    it has ``busy_d <= tau`` for its devices) has no path proves ``B* > tau``; a plan
    found there with bottleneck ``<= tau`` proves ``B* <= tau``. Stops at the first
    threshold it cannot decide. Returns the bounds and the network pruned at ``upper``.
    """
    lower = 0.0
    best_net = _prune_busy(net, table, upper)
    for _ in range(steps):
        tau = 0.5 * (lower + upper)
        cut = _prune_busy(best_net, table, tau)
        fwd_ok = _connected(cut)
        if not fwd_ok:
            lower = tau
            continue
        plan = bottleneck_plan(cut, table, objective, rounds=6)
        if plan is None:
            break
        b = max(_busy(table, plan).values())
        if b > tau:
            break
        upper = b
        best_net = _prune_busy(cut, table, upper)
    return lower, upper, best_net


def _connected(net: Network) -> bool:
    from partitioner.solver.network import reachable

    fwd, _ = reachable(net)
    return fwd[net.sink]


def _prune_busy(net: Network, table: ir.CostTable, bound: float) -> Network:
    for _ in range(2):  # pruning one device tightens the others' bounds
        for dev in table.device_names:
            if not _connected(net):
                return net
            net = prune_by(net, busy_costs(net, dev), bound)
    return net
