"""Explain why no plan exists: the constraint that cannot be met, and the closest value.

The constraint groups are checked in order, each time re-solving with one group relaxed
or turned into the objective: connectivity (pins, links), memory, the latency cap, each
device's energy cap, then the caps together. The first group that fails alone is named
with the best value any plan achieves, e.g. "latency cap 0.01 s cannot be met: the
fastest plan takes 0.043 s".
"""

from __future__ import annotations

import time

from partitioner import ir
from partitioner.solver.memory import memory_of
from partitioner.solver.milp import Formulation, SolveResult
from partitioner.solver.network import Network, reachable

__all__ = ["explain_infeasible", "DIAGNOSE_SECONDS"]

#: Budget of a diagnosis when the objective has no time limit, s.
DIAGNOSE_SECONDS = 30.0


class _OutOfTime(Exception):
    """A check did not finish before the deadline."""


def _decided(r: SolveResult) -> SolveResult:
    """``r`` if it is an answer (a proven optimum or infeasibility), else stop."""
    if r.status in ("optimal", "infeasible"):
        return r
    raise _OutOfTime


def _num(x: float) -> str:
    return f"{x:.4g}"


def _ranges(idx: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0..2, 5"``."""
    out: list[str] = []
    start = prev = idx[0]
    for k in idx[1:] + [None]:  # type: ignore[list-item]
        if k is not None and k == prev + 1:
            prev = k
            continue
        out.append(str(start) if start == prev else f"{start}..{prev}")
        if k is not None:
            start = prev = k
    return ", ".join(out)


def _names(devs: list[str]) -> str:
    return ", ".join(repr(d) for d in devs)


def _connectivity(table: ir.CostTable, net: Network) -> str:
    fwd, _ = reachable(net)
    pos = table.positions
    frontier = -1
    senders: list[str] = []
    for v, key in enumerate(net.keys):
        if key[0] in ("full", "leave") and fwd[v]:
            if key[1] > frontier:
                frontier, senders = key[1], []
            if key[1] == frontier and key[2] not in senders:
                senders.append(key[2])
    nxt = frontier + 1
    receivers = sorted({key[2] for key in net.keys
                        if key[0] in ("in", "run") and key[1] == nxt})
    where = f"position {nxt} ({pos[nxt].name})"
    if not receivers:
        allowed = list(pos[nxt].allowed or table.device_names)
        return (f"{where} has no price on any device it may run on ({_names(allowed)}): "
                "no bundle of the cost table covers it there")
    if frontier < 0:
        return f"no plan can start: {where} has no usable bundle"
    missing = [(s, r) for s in senders for r in receivers
               if s != r and (frontier, s, r) not in table.transfers]
    cut = f"the cut after position {frontier} ({pos[frontier].name})"
    if len(missing) == 1:
        s, r = missing[0]
        return f"no path from {s!r} to {r!r}: {cut} cannot reach where {where} may run"
    if missing:
        return (f"no path from {_names(senders)} to {_names(receivers)}: {cut} cannot "
                f"reach any device where {where} may run")
    return (f"no plan reaches {where}: pins and bundle sizes leave no way to continue "
            f"from {_names(senders)}")


def _memory(table: ir.CostTable, net: Network, solver: str, deadline: float) -> str:
    pos = table.positions
    for dev in table.system.devices:
        pinned = [k for k, p in enumerate(pos) if p.allowed is not None
                  and tuple(p.allowed) == (dev.name,)]
        weight = memory_of(table, pinned)
        if pinned and weight > dev.memory:
            # Name model layers by their layer index (as `inspect` prints them).
            layers = [pos[k].layer for k in pinned if pos[k].layer is not None]
            others = [pos[k].name for k in pinned if pos[k].layer is None
                      and pos[k].weight_bytes]
            what = " and ".join(filter(None, [
                f"layers {_ranges(layers)}" if layers else "",  # type: ignore[arg-type]
                ", ".join(others)]))
            return (f"memory of {dev.name!r} ({_num(dev.memory)} B) cannot hold the pinned "
                    f"{what} ({_num(weight)} B)")
    for dev in table.system.devices:
        form = Formulation(net, table, integer=True, solver=solver, deadline=deadline)
        form.add_memory(skip=dev.name)
        r = _decided(form.optimize(form.memory_expr(dev.name)))
        if r.ok and r.value is not None and r.value > dev.memory:
            return (f"memory of {dev.name!r} ({_num(dev.memory)} B) cannot be met: every "
                    f"plan puts at least {_num(r.value)} B of weights on it")
    total = memory_of(table, range(len(pos)))
    return (f"the devices' memories cannot hold the model's weights ({_num(total)} B) "
            "in any placement")


def explain_infeasible(table: ir.CostTable, objective: ir.Objective, net: Network,
                       deadline: float | None = None) -> str:
    """A one-line reason why no plan of ``table`` meets ``objective``'s constraints.

    Args:
        deadline: ``time.perf_counter()`` value by which to give up (default: now plus
            the objective's time limit, else :data:`DIAGNOSE_SECONDS`).
    """
    fwd, _ = reachable(net)
    if not fwd[net.sink]:
        return _connectivity(table, net)
    if deadline is None:
        deadline = time.perf_counter() + (objective.time_limit or DIAGNOSE_SECONDS)
    try:
        return _caps(table, objective, net, deadline)
    except _OutOfTime:
        limit = objective.time_limit or DIAGNOSE_SECONDS
        return (f"no plan meets the constraints, and the solver could not diagnose within "
                f"the limit of {_num(limit)} s which constraint is to blame (raise "
                "--time-limit to find out)")


def _caps(table: ir.CostTable, objective: ir.Objective, net: Network,
          deadline: float) -> str:
    solver = objective.solver

    def base() -> Formulation:
        form = Formulation(net, table, integer=True, solver=solver, deadline=deadline)
        form.add_memory()
        return form

    form = base()
    fastest = _decided(form.optimize(form.latency))
    if not fastest.ok:
        return _memory(table, net, solver, deadline)
    cap = objective.max_latency
    if cap is not None and fastest.value is not None and fastest.value > cap:
        return (f"latency cap {_num(cap)} s cannot be met: the fastest plan takes "
                f"{_num(fastest.value)} s")
    for dev, ecap in objective.max_energy.items():
        form = base()
        least = _decided(form.optimize(form.energy[dev]))
        if least.ok and least.value is not None and least.value > ecap:
            return (f"energy cap of {dev!r} ({_num(ecap)} J) cannot be met: its least "
                    f"energy is {_num(least.value)} J")
    if objective.max_energy:
        form = base()
        form.add_caps(objective, latency=False)
        within = _decided(form.optimize(form.latency))
        caps = _names(list(objective.max_energy))
        if not within.ok:
            return f"the energy caps of {caps} cannot be met together"
        if cap is not None and within.value is not None:
            return (f"latency cap {_num(cap)} s cannot be met within the energy caps of "
                    f"{caps}: the fastest plan that meets them takes {_num(within.value)} s")
    return "no plan meets the memory limits and caps together"
