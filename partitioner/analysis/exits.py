"""Pricing a placement with early-exit heads: expected and worst-case latency and energy.

The derivation is in docs/EXITS.md. In short: the exit heads at chain positions
``e_1 < ... < e_m`` cut the work of one request into *segments*; segment ``s`` (after
``s`` exit decisions that all continued) runs with probability
``C_s = prod_{i <= s} (1 - p_i)`` (``C_0 = 1``). A bundle belongs to the segment of its
first position (a bundle never runs past an exit head: :func:`canonical_bundles` ends it
there), a transfer of the cut after position ``k`` to the segment after every head at or
before ``k`` (so the cut leaving a head is paid only by the requests that continue), and
a request that leaves at head ``j`` (probability ``C_{j-1} p_j``) sends the head's output
from the head's device to the destination. Then

    E[T] = sum_s C_s * (time of segment s) + sum_j C_{j-1} p_j * t_out(j)

is linear in the placement (every term is one bundle, one transfer or one head's device,
times a constant), so the solver keeps a shortest-path / linear program
(:mod:`partitioner.solver.exits`). The worst case (what ``--max-latency`` caps, and what
``estimate.latency`` reports) is the largest outcome latency: leaving at head ``j`` costs
segments ``0..j-1`` plus ``t_out(j)``; continuing everywhere costs every segment. Energy is
priced the same way (expected joules per device).

Without an application destination the result stays where it is computed (as the main
output stays on the last device), so ``t_out = 0``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from partitioner import ir
from partitioner.analysis.costs import network_transfer
from partitioner.analysis.estimate import canonical_bundles
from partitioner.errors import InfeasibleError, fail

__all__ = ["ExitPrice", "with_exits", "continuation", "bundle_segment", "cut_segment",
           "destination", "delivery", "price_items", "price_chain", "price_routed",
           "apply_price", "route_exits"]

Energy = Mapping[str, float]
Item = tuple[int, float, Energy]  # (segment, seconds, joules per device)


@dataclass(frozen=True)
class ExitPrice:
    """What a placement with exit heads costs.

    Attributes:
        expected_latency: mean latency over the exit outcomes, s.
        worst_latency: the largest outcome latency, s.
        outcomes: ``(exit output or None for the main output, probability, latency)``.
        energy: expected joules per device (devices with an energy figure).
    """

    expected_latency: float
    worst_latency: float
    outcomes: tuple[tuple[str | None, float, float], ...]
    energy: Mapping[str, float]


def with_exits(table: ir.CostTable, graph: ir.LayerGraph,
               heads: Sequence[tuple[ir.ExitHead, int]]) -> ir.CostTable:
    """``table`` with its exit heads: ``(head, layer producing its output)`` each."""
    at = {p.layer: p.index for p in table.positions if p.kind == "layer"}
    sizes = {t.name: t.nbytes for t in graph.outputs}
    exits = sorted((at[layer], head, sizes[head.output]) for head, layer in heads)
    if len({pos for pos, *_ in exits}) != len(exits):
        fail("--exit: two exit heads are produced by the same layer; a stage can end in "
             "only one of them")
    return replace(table, exits=tuple(exits))


def continuation(table: ir.CostTable) -> list[float]:
    """``C_s`` for ``s = 0..m``: the probability that segment ``s`` runs."""
    out = [1.0]
    for _, head, _ in table.exits:
        out.append(out[-1] * (1.0 - head.probability))
    return out


def bundle_segment(table: ir.CostTable, first: int) -> int:
    """The segment of a bundle that starts at position ``first``."""
    return sum(1 for pos, *_ in table.exits if pos < first)


def cut_segment(table: ir.CostTable, after: int) -> int:
    """The segment of the transfer of the cut after position ``after``."""
    return sum(1 for pos, *_ in table.exits if pos <= after)


def destination(table: ir.CostTable) -> str | None:
    """The device that needs the result (pinned destination pseudo layer), or None."""
    last = table.positions[-1] if table.positions else None
    if last is not None and last.kind == "destination":
        if last.allowed and len(last.allowed) == 1:
            return last.allowed[0]
        return table.system.application.destination
    return None


def delivery(table: ir.CostTable, j: int, device: str) -> ir.TransferCost | None:
    """Sending head ``j``'s output from ``device`` to the destination (None: no link)."""
    dest = destination(table)
    if dest is None or dest == device:
        return ir.TransferCost(time=0.0)
    sys = table.system
    return network_transfer(sys, sys.device(device), sys.device(dest), table.exits[j][2])


