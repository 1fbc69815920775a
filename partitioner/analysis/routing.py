"""Routing, computed once after the solve: how every tensor crossing a stage boundary
travels (:func:`route_plan`), and the messages that routing implies (:func:`messages`).

From the layers' ``consumes`` / ``produces`` and the model's inputs and outputs, each
tensor has a producer (a stage, or ``"input"``) and readers (stages, and ``"output"`` for a
model output). Per tensor and per receiving device it is sent **once** (QUANT's
tensor-flow coherence): the earliest reader on a device receives it and hands it to the
later readers on that device; a reader on the producer's own device needs no transfer.

* ``direct``: straight from the producer's device to each receiving device;
* ``forwarded``: relayed hop by hop along the chain by the stages in between (schema 1).

Mode ``"auto"`` starts from the forwarded chain (exactly what the solver priced) and
sends a tensor direct whenever that does not raise the plan's communication time on the
cost table's links; it stays forwarded when there is no direct link, or the direct one is
slower than relaying. ``"direct"`` / ``"forwarded"`` force one rule for every tensor.

The solver still optimises the chain (forwarded) model: the placement is exact for
forwarded cuts, and the direct routes are priced after the solve. For the latency
objective the routed price is therefore never above the chain price the solver saw
(``auto`` only accepts a direct route that does not cost more), while a placement that
direct sends would make cheaper may be missed.

The re-pricing is :func:`partitioner.analysis.estimate.evaluate` with the routed messages
(one cost model): communication is the sum of the messages (one image in flight), each
priced with the link model of :func:`partitioner.analysis.costs.network_transfer`.

Split stages (``parts``): a tensor read by a split stage goes to each part, only the rows
that part needs (with its halo); a split stage's outputs leave as row pieces from each
part. The rows come from the caller (:data:`UnitRows`; the back end passes its part
models); without them they follow from the analytic row geometry (halo included) and its
relative-height rule for other outputs. A plan with split stages is priced by
:func:`partitioner.analysis.spatial_estimate.estimate_plan` (parts in
parallel).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from partitioner import ir
from partitioner.errors import InternalError, fail

__all__ = ["MODES", "Message", "UnitRows", "placement_of", "tensor_flow", "deliveries",
           "messages", "route_plan", "reprice", "endpoint_device"]

MODES = ("auto", "direct", "forwarded")
INPUT: Literal["input"] = "input"
OUTPUT: Literal["output"] = "output"
Rows = tuple[int, int]
Endpoint = int | Literal["input", "output"]
# (stage id, part index) -> (rows of each tensor the part receives, rows of each tensor
# it produces); a tensor missing from the maps, or None, is the whole tensor.
UnitRows = Callable[[int, int], tuple[Mapping[str, Rows | None], Mapping[str, Rows | None]]]


@dataclass(frozen=True)
class Message:
    """What one unit (``"3"``, ``"3.1"``, or ``"input"``) sends to another (or
    ``"output"``) per request: tensors, each whole (rows None) or a row range."""

    sender: str
    receiver: str
    pieces: tuple[tuple[str, Rows | None], ...]
    sender_device: str | None
    receiver_device: str | None
    nbytes: int


def _key(stage: int, part: int | None = None) -> str:
    return str(stage) if part is None else f"{stage}.{part}"


# --------------------------------------------------------------------------- placement


def placement_of(plan: ir.Plan, table: ir.CostTable) -> tuple[str, ...] | None:
    """The device of every position of ``table``: the plan's own, or derived from stages.

    A hand-made plan lists only stages; its pseudo layers sit where the application puts
    them (source/destination), the preprocess layer with the plan's ``pseudo`` entry or on
    the first stage's device. A split stage's layers are placed on its first part's
    device (the table prices whole layers only). None when the plan does not cover the
    table's layers.
    """
    if len(plan.placement) == len(table.positions):
        return tuple(plan.placement)
    app = table.system.application
    by_layer: dict[int, str] = {}
    for s in plan.stages:
        for k in range(s.first, s.last + 1):
            if s.devices:
                by_layer[k] = s.devices[0]
    first_dev = plan.stages[0].devices[0] if plan.stages and plan.stages[0].devices else None
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


def endpoint_device(plan: ir.Plan, table: ir.CostTable | None, end: Endpoint
                    ) -> str | None:
    """The device an endpoint sits on: a stage's (its first part's), the position that
    hands the model the input (source / preprocess, else stage 0's device), the
    destination (else the last stage's device)."""
    stages = plan.stages
    if isinstance(end, int):
        devs = stages[end].devices
        return devs[0] if devs else None
    first, last = stages[0].devices, stages[-1].devices
    placement = placement_of(plan, table) if table is not None else None
    if placement is not None and table is not None:
        kinds = [p.kind for p in table.positions]
        layer_at = [i for i, k in enumerate(kinds) if k == "layer"]
        if end == INPUT and layer_at and layer_at[0] > 0:
            return placement[layer_at[0] - 1]
        if end == OUTPUT and layer_at and layer_at[-1] + 1 < len(kinds):
            return placement[layer_at[-1] + 1]
    elif end == INPUT and (plan.pseudo.get("preprocess") or plan.pseudo.get("source")):
        return plan.pseudo.get("preprocess") or plan.pseudo.get("source")
    elif end == OUTPUT and plan.pseudo.get("destination"):
        return plan.pseudo.get("destination")
    devs = first if end == INPUT else last
    return devs[0] if devs else None


# --------------------------------------------------------------------------- tensor flow


def tensor_flow(graph: ir.LayerGraph, plan: ir.Plan
                ) -> tuple[dict[str, Endpoint], dict[str, list[Endpoint]]]:
    """Producer and readers (stage ids in order, then ``"output"``) of every tensor that
    crosses a stage boundary, in a deterministic order (model inputs, then production
    order)."""
    producer: dict[str, Endpoint] = {t.name: INPUT for t in graph.inputs}
    reads: list[dict[str, None]] = []
    for s in plan.stages:
        made: dict[str, None] = {}
        read: dict[str, None] = {}
        for k in range(s.first, s.last + 1):
            layer = graph.layers[k]
            read.update((n, None) for n in layer.consumes if n not in made)
            made.update((n, None) for n in layer.produces)
        for n in made:
            producer[n] = s.id
        reads.append(read)
    readers: dict[str, list[Endpoint]] = {}
    for s, read in zip(plan.stages, reads, strict=True):
        for n in read:
            src = producer.get(n)
            if src is None or (isinstance(src, int) and src >= s.id):
                fail(f"stage {s.id}: layer input {n!r} is produced by no earlier stage (is "
                     f"the plan's layer order topological?)")
            readers.setdefault(n, []).append(s.id)
    for t in graph.outputs:
        if t.name not in producer:
            fail(f"model output {t.name!r} is produced by no stage")
        readers.setdefault(t.name, []).append(OUTPUT)
    order = {n: i for i, n in enumerate(producer)}
    return producer, dict(sorted(readers.items(), key=lambda kv: order[kv[0]]))


def deliveries(route: ir.Route, plan: ir.Plan, table: ir.CostTable | None = None
               ) -> list[tuple[Endpoint, Endpoint]]:
    """The (sender, receiver) stage-level hops of a route.

    Forwarded: along the chain from the producer to its last reader (then ``"output"``).
    Direct: the producer sends to the earliest reader on each device (a split reader and
    ``"output"`` on their own), which hands it on to the later readers on that device.
    """
    src = route.source
    n = len(plan.stages)
    stage_targets = [t for t in route.targets if isinstance(t, int)]
    if route.transfer == "forwarded":
        start = -1 if src == INPUT else int(src)
        end = n - 1 if OUTPUT in route.targets else max(stage_targets)
        chain: list[Endpoint] = [src, *range(start + 1, end + 1)]
        if OUTPUT in route.targets:
            chain.append(OUTPUT)
        return list(zip(chain[:-1], chain[1:], strict=True))
    hops: list[tuple[Endpoint, Endpoint]] = []
    first_on: dict[str, int] = {}
    for t in route.targets:
        if not isinstance(t, int):
            hops.append((src, t))
            continue
        stage = plan.stages[t]
        dev = endpoint_device(plan, table, t)
        if stage.parts or dev is None:
            hops.append((src, t))
        elif dev in first_on:
            hops.append((first_on[dev], t))
        else:
            first_on[dev] = t
            hops.append((src, t))
    return hops


# --------------------------------------------------------------------------- messages


def _units(plan: ir.Plan, end: Endpoint) -> list[tuple[str, int | None, str | None]]:
    """(key, part index, device) of the units of an endpoint."""
    if not isinstance(end, int):
        return [(end, None, None)]
    s = plan.stages[end]
    if s.parts:
        return [(_key(s.id, k), k, p.device) for k, p in enumerate(s.parts)]
    return [(_key(s.id), None, s.device)]


def _default_rows(graph: ir.LayerGraph, plan: ir.Plan) -> UnitRows:
    """The rows each part receives (halo included) and holds, from the analytic row
    geometry (:func:`partitioner.analysis.spatial.unit_rows`)."""
    from partitioner.analysis.spatial import unit_rows

    return unit_rows(graph, plan)  # type: ignore[no-any-return]


def _intersect(have: Rows | None, want: Rows | None) -> tuple[bool, Rows | None]:
    """(send anything?, rows to send) for a holder of ``have`` and a receiver of ``want``."""
    if have is None:
        return True, want
    if want is None:
        return True, have
    lo, hi = max(have[0], want[0]), min(have[1], want[1])
    return lo <= hi, (lo, hi)


def _piece_bytes(t: ir.TensorInfo, rows: Rows | None) -> int:
    if rows is None or len(t.shape) < 3 or t.shape[2] == 0:
        return t.nbytes
    return t.nbytes * (rows[1] - rows[0] + 1) // t.shape[2]


def messages(graph: ir.LayerGraph, plan: ir.Plan, routes: Sequence[ir.Route],
             table: ir.CostTable | None = None, unit_rows: UnitRows | None = None
             ) -> list[Message]:
    """Every message of one request: the routes' hops expanded to units (parts get only
    the rows they need; a split producer sends each part's rows), grouped per
    (sender unit, receiver unit), in a deterministic order."""
    rows_of = unit_rows or _default_rows(graph, plan)
    from partitioner.analysis.variants import wire_bytes

    tensors = wire_bytes(graph, plan, table)  # int8 layers' outputs travel as int8 (QUANT)
    tensors.update({t.name: t for t in (*graph.inputs, *graph.outputs)})
    grouped: dict[tuple[str, str], list[tuple[str, Rows | None]]] = {}
    devices: dict[str, str | None] = {INPUT: endpoint_device(plan, table, INPUT),
                                      OUTPUT: endpoint_device(plan, table, OUTPUT)}
    for route in routes:
        for src, dst in deliveries(route, plan, table):
            senders = _units(plan, src)
            holders: list[tuple[str, Rows | None]] = []
            for key, part, dev in senders:
                devices.setdefault(key, dev)
                if part is None:
                    holders.append((key, None))
                    continue
                made = rows_of(int(src), part)[1]
                holders.append((key, made.get(route.tensor)))
            if len(holders) > 1 and any(h is None for _, h in holders):
                holders = [next(h for h in holders if h[1] is None)]  # a whole copy suffices
            for rkey, rpart, rdev in _units(plan, dst):
                devices.setdefault(rkey, rdev)
                want = None if rpart is None else rows_of(int(dst), rpart)[0].get(route.tensor)
                for skey, have in holders:
                    ok, rows = _intersect(have, want)
                    if ok:
                        grouped.setdefault((skey, rkey), []).append((route.tensor, rows))
    out = []
    for (skey, rkey), pieces in grouped.items():
        nbytes = sum(_piece_bytes(tensors[n], r) for n, r in pieces)
        out.append(Message(skey, rkey, tuple(pieces), devices.get(skey), devices.get(rkey),
                           nbytes))
    return out


# --------------------------------------------------------------------------- routing


def _link_time(table: ir.CostTable, msgs: Sequence[Message]) -> float | None:
    """Communication time of the messages between devices; None if one has no link."""
    from partitioner.analysis.costs import network_transfer

    sys = table.system
    total = 0.0
    for m in msgs:
        if m.sender_device is None or m.receiver_device is None:
            continue
        if m.sender_device == m.receiver_device:
            continue
        cost = network_transfer(sys, sys.device(m.sender_device),
                                sys.device(m.receiver_device), m.nbytes)
        if cost is None:
            return None
        total += cost.time
    return total


def route_plan(graph: ir.LayerGraph, table: ir.CostTable | None, plan: ir.Plan, *,
               mode: str = "auto", unit_rows: UnitRows | None = None) -> ir.Plan:
    """``plan`` with ``routes`` (one per tensor crossing a stage boundary) and, when a cost
    table is given, its estimate re-priced by what really crosses each link.

    Args:
        graph: the layer graph the plan places.
        table: the cost table the plan was solved with; None (a hand-made plan) routes
            every tensor direct in ``"auto"`` mode and leaves the estimate as it is.
        plan: the solved (or hand-made) plan.
        mode: ``"auto"``, ``"direct"`` or ``"forwarded"`` (see the module docstring).
        unit_rows: the rows each part of a split stage receives and holds.

    Raises:
        UserError: an unknown mode, a plan whose layer order is not topological, a direct
            route over a missing link when ``mode="direct"``.
    """
    if mode not in MODES:
        fail(f"routing mode {mode!r}: expected one of {', '.join(MODES)}")
    if not plan.stages:
        fail("plan: no stages")
    producer, readers = tensor_flow(graph, plan)
    split = {s.id for s in plan.stages if s.parts}
    routes: list[ir.Route] = []
    for name, targets in readers.items():
        src = producer[name]
        tgt = tuple(t for t in targets if t != src)
        if not tgt:
            continue
        start = -1 if src == INPUT else int(src)
        end = len(plan.stages) - 1 if OUTPUT in tgt else max(int(t) for t in tgt if t != OUTPUT)
        between = tuple(i for i in range(start + 1, end + 1) if i not in tgt)
        can_forward = src not in split and not any(i in split for i in range(start + 1, end))
        fwd = ir.Route(name, src, tgt, "forwarded", between)
        direct = ir.Route(name, src, tgt, "direct", ())
        want_fwd = mode == "forwarded" or (mode == "auto" and table is not None)
        routes.append(fwd if want_fwd and can_forward else direct)
    if table is not None and mode == "auto":
        routes = _prefer_direct(graph, plan, table, routes, unit_rows)
    if table is not None and mode == "direct" and _link_time(
            table, messages(graph, plan, routes, table, unit_rows)) is None:
        fail("routing: a direct route joins two devices that have no link (use mode auto "
             "or forwarded)")
    routed = replace(plan, routes=tuple(routes))
    if table is None:
        return routed
    return replace(routed, estimate=reprice(graph, table, routed, unit_rows))


def _prefer_direct(graph: ir.LayerGraph, plan: ir.Plan, table: ir.CostTable,
                   routes: list[ir.Route], unit_rows: UnitRows | None) -> list[ir.Route]:
    """From the forwarded chain, send each tensor direct when that costs no more."""
    def linked(r: ir.Route) -> bool:
        return _link_time(table, messages(graph, plan, [r], table, unit_rows)) is not None

    # a tensor whose chain crosses a missing link can only go direct
    routes = [r if r.transfer == "direct" or linked(r) else
              replace(r, transfer="direct", via=()) for r in routes]
    best = _link_time(table, messages(graph, plan, routes, table, unit_rows))
    for i, r in enumerate(routes):
        if r.transfer == "direct":
            continue
        trial = [*routes[:i], replace(r, transfer="direct", via=()), *routes[i + 1:]]
        cost = _link_time(table, messages(graph, plan, trial, table, unit_rows))
        if cost is not None and (best is None or cost <= best + 1e-15):
            routes, best = trial, cost
    if best is None:
        fail("routing: some tensor can be sent neither direct nor along the chain over "
             "the system's links")
    return routes


def plan_frequencies(table: ir.CostTable, plan: ir.Plan) -> dict[str, str | None]:
    """Every device's frequency in ``plan``: the table's first, the plan's, then a stage's
    or part's own choice."""
    freqs: dict[str, str | None] = {d: (f or (None,))[0] for d, f in table.frequencies.items()}
    freqs.update(plan.frequencies)
    for s in plan.stages:
        for dev in s.devices:
            chosen = s.frequency if s.parts is None else next(
                p.frequency for p in s.parts if p.device == dev)
            if chosen is not None:
                freqs[dev] = chosen
    return freqs


def reprice(graph: ir.LayerGraph, table: ir.CostTable, plan: ir.Plan,
            unit_rows: UnitRows | None = None) -> ir.Estimate:
    """The plan's estimate with its routes' messages as the communication between devices
    (:func:`partitioner.analysis.estimate.evaluate` with ``routed``)."""
    from partitioner.analysis.estimate import evaluate

    placement = placement_of(plan, table)
    if placement is None:
        raise InternalError("routing: the plan does not cover the cost table's layers")
    msgs = messages(graph, plan, plan.routes, table, unit_rows)
    routed = [(m.sender_device, m.receiver_device, m.nbytes) for m in msgs
              if m.sender_device is not None and m.receiver_device is not None]
    freqs = plan_frequencies(table, plan)
    if any(s.parts for s in plan.stages):  # (a split stage holds no int8 layer)
        from partitioner.analysis.spatial_estimate import estimate_plan

        est = estimate_plan(graph, table, plan, msgs, placement, freqs)
    else:
        est = evaluate(table, placement, freqs, routed=routed,
                       quantized=[k for s in plan.stages for k in s.quantized])
    return replace(est, noise=plan.estimate.noise,
                   expected_latency=plan.estimate.expected_latency)
