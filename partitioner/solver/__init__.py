"""Compiler stage: the planner (SPEC §3-4).

``solve(table, objective) -> ir.Plan`` places every position of a cost table on a device
(and a frequency per device) with an exact integer program over a state network whose
paths are exactly the canonically priced plans; ``evaluate(table, placement,
frequencies)`` is that canonical pricing, independent of the integer program.
"""

from __future__ import annotations

from partitioner.analysis.estimate import canonical_bundles, evaluate
from partitioner.solver.solve import solve

__all__ = ["solve", "evaluate", "canonical_bundles"]
