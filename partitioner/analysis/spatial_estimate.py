"""The estimate of a plan with split stages (the timing model of
:mod:`partitioner.analysis.spatial`): parts in parallel, a barrier after each split stage,
layer-wise stages priced exactly as :func:`partitioner.analysis.estimate.evaluate` prices
them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from partitioner import ir
from partitioner.analysis.costs import network_transfer
from partitioner.analysis.spatial import Volume, part_costs, volume
from partitioner.errors import InfeasibleError, fail

__all__ = ["estimate_plan"]


def _flat_volume(graph: ir.LayerGraph, stage: ir.Stage, why: str) -> Volume:
    """A stand-in for a split stage without row geometry (a hand-built graph): every
    layer's share is the part's share of the rows, no halo (an estimate, not a bound)."""
    if not stage.parts:
        fail(f"stage {stage.id}: {why}")
    h = stage.parts[-1].rows[1] + 1
    rows = np.arange(h)
    ops = ((rows, rows, h),)
    return Volume(stage.first, stage.last, "", h, tuple(ops for _ in range(
        stage.first, stage.last + 1)), (), ())



class _Recorder:
    """Collects the steps :func:`estimate_plan` prices, in walk order (a no-op without a
    list): pseudo steps before the first layer, the stages (a split stage's parts each
    scatter, compute, gather), messages into ``"output"``, pseudo steps after the last."""

    def __init__(self, out: list[dict[str, Any]] | None) -> None:
        self.out = out
        self.received: dict[str, list[dict[str, Any]]] = {}
        self.sent: dict[str, list[dict[str, Any]]] = {}
        self.before: list[dict[str, Any]] = []
        self.after: list[dict[str, Any]] = []
        self.stages: list[dict[str, Any]] = []
        self.parts: list[dict[str, Any]] = []
        self.critical = 0

    @staticmethod
    def transfer(src: str, dst: str, time: float, nbytes: int | None, sender: str | None,
                 receiver: str | None, after: int | None = None) -> dict[str, Any]:
        return {"kind": "transfer", "from": src, "to": dst, "stage": None, "part": None,
                "critical": True, "after": after, "duration": time, "bytes": nbytes,
                "sender": sender, "receiver": receiver}

    @staticmethod
    def compute(table: ir.CostTable, span: tuple[int, int], dev: str, stage: int | None,
                c: ir.BundleCost, hidden: float = 0.0) -> dict[str, Any]:
        names = [table.positions[k].name for k in span]
        return {"kind": "compute", "device": dev, "stage": stage, "part": None,
                "critical": True, "name": names[0] if span[0] == span[1]
                else f"{names[0]}..{names[1]}", "positions": list(span),
                "duration": c.time - hidden, "compute": c.compute,
                "weight_loading": c.weight_loading - hidden, "internal": c.internal}

    def pseudo(self, before: bool, seg: dict[str, Any]) -> None:
        (self.before if before else self.after).append(seg)

    def stage(self, sid: int, seg: dict[str, Any]) -> None:
        self.stages.append({**seg, "stage": sid})

    def internal(self, sid: int, dev: str, tr: ir.TransferCost | None, after: int) -> None:
        if tr is not None:
            self.stage(sid, self.transfer(dev, dev, tr.time, None, None, None, after=after))

    def receive(self, sid: int, key: str) -> None:
        for hop in self.received.get(key, ()):
            self.stage(sid, {**hop, "receive": True})

    def part(self, sid: int, k: int, key: str, dev: str, span: tuple[int, int],
             time: float) -> None:
        """One part: its incoming messages, its compute, its messages to layer-wise
        receivers (DISTREDGE's scatter, compute, gather)."""
        compute = {"kind": "compute", "device": dev, "stage": sid, "name": f"part {key}",
                   "positions": list(span), "duration": time, "compute": time,
                   "weight_loading": 0.0, "internal": 0.0}
        received = [{**hop, "receive": True} for hop in self.received.get(key, ())]
        for seg in (*received, compute, *self.sent.get(key, ())):
            self.parts.append({**seg, "stage": sid, "part": k})

    def close_split(self, sid: int) -> None:
        self.stages += [{**seg, "critical": seg["part"] == self.critical}
                        for seg in self.parts]
        self.parts, self.critical = [], 0

    def finish(self) -> None:
        if self.out is None:
            return
        tail = [{**hop, "stage": None if hop["sender"] == "input"
                 else int(str(hop["sender"]).split(".")[0])}
                for hop in self.sent.get("output", ())]
        self.out += [*self.before, *self.stages, *tail, *self.after]


def _bundle(table: ir.CostTable, pos: int, last: int, dev: str, freq: str | None
            ) -> ir.BundleCost:
    cost = table.bundles.get((pos, last, dev, freq))
    if cost is None:
        fail(f"no price for positions {pos}..{last} on {dev!r} at frequency {freq!r}",
             error=InfeasibleError)
    return cost


def estimate_plan(graph: ir.LayerGraph, table: ir.CostTable, plan: ir.Plan,
                  msgs: Sequence[object], placement: Sequence[str],
                  freqs: Mapping[str, str | None],
                  segments: list[dict[str, Any]] | None = None) -> ir.Estimate:
    """The estimate of a plan with split stages (the timing model of the module
    docstring), from routing's messages (:func:`partitioner.analysis.routing.messages`).

    ``placement`` gives the pseudo positions' devices (the split stages' entries are not
    read). Latency = pseudo bundles and their transfers + per stage its time + messages
    into ``"output"`` from layer-wise stages.

    ``segments``, when given, receives every priced step of this same walk (the timeline
    of :mod:`partitioner.backend.timeline`): ``{"kind": "compute"|"transfer", "stage",
    "part", "critical", "duration", ...}`` in the order of the walk, without start times;
    a split stage's parts carry ``part`` (their index) and ``critical`` (the part whose
    scatter + compute + gather is the stage's time), everything else ``critical`` True.
    """
    rec = _Recorder(segments)
    system = table.system
    split = {s.id: s for s in plan.stages if s.parts}
    t_in: dict[str, float] = {}
    t_out: dict[str, float] = {}
    busy: dict[str, float] = {}
    energy: dict[str, float] = {}
    known: set[str] = set()
    comm = 0.0
    unit_is_part = {f"{i}.{k}" for i, s in split.items() for k in range(len(s.parts or ()))}
    to_output = 0.0
    for m in msgs:
        src, dst = m.sender_device, m.receiver_device  # type: ignore[attr-defined]
        if src is None or dst is None or src == dst:
            continue
        cost = network_transfer(system, system.device(src), system.device(dst),
                                m.nbytes)  # type: ignore[attr-defined]
        if cost is None:
            fail(f"no link from {src!r} to {dst!r} for a routed tensor",
                 error=InfeasibleError)
        busy[src] = busy.get(src, 0.0) + cost.time
        for end, e in ((src, cost.sender_energy), (dst, cost.receiver_energy)):
            if e is not None:
                energy[end] = energy.get(end, 0.0) + e
                known.add(end)
        sender, receiver = m.sender, m.receiver  # type: ignore[attr-defined]
        hop = rec.transfer(src, dst, cost.time, m.nbytes, sender, receiver)  # type: ignore[attr-defined]
        if sender in unit_is_part and receiver not in unit_is_part:
            t_out[sender] = t_out.get(sender, 0.0) + cost.time
            rec.sent.setdefault(sender, []).append(hop)
        elif receiver == "output":
            to_output += cost.time
            comm += cost.time
            rec.sent.setdefault("output", []).append(hop)
        else:
            t_in[receiver] = t_in.get(receiver, 0.0) + cost.time
            rec.received.setdefault(receiver, []).append(hop)
    latency = compute = weight = 0.0
    # pseudo positions and the transfers between them (not routed)
    positions = table.positions
    layer_pos = [p.index for p in positions if p.kind == "layer"]
    pseudo_runs = [k for k in range(len(positions)) if positions[k].kind != "layer"]
    for k in pseudo_runs:
        c = _bundle(table, k, k, placement[k], freqs.get(placement[k]))
        rec.pseudo(k < layer_pos[0], rec.compute(table, (k, k), placement[k], None, c))
        latency += c.time
        compute += c.compute
        weight += c.weight_loading
        comm += c.internal
        busy[placement[k]] = busy.get(placement[k], 0.0) + c.time
        if c.energy is not None:
            energy[placement[k]] = energy.get(placement[k], 0.0) + c.energy
            known.add(placement[k])
        nxt = k + 1
        if nxt < len(positions) and positions[nxt].kind != "layer" \
                and placement[nxt] != placement[k]:
            tr = table.transfers.get((k, placement[k], placement[nxt]))
            if tr is None:
                fail(f"no path from {placement[k]!r} to {placement[nxt]!r}",
                     error=InfeasibleError)
            rec.pseudo(k < layer_pos[0], rec.transfer(placement[k], placement[nxt], tr.time,
                                                      None, None, None, after=k))
            latency += tr.time
            comm += tr.time
    first_layer = layer_pos[0]
    prev_dev = placement[first_layer - 1] if first_layer > 0 else None
    prev_split = False
    for s in plan.stages:
        if s.parts:
            vol = volume(graph, s.first, s.last)
            if isinstance(vol, str):
                vol = _flat_volume(graph, s, vol)
            share = vol.layer_share
            worst, worst_compute, worst_comm = 0.0, 0.0, 0.0
            for k, p in enumerate(s.parts):
                pc = part_costs(table, vol, p.device, p.frequency or freqs.get(p.device), share)
                if pc is None:
                    fail(f"stage {s.id} part {k}: no price on {p.device!r}",
                         error=InfeasibleError)
                a, b = p.rows
                part_time = float(pc.compute[a, b])
                key = f"{s.id}.{k}"
                busy[p.device] = busy.get(p.device, 0.0) + part_time
                if pc.energy is not None:
                    energy[p.device] = energy.get(p.device, 0.0) + float(pc.energy[a, b])
                    known.add(p.device)
                moved = t_in.get(key, 0.0) + t_out.get(key, 0.0)
                rec.part(s.id, k, key, p.device, (layer_pos[s.first], layer_pos[s.last]),
                         part_time)
                if moved + part_time >= worst:
                    worst, worst_compute, worst_comm = moved + part_time, part_time, moved
                    rec.critical = k
            # the critical part's compute and transfers (the parts overlap in time)
            rec.close_split(s.id)
            latency += worst
            compute += worst_compute
            comm += worst_comm
            prev_split = True
            continue
        dev = s.device
        assert dev is not None
        freq = s.frequency if s.frequency is not None else freqs.get(dev)
        lo = layer_pos[s.first]
        hi = layer_pos[s.last]
        starts = lo > 0 and (prev_split or prev_dev != dev)
        if lo > 0 and not prev_split and prev_dev == dev and positions[lo - 1].kind != "layer":
            # a pseudo layer on the same device hands over in memory (as evaluate prices it)
            tr = table.transfers.get((lo - 1, dev, dev))
            rec.internal(s.id, dev, tr, lo - 1)
            latency += tr.time if tr is not None else 0.0
            comm += tr.time if tr is not None else 0.0
        # the canonical split of a run: chunks of mbs layers from its start
        bundles = [(b, min(b + table.mbs - 1, hi)) for b in range(lo, hi + 1, table.mbs)]
        latency += t_in.get(str(s.id), 0.0)
        comm += t_in.get(str(s.id), 0.0)
        rec.receive(s.id, str(s.id))
        for idx, (b_first, b_last) in enumerate(bundles):
            c = _bundle(table, b_first, b_last, dev, freq)
            hidden = c.hidden if (table.preload and idx == 0 and starts) else 0.0
            rec.stage(s.id, rec.compute(table, (b_first, b_last), dev, s.id, c, hidden))
            latency += c.time - hidden
            compute += c.compute
            weight += c.weight_loading - hidden
            comm += c.internal
            busy[dev] = busy.get(dev, 0.0) + c.time - hidden
            if c.energy is not None:
                energy[dev] = energy.get(dev, 0.0) + c.energy
                known.add(dev)
            if idx + 1 < len(bundles):
                tr = table.transfers.get((b_last, dev, dev))
                rec.internal(s.id, dev, tr, b_last)
                if tr is not None:
                    latency += tr.time
                    comm += tr.time
                    busy[dev] += tr.time
        nxt_pos = hi + 1
        if nxt_pos < len(positions) and positions[nxt_pos].kind != "layer" \
                and placement[nxt_pos] == dev:
            tr = table.transfers.get((hi, dev, dev))
            rec.internal(s.id, dev, tr, hi)
            latency += tr.time if tr is not None else 0.0
            comm += tr.time if tr is not None else 0.0
        prev_dev, prev_split = dev, False
    rec.finish()
    latency += to_output
    bottleneck = max(busy.values()) if busy else 0.0
    return ir.Estimate(latency=latency, compute=compute, communication=comm,
                       weight_loading=weight, bottleneck=bottleneck,
                       energy={d: e for d, e in energy.items() if d in known})
