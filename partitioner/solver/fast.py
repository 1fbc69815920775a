"""When and how an objective is solved without the integer program (exact either way).

:func:`applies` says whether nothing but one frequency per device couples the choices
(no latency or energy cap, every memory holds whatever may be placed on it, few enough
frequency vectors); :func:`solve_fast` then solves ``latency``, ``energy`` and
``weighted`` by the dynamic program of :mod:`.dp` and ``throughput`` by the label search
of :mod:`.bottleneck`; ``carbon`` (a ratio) by Dinkelbach's method over the same dynamic
programs (:mod:`.carbon`), which hands back to the integer program when its bounds
cannot decide.
"""

from __future__ import annotations

import math

import numpy as np

from partitioner import ir
from partitioner.solver.bottleneck import OutOfTime, least_bottleneck
from partitioner.solver.carbon import carbon_applies, least_carbon
from partitioner.solver.dp import MAX_PHI, Chosen, Costs, linear_dp, linear_dp_batch
from partitioner.solver.memory import memory_of
from partitioner.solver.runs import RunArrays, run_arrays

__all__ = ["applies", "solve_fast", "binding_memories"]

_KINDS = ("latency", "energy", "weighted", "throughput", "carbon")


def applies(table: ir.CostTable, objective: ir.Objective) -> bool:
    """Whether :func:`solve_fast` is exact for ``objective`` on ``table``."""
    if objective.kind not in _KINDS or objective.max_latency is not None \
            or objective.max_energy:
        return False
    if objective.kind == "carbon" and not carbon_applies(table):
        return False
    if math.prod(len(table.frequencies.get(d, (None,))) for d in table.device_names) \
            > MAX_PHI:
        return False
    # a memory that may bind: the integer program prices it
    return not binding_memories(table)


def binding_memories(table: ir.CostTable) -> list[str]:
    """Devices whose memory cannot hold every position that may run on them."""
    out = []
    for dev in table.system.devices:
        if math.isinf(dev.memory):
            continue
        anywhere = [k for k, p in enumerate(table.positions)
                    if p.allowed is None or dev.name in p.allowed]
        if memory_of(table, anywhere) > dev.memory:
            out.append(dev.name)
    return out


def _edge_energy(table: ir.CostTable, arrays: RunArrays) -> Costs:
    edge = np.array([d.device_class == "edge" for d in table.system.devices])
    run = np.where(edge[:, None, None, None], arrays.energy, 0.0)
    run = np.where(np.isfinite(arrays.time), run, math.inf)
    cut = arrays.cut_send * edge[None, :, None] + arrays.cut_recv * edge[None, None, :]
    cut = np.where(np.isfinite(arrays.cut_time), cut, math.inf)
    return run, cut


def _negated(costs: Costs) -> Costs:
    """Costs whose minimum is the maximum of ``costs`` (infeasible stays infinite)."""
    run, cut = costs
    return (np.where(np.isfinite(run), -run, math.inf),
            np.where(np.isfinite(cut), -cut, math.inf))


def _weighted(table: ir.CostTable, arrays: RunArrays, objective: ir.Objective
              ) -> Chosen | None:
    """QUANT: ``w_T (T - T_min)/(T_max - T_min) + w_E (E - E_min)/(E_max - E_min)``."""
    latency: Costs = (arrays.time, arrays.cut_time)
    energy = _edge_energy(table, arrays)
    run = np.zeros_like(arrays.time)
    cut = np.zeros_like(arrays.cut_time)
    # min and max of T and E over every plan: four programs in one batch
    sets = [latency, _negated(latency), energy, _negated(energy)]
    found = linear_dp_batch(arrays, [(np.stack([c[0] for c in sets]),
                                      np.stack([c[1] for c in sets]))])
    if any(f is None for f in found):
        return None
    ends = [f[0][0] for f in found if f is not None]
    for (lo, hi), costs, w in (((ends[0], -ends[1]), latency, objective.latency_weight),
                               ((ends[2], -ends[3]), energy, objective.energy_weight)):
        if hi - lo > 1e-9 * abs(hi) + 1e-15 and w > 0:
            run = run + costs[0] * (w / (hi - lo))
            cut = cut + costs[1] * (w / (hi - lo))
    if not run.any() and not cut.any():
        run, cut = latency
    run = np.where(np.isfinite(arrays.time), run, math.inf)
    cut = np.where(np.isfinite(arrays.cut_time), cut, math.inf)
    out = linear_dp(arrays, [(run, cut)])
    return None if out is None else out[1]


def solve_fast(table: ir.CostTable, objective: ir.Objective, deadline: float | None = None
               ) -> tuple[str, Chosen | None]:
    """``(status, chosen)``: the optimal placement and frequencies (``"optimal"``), the
    best known when ``deadline`` passed first (``"feasible"``), or None: no plan exists.
    """
    arrays = run_arrays(table)
    kind = objective.kind
    if kind == "throughput":
        try:
            found = least_bottleneck(arrays, deadline=deadline)
        except OutOfTime as late:
            return "feasible", late.best
        return "optimal", None if found is None else found[1]
    if kind == "carbon":
        status, chosen = least_carbon(table, arrays, deadline)
        # "undecided": None here, so the caller runs the integer program (exact, slow)
        return ("feasible" if status == "feasible" else "optimal"), chosen
    return "optimal", _linear(table, arrays, objective)


def _linear(table: ir.CostTable, arrays: RunArrays, objective: ir.Objective
            ) -> Chosen | None:
    kind = objective.kind
    if kind == "weighted":
        return _weighted(table, arrays, objective)
    costs: list[Costs] = [(arrays.time, arrays.cut_time)]
    if kind == "energy":
        costs.insert(0, _edge_energy(table, arrays))
    out = linear_dp(arrays, costs)
    return None if out is None else out[1]
