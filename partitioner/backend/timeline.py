"""The priced single-inference timeline of a plan (for the manifest and ``explain``).

The solver reports totals; a deployment report wants them per stage. This module walks the
plan's placement over the extended chain with the same pricing rules as
:func:`partitioner.analysis.estimate.evaluate` (canonical bundles, ODIWeP hiding, one
transfer per bundle boundary; with routes, the routed messages replace the transfers
between devices, sent when their sender's stage ends) and lays the bundles and transfers
end to end (a plan with split stages: the steps
:func:`partitioner.analysis.spatial_estimate.estimate_plan` prices, the parts of a split
stage side by side from the stage's start, each its scatter, compute and gather, the next
stage after the slowest part): segment ``start`` times are the single-inference critical
path (DISS eq. 4.1-4.3 summed), and the segments add up to the estimate's parts: ``compute``,
``weight_loading`` (after ODIWeP hiding) and ``internal`` of the compute segments plus
the transfer segments' durations are the estimate's compute, weight loading and
communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from partitioner.analysis.routing import Message, placement_of
from partitioner.errors import UserError
from partitioner.ir import CostTable, LayerGraph, Plan

__all__ = ["placement_of", "stage_figures", "timeline"]


def timeline(plan: Plan, table: CostTable, graph: LayerGraph | None = None,
             messages: Sequence[Message] | None = None) -> list[dict[str, Any]] | None:
    """Compute and transfer segments of one inference, in order; None if not priceable.

    Each segment is ``{"kind": "compute", "device", "stage", "name", "positions",
    "start", "duration", "compute", "weight_loading", "internal"}`` or ``{"kind":
    "transfer", "from", "to", "stage", "after", "start", "duration", "bytes"}`` (``stage``
    is the plan stage the segment belongs to, None for a pseudo layer; ``bytes`` is None
    when unknown). ``messages`` (the plan's routed messages) replace the chain's transfers
    between devices.
    """
    from partitioner.analysis.costs import network_transfer
    from partitioner.analysis.estimate import canonical_bundles

    placement = placement_of(plan, table)
    if placement is None:
        return None
    if graph is not None and messages is not None and any(s.parts for s in plan.stages):
        return _split_timeline(plan, table, graph, messages, placement)
    stage_of: dict[int, int] = {}
    for i, s in enumerate(plan.stages):
        for k in range(s.first, s.last + 1):
            stage_of[k] = i

    def stage(pos: int) -> int | None:
        layer = table.positions[pos].layer
        return None if layer is None else stage_of.get(layer)

    def cut_bytes(pos: int) -> int | None:
        layer = table.positions[pos].layer
        if graph is None or layer is None:
            return None
        return graph.cut_after(layer).nbytes

    try:
        bundles = canonical_bundles(table, placement)
    except UserError:
        return None
    first_layer = next((i for i, p in enumerate(table.positions) if p.kind == "layer"), 0)
    sys = table.system
    segs: list[dict[str, Any]] = []

    def send(sender: str, sid: int | None, after: int, t: float) -> float:
        for m in messages or ():
            if m.sender.split(".")[0] != sender or m.sender_device is None:
                continue
            if m.receiver_device in (None, m.sender_device):
                continue  # already on the device: no transfer
            tr = network_transfer(sys, sys.device(m.sender_device),
                                  sys.device(m.receiver_device), m.nbytes)
            if tr is None:
                raise _Unpriced
            segs.append({"kind": "transfer", "from": m.sender_device,
                         "to": m.receiver_device, "stage": sid, "after": after,
                         "start": t, "duration": tr.time, "bytes": m.nbytes,
                         "sender": m.sender, "receiver": m.receiver})
            t += tr.time
        return t

    try:
        return _walk(plan, table, bundles, stage, cut_bytes, first_layer, messages, send,
                     segs)
    except _Unpriced:
        return None


class _Unpriced(Exception):
    """A segment has no price in the table (the timeline is then None)."""


def _walk(plan: Plan, table: CostTable, bundles: Sequence[Any], stage: Any, cut_bytes: Any,
          first_layer: int, messages: Sequence[Message] | None, send: Any,
          segs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    from partitioner.analysis.estimate import routed_boundary
    from partitioner.analysis.variants import bundle_saving, quantized_layers

    quantized = quantized_layers(plan)
    t = 0.0
    if messages is not None and first_layer == 0:
        t = send("input", None, -1, t)  # no source position: the input starts at stage 0
    for idx, b in enumerate(bundles):
        freq = plan.frequencies.get(b.device, _default_freq(table, b.device))
        cost = table.bundles.get((b.first, b.last, b.device, freq))
        if cost is None:
            return None
        hidden = cost.hidden if (table.preload and b.starts_run) else 0.0
        saved, _ = bundle_saving(table, b.first, b.last, b.device, freq, quantized)  # int8
        dur = cost.time - hidden - saved
        names: Sequence[str] = [table.positions[k].name for k in (b.first, b.last)]
        segs.append({"kind": "compute", "device": b.device, "stage": stage(b.first),
                     "name": names[0] if b.first == b.last else f"{names[0]}..{names[1]}",
                     "positions": [b.first, b.last], "start": t, "duration": dur,
                     "compute": cost.compute - saved,
                     "weight_loading": cost.weight_loading - hidden,
                     "internal": cost.internal})
        t += dur
        if messages is not None:
            # the messages a stage (or the source) sends, once its last bundle is done
            sid = stage(b.last)
            if sid is not None and plan.stages[sid].last == table.positions[b.last].layer:
                t = send(str(sid), sid, b.last, t)
            elif b.last + 1 == first_layer:
                t = send("input", None, b.last, t)
        if idx + 1 < len(bundles):
            nxt = bundles[idx + 1]
            if messages is not None and routed_boundary(table, b, nxt):
                continue
            tr = table.transfers.get((b.last, b.device, nxt.device))
            if tr is None:
                return None
            segs.append({"kind": "transfer", "from": b.device, "to": nxt.device,
                         "stage": stage(b.last), "after": b.last, "start": t,
                         "duration": tr.time, "bytes": cut_bytes(b.last)})
            t += tr.time
    return segs


def _default_freq(table: CostTable, device: str) -> str | None:
    freqs = table.frequencies.get(device, (None,))
    return freqs[0] if freqs else None


def _split_timeline(plan: Plan, table: CostTable, graph: LayerGraph,
                    messages: Sequence[Message], placement: Sequence[str]
                    ) -> list[dict[str, Any]] | None:
    """The timeline of a plan with split stages: the steps of the one spatial estimate,
    laid out in time (segments of a split stage also carry ``part`` and ``critical``)."""
    from partitioner.analysis.routing import plan_frequencies
    from partitioner.analysis.spatial_estimate import estimate_plan

    steps: list[dict[str, Any]] = []
    try:
        estimate_plan(graph, table, plan, messages, placement,
                      plan_frequencies(table, plan), segments=steps)
    except UserError:
        return None
    t = 0.0
    lanes: dict[int, float] = {}  # the open split stage: part -> its clock
    open_stage: int | None = None
    for seg in steps:
        if lanes and (seg["part"] is None or seg["stage"] != open_stage):
            t, lanes = max(lanes.values()), {}  # a barrier: the slowest part
        if seg["part"] is None:
            seg["start"] = t
            t += seg["duration"]
            continue
        open_stage = seg["stage"]
        seg["start"] = lanes.get(seg["part"], t)
        lanes[seg["part"]] = seg["start"] + seg["duration"]
    return steps


def stage_figures(segments: Sequence[dict[str, Any]] | None, stage: int
                  ) -> dict[str, Any] | None:
    """A stage's share of the estimate (the manifest's per-stage ``estimate``): compute,
    weight loading after ODIWeP hiding, transfers inside the device (``internal``), the
    transfers it sends (``send``) and, in a plan with split stages, those it receives
    (``receive``, a split stage's scatter) and its ``time``. A split stage counts its
    critical part (the estimate's), plus ``parts``: per part its device, receive, compute,
    send and time. With the pseudo layers' segments the stages add up to the totals."""
    if segments is None:
        return None
    mine = [s for s in segments if s["stage"] == stage]
    split = any(s.get("part") is not None for s in mine)
    spatial = any("part" in s for s in segments)

    def sums(segs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        comp = [s for s in segs if s["kind"] == "compute"]
        sent = [s for s in segs if s["kind"] == "transfer"
                and not s.get("receive", False)]
        out = {"compute": sum(s["compute"] for s in comp),
               "weight_loading": sum(s["weight_loading"] for s in comp),
               "internal": sum(s["internal"] for s in comp),
               "send": sum(s["duration"] for s in sent)}
        if spatial:
            out["receive"] = sum(s["duration"] for s in segs if s["kind"] == "transfer"
                                 and s.get("receive", False))
            out["time"] = sum(s["duration"] for s in segs)
        return out

    doc = sums([s for s in mine if s.get("critical", True)])
    if split:
        parts = sorted({s["part"] for s in mine})
        doc["parts"] = [{"part": k, "device": next(s["device"] for s in mine
                                                   if s["part"] == k and s["kind"] == "compute"),
                         "critical": any(s["critical"] for s in mine if s["part"] == k),
                         **sums([s for s in mine if s["part"] == k])} for k in parts]
    return doc
