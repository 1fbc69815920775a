"""The priced single-inference timeline of a plan (for the manifest and ``explain``).

The solver reports totals; a deployment report wants them per stage. This module walks the
plan's placement over the extended chain with the same pricing rules as
:func:`partitioner.analysis.estimate.evaluate` (canonical bundles, ODIWeP hiding, one
transfer per bundle boundary) and lays the bundles and transfers end to end: segment
``start`` times are the single-inference critical path (DISS eq. 4.1-4.3 summed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from partitioner.errors import UserError
from partitioner.ir import CostTable, Plan

__all__ = ["placement_of", "timeline"]


def placement_of(plan: Plan, table: CostTable) -> tuple[str, ...] | None:
    """The device of every position of ``table``: the plan's own, or derived from stages.

    A hand-made plan lists only stages; its pseudo layers sit where the application puts
    them (source/destination), the preprocess layer with the plan's ``pseudo`` entry or on
    the first stage's device. None when the plan does not cover the table's layers.
    """
    if len(plan.placement) == len(table.positions):
        return tuple(plan.placement)
    app = table.system.application
    by_layer: dict[int, str] = {}
    for s in plan.stages:
        for k in range(s.first, s.last + 1):
            by_layer[k] = s.device
    first_dev = plan.stages[0].device if plan.stages else None
    out: list[str] = []
    for p in table.positions:
        if p.kind == "layer":
            dev = by_layer.get(p.layer if p.layer is not None else -1)
        else:
            dev = plan.pseudo.get(p.kind) or {
                "source": app.source, "destination": app.destination}.get(p.kind) or first_dev
        if dev is None:
            return None
        out.append(dev)
    return tuple(out)


def timeline(plan: Plan, table: CostTable) -> list[dict[str, Any]] | None:
    """Compute and transfer segments of one inference, in order; None if not priceable.

    Each segment is ``{"kind": "compute", "device", "stage", "name", "positions",
    "start", "duration"}`` or ``{"kind": "transfer", "from", "to", "stage", "after",
    "start", "duration"}`` (``stage`` is the plan stage the segment belongs to, None for a
    pseudo layer).
    """
    from partitioner.analysis.estimate import canonical_bundles

    placement = placement_of(plan, table)
    if placement is None:
        return None
    stage_of: dict[int, int] = {}
    for i, s in enumerate(plan.stages):
        for k in range(s.first, s.last + 1):
            stage_of[k] = i

    def stage(pos: int) -> int | None:
        layer = table.positions[pos].layer
        return None if layer is None else stage_of.get(layer)

    try:
        bundles = canonical_bundles(table, placement)
    except UserError:
        return None
    segs: list[dict[str, Any]] = []
    t = 0.0
    for idx, b in enumerate(bundles):
        freq = plan.frequencies.get(b.device, _default_freq(table, b.device))
        cost = table.bundles.get((b.first, b.last, b.device, freq))
        if cost is None:
            return None
        hidden = cost.hidden if (table.preload and b.starts_run) else 0.0
        dur = cost.time - hidden
        names: Sequence[str] = [table.positions[k].name for k in (b.first, b.last)]
        segs.append({"kind": "compute", "device": b.device, "stage": stage(b.first),
                     "name": names[0] if b.first == b.last else f"{names[0]}..{names[1]}",
                     "positions": [b.first, b.last], "start": t, "duration": dur})
        t += dur
        if idx + 1 < len(bundles):
            nxt = bundles[idx + 1]
            tr = table.transfers.get((b.last, b.device, nxt.device))
            if tr is None:
                return None
            segs.append({"kind": "transfer", "from": b.device, "to": nxt.device,
                         "stage": stage(b.last), "after": b.last, "start": t,
                         "duration": tr.time})
            t += tr.time
    return segs


def _default_freq(table: CostTable, device: str) -> str | None:
    freqs = table.frequencies.get(device, (None,))
    return freqs[0] if freqs else None
