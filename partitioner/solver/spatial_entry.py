"""The one entry of the pipeline into spatial planning: checks the options, then runs
the planner (:mod:`.spatial`) or a baseline (:mod:`.spatial_baselines`)."""

from __future__ import annotations

from partitioner import ir
from partitioner.errors import fail

__all__ = ["spatial_plan"]


def spatial_plan(graph: ir.LayerGraph, table: ir.CostTable, objective: ir.Objective,
                 *, max_parts: int | None = None, baseline: str | None = None,
                 spatial: bool = False) -> ir.Plan:
    """A routed plan with split stages (or the layer-wise optimum when no split helps).

    Raises:
        UserError: ``--max-parts`` below 2 or above the number of devices, an unknown
            baseline, ``--spatial`` together with a baseline, an objective the spatial
            planner does not handle.
    """
    from partitioner.solver.spatial import solve_spatial
    from partitioner.solver.spatial_baselines import BASELINES, baseline_plan

    n_dev = len(table.device_names)
    if max_parts is not None and not 2 <= max_parts <= n_dev:
        fail(f"--max-parts {max_parts}: must be between 2 and the number of devices "
             f"({n_dev})")
    if baseline is not None:
        if spatial:
            fail(f"--spatial-baseline {baseline}: a baseline plans instead of --spatial, "
                 f"give one of them")
        if baseline not in BASELINES:
            fail(f"--spatial-baseline {baseline!r}: expected one of {', '.join(BASELINES)}")
        if objective.kind != "latency":
            fail(f"--spatial-baseline {baseline}: baselines plan for latency, not "
                 f"{objective.kind!r}")
        return baseline_plan(graph, table, baseline, max_parts)
    return solve_spatial(graph, table, objective, max_parts)