def _delivery_item(table: ir.CostTable, j: int, device: str) -> tuple[float, dict[str, float]]:
    tr = delivery(table, j, device)
    if tr is None:
        fail(f"exit {table.exits[j][1].output}: no link from {device!r} to the destination "
             f"{destination(table)!r}", error=InfeasibleError)
    energy: dict[str, float] = {}
    dest = destination(table)
    if tr.sender_energy is not None:
        energy[device] = tr.sender_energy
    if tr.receiver_energy is not None and dest is not None:
        energy[dest] = energy.get(dest, 0.0) + tr.receiver_energy
    return tr.time, energy


def price_items(table: ir.CostTable, items: Sequence[Item],
                deliveries: Sequence[tuple[float, Energy]]) -> ExitPrice:
    """Combine segment items and the exit deliveries into the expected and worst case."""
    cont = continuation(table)
    m = len(table.exits)
    seg_time = [0.0] * (m + 1)
    energy: dict[str, float] = {}
    for seg, t, e in items:
        seg_time[seg] += t
        for d, j in e.items():
            energy[d] = energy.get(d, 0.0) + cont[seg] * j
    expected = sum(c * t for c, t in zip(cont, seg_time, strict=True))
    outcomes: list[tuple[str | None, float, float]] = []
    prefix = 0.0
    for j, (_, head, _) in enumerate(table.exits):
        prefix += seg_time[j]
        p = cont[j] * head.probability
        t_out, e_out = deliveries[j]
        expected += p * t_out
        for d, joules in e_out.items():
            energy[d] = energy.get(d, 0.0) + p * joules
        outcomes.append((head.output, p, prefix + t_out))
    outcomes.append((None, cont[m], prefix + seg_time[m]))
    return ExitPrice(expected, max(t for _, _, t in outcomes), tuple(outcomes), energy)


def _bundle_items(table: ir.CostTable, placement: Sequence[str],
                  freqs: Mapping[str, str | None], *, routed: bool) -> list[Item]:
    """Bundles and chain transfers as items; ``routed``: leave out the transfers that
    routed messages price instead (boundaries between devices touching a model layer)."""
    from partitioner.analysis.estimate import routed_boundary

    items: list[Item] = []
    bundles = canonical_bundles(table, placement)
    for idx, b in enumerate(bundles):
        cost = table.bundles.get((b.first, b.last, b.device, freqs.get(b.device)))
        if cost is None:
            fail(f"no price for positions {b.first}..{b.last} on {b.device!r}",
                 error=InfeasibleError)
        hidden = cost.hidden if (table.preload and b.starts_run) else 0.0
        items.append((bundle_segment(table, b.first), cost.time - hidden,
                      {b.device: cost.energy} if cost.energy is not None else {}))
        if idx + 1 == len(bundles):
            continue
        nxt = bundles[idx + 1]
        if routed and routed_boundary(table, b, nxt):
            continue
        tr = table.transfers.get((b.last, b.device, nxt.device))
        if tr is None:
            fail(f"no path from {b.device!r} to {nxt.device!r} after position {b.last}",
                 error=InfeasibleError)
        e: dict[str, float] = {}
        if tr.sender_energy is not None:
            e[b.device] = tr.sender_energy
        if tr.receiver_energy is not None:
            e[nxt.device] = e.get(nxt.device, 0.0) + tr.receiver_energy
        items.append((cut_segment(table, b.last), tr.time, e))
    return items


def price_chain(table: ir.CostTable, placement: Sequence[str],
                freqs: Mapping[str, str | None]) -> ExitPrice:
    """The price of a placement on the chain model (what the solver optimises)."""
    items = _bundle_items(table, placement, freqs, routed=False)
    dels = [_delivery_item(table, j, placement[pos]) for j, (pos, *_) in
            enumerate(table.exits)]
    return price_items(table, items, dels)


