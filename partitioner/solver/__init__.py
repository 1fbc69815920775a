"""Compiler stage: the planner (SPEC §3-4).

``solve(table, objective) -> ir.Plan`` places every position of a cost table on a device
(and a frequency per device), exactly: without caps and binding memories by a dynamic
program over runs (``latency``, ``energy``, ``weighted``: :mod:`.dp`) or a label search
(``throughput``: :mod:`.bottleneck`) over numpy run arrays (:mod:`.runs`; which one runs
is :mod:`.fast`), otherwise by an integer program over a state network whose paths are
exactly the canonically priced plans (:mod:`.network`, :mod:`.milp`). ``evaluate(table,
placement, frequencies)`` is that canonical pricing, independent of both.
"""

from __future__ import annotations

from partitioner.analysis.estimate import canonical_bundles, evaluate
from partitioner.solver.solve import solve

__all__ = ["solve", "evaluate", "canonical_bundles"]