def price_routed(graph: ir.LayerGraph, table: ir.CostTable, plan: ir.Plan,
                 placement: Sequence[str], freqs: Mapping[str, str | None]) -> ExitPrice:
    """The price of a routed plan: its messages instead of the chain's cuts.

    A message leaves its sender unit after that stage ran, so it belongs to the segment
    after every head at or before the stage's last layer (a head's stage sends on only
    for the requests that continue); the source's messages are in segment 0. The exit
    stage's message of the head output to the destination is the delivery.
    """
    from partitioner.analysis.routing import messages

    items = _bundle_items(table, placement, freqs, routed=True)
    at = {p.layer: p.index for p in table.positions if p.kind == "layer"}
    sys = table.system
    for msg in messages(graph, plan, plan.routes, table):
        src, dst = msg.sender_device, msg.receiver_device
        if src is None or dst is None or src == dst:
            continue
        sender = msg.sender.split(".")[0]
        seg = 0 if sender == "input" else cut_segment(table, at[plan.stages[int(sender)]
                                                                 .last])
        tr = network_transfer(sys, sys.device(src), sys.device(dst), msg.nbytes)
        if tr is None:
            fail(f"no link from {src!r} to {dst!r} for a routed tensor",
                 error=InfeasibleError)
        e: dict[str, float] = {}
        if tr.sender_energy is not None:
            e[src] = tr.sender_energy
        if tr.receiver_energy is not None:
            e[dst] = e.get(dst, 0.0) + tr.receiver_energy
        items.append((seg, tr.time, e))
    dels = [_delivery_item(table, j, placement[pos]) for j, (pos, *_) in
            enumerate(table.exits)]
    return price_items(table, items, dels)


def apply_price(estimate: ir.Estimate, price: ExitPrice) -> ir.Estimate:
    """The estimate with the worst case as ``latency``, the mean as ``expected_latency``,
    and the expected energy per device."""
    energy = {d: price.energy.get(d, 0.0) for d in estimate.energy}
    return replace(estimate, latency=price.worst_latency,
                   expected_latency=price.expected_latency, energy=energy)


def _crosses(route: ir.Route, exit_stages: Sequence[int]) -> bool:
    """Whether a direct route would reach a stage after an exit stage it does not pass."""
    start = -1 if route.source == "input" else int(route.source)
    return any(start < x < t for x in exit_stages
               for t in route.targets if isinstance(t, int))


def route_exits(graph: ir.LayerGraph, table: ir.CostTable, plan: ir.Plan) -> ir.Plan:
    """The routed plan made safe for early exits, and priced with them.

    A tensor made before an exit stage and read after it is relayed through the exit
    stage (forwarded), so a request that leaves there sends nothing to the later stages
    (they see no work for it); a head's output goes direct to the destination (that is
    where it is delivered whether the request leaves or not). Then the estimate is
    re-priced with the messages: ``latency`` the worst case, ``expected_latency`` the mean.
    """
    from partitioner.analysis.routing import placement_of, reprice

    exit_stages = [s.id for s in plan.stages if s.exit is not None]
    heads = {s.exit.output for s in plan.stages if s.exit is not None}
    n = len(plan.stages)
    routes = []
    for r in plan.routes:
        if r.tensor in heads:
            r = replace(r, transfer="direct", via=())
        elif r.transfer == "direct" and _crosses(r, exit_stages):
            start = -1 if r.source == "input" else int(r.source)
            ints = [t for t in r.targets if isinstance(t, int)]
            end = n - 1 if "output" in r.targets else max(ints)
            via = tuple(i for i in range(start + 1, end + 1) if i not in r.targets)
            r = replace(r, transfer="forwarded", via=via)
        routes.append(r)
    plan = replace(plan, routes=tuple(routes))
    placement = placement_of(plan, table)
    if placement is None:
        fail("exit heads: the plan does not cover the cost table's layers")
    freqs = {d: (f or (None,))[0] for d, f in table.frequencies.items()}
    freqs.update(plan.frequencies)
    estimate = reprice(graph, table, plan)
    price = price_routed(graph, table, plan, placement, freqs)
    return replace(plan, estimate=apply_price(estimate, price))
