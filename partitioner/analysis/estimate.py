"""The cost model: canonical pricing of a placement, independent of the integer program.

This module is the single definition of what a plan costs (SPEC §3-4). The MIP in
:mod:`partitioner.solver.network` is built to agree with it, and the property tests check
that agreement by enumerating every placement and pricing it here.

Pricing rules:

* the chain is cut into maximal *runs* of consecutive positions on one device; a pseudo
  position is always its own bundle; a run of model-layer positions is split greedily
  into bundles of ``mbs`` layers from its start, the last one shorter (DIME: a run must
  be priced with the profile of exactly that run, never a cheaper split);
* latency = sum of bundle times, minus ``hidden`` for a bundle that starts a run when
  ``table.preload`` (ODIWeP), plus one transfer per bundle boundary (``src == dst``: an
  internal transfer between consecutive bundles of a run);
* busy time of a device = its bundles' (effective) time plus the transfers it sends;
  the bottleneck is the largest busy time (DISTREDGE throughput = 1 / bottleneck);
* carbon (CADI generalised to N devices, SPEC §4): ``I = U / bottleneck`` inferences,
  hold time ``bottleneck - busy_d`` costs ``idle_power_d`` and the footprint is
  ``sum_d C_d * I * (E_d + hold energy_d)`` over the devices that run something.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from partitioner import ir
from partitioner.errors import InfeasibleError, fail

__all__ = ["Bundle", "canonical_bundles", "evaluate", "routed_boundary", "device_busy",
           "edge_energy", "carbon_duration"]


@dataclass(frozen=True)
class Bundle:
    """One bundle of the canonical split: positions ``first..last`` on ``device``.

    ``starts_run`` is true when the previous position runs on another device (so its
    weight loading is hidden under preloading); the first position of the chain has no
    predecessor and never starts a run in that sense.
    """

    first: int
    last: int
    device: str
    starts_run: bool


def canonical_bundles(table: ir.CostTable, placement: Sequence[str]) -> list[Bundle]:
    """Split a placement into the canonical bundles (greedy ``mbs`` split of each run)."""
    positions = table.positions
    if len(placement) != len(positions):
        fail(f"placement has {len(placement)} devices for {len(positions)} positions")
    bundles: list[Bundle] = []
    k = 0
    n = len(positions)
    # an early-exit head ends its bundle: the exit decision is taken there (docs/EXITS.md)
    breaks = {pos for pos, *_ in table.exits}
    while k < n:
        dev = placement[k]
        starts = k > 0 and placement[k - 1] != dev
        if positions[k].kind != "layer":
            bundles.append(Bundle(k, k, dev, starts))
            k += 1
            continue
        last = k
        # Extend over model layers on the same device, at most mbs of them.
        while (last + 1 < n and last - k + 1 < table.mbs and placement[last + 1] == dev
               and positions[last + 1].kind == "layer" and last not in breaks):
            last += 1
        bundles.append(Bundle(k, last, dev, starts))
        k = last + 1
    return bundles


def _bundle_cost(table: ir.CostTable, b: Bundle, freq: str | None) -> ir.BundleCost:
    cost = table.bundles.get((b.first, b.last, b.device, freq))
    if cost is None:
        fail(f"no price for positions {b.first}..{b.last} on {b.device!r} at frequency "
             f"{freq!r}", error=InfeasibleError)
    return cost


def _transfer(table: ir.CostTable, after: int, src: str, dst: str) -> ir.TransferCost:
    cost = table.transfers.get((after, src, dst))
    if cost is None:
        fail(f"no path from {src!r} to {dst!r} for the cut after position {after} "
             f"({table.positions[after].name})", error=InfeasibleError)
    return cost


def routed_boundary(table: ir.CostTable, b: Bundle, nxt: Bundle) -> bool:
    """A boundary between devices that the routed messages price instead of the chain."""
    kinds = (table.positions[b.last].kind, table.positions[nxt.first].kind)
    return b.device != nxt.device and "layer" in kinds


def _routed_transfer(table: ir.CostTable, src: str, dst: str, nbytes: int
                     ) -> ir.TransferCost:
    from partitioner.analysis.costs import network_transfer

    sys = table.system
    cost = network_transfer(sys, sys.device(src), sys.device(dst), nbytes)
    if cost is None:
        fail(f"no link from {src!r} to {dst!r} for a routed tensor", error=InfeasibleError)
    return cost


def carbon_duration(table: ir.CostTable, objective: ir.Objective | None) -> float | None:
    """The service duration U of the carbon model (objective first, then application)."""
    if objective is not None and objective.duration is not None:
        return objective.duration
    return table.system.application.duration


def device_busy(table: ir.CostTable, placement: Sequence[str],
                frequencies: Mapping[str, str | None]) -> dict[str, float]:
    """Busy time per used device: its bundles' effective time plus the transfers it sends."""
    busy: dict[str, float] = {d: 0.0 for d in placement}
    bundles = canonical_bundles(table, placement)
    for idx, b in enumerate(bundles):
        cost = _bundle_cost(table, b, frequencies.get(b.device))
        hidden = cost.hidden if (table.preload and b.starts_run) else 0.0
        busy[b.device] += cost.time - hidden
        if idx + 1 < len(bundles):
            nxt = bundles[idx + 1]
            busy[b.device] += _transfer(table, b.last, b.device, nxt.device).time
    return busy


def edge_energy(table: ir.CostTable, energy: Mapping[str, float]) -> float:
    """Total energy of the devices whose class is ``edge`` (the FreDDI energy objective)."""
    return sum(energy.get(d.name, 0.0) for d in table.system.devices
               if d.device_class == "edge")


def evaluate(table: ir.CostTable, placement: Sequence[str],
             frequencies: Mapping[str, str | None], *,
             duration: float | None = None,
             routed: Sequence[tuple[str, str, int]] | None = None) -> ir.Estimate:
    """Price a placement canonically.

    Args:
        table: the priced extended chain.
        placement: device of every position of ``table.positions``.
        frequencies: frequency of every used device (missing: ``None``).
        duration: service duration U for the carbon figure; defaults to the
            application's ``duration``. Without one, ``carbon`` is None.
        routed: the messages of a routed plan (:mod:`partitioner.analysis.routing`), each
            ``(sender device, receiver device, bytes)``. When given, they replace the
            chain's transfers between devices at every boundary that touches a model
            layer (one image in flight: their times add up; each is priced with
            :func:`partitioner.analysis.costs.network_transfer` and its energy charged to
            both ends); transfers inside a device and between pseudo layers stay the
            table's.

    Returns:
        The estimate: latency and its breakdown, bottleneck, energy per used device that
        has an energy figure (a device without one is left out rather than shown as 0 J),
        carbon and number of inferences over the duration (when known).

    Raises:
        InfeasibleError: a bundle has no price or two consecutive devices are not
            connected.
    """
    bundles = canonical_bundles(table, placement)
    compute = weight = comm = 0.0
    energy: dict[str, float] = {d: 0.0 for d in placement}
    known: set[str] = set()  # devices with at least one energy figure (else not reported)
    busy: dict[str, float] = {d: 0.0 for d in placement}
    for idx, b in enumerate(bundles):
        cost = _bundle_cost(table, b, frequencies.get(b.device))
        hidden = cost.hidden if (table.preload and b.starts_run) else 0.0
        compute += cost.compute
        weight += cost.weight_loading - hidden
        comm += cost.internal
        energy[b.device] += cost.energy or 0.0
        if cost.energy is not None:
            known.add(b.device)
        busy[b.device] += cost.time - hidden
        if idx + 1 < len(bundles):
            nxt = bundles[idx + 1]
            if routed is not None and routed_boundary(table, b, nxt):
                continue
            tr = _transfer(table, b.last, b.device, nxt.device)
            comm += tr.time
            busy[b.device] += tr.time
            energy[b.device] += tr.sender_energy or 0.0
            energy[nxt.device] += tr.receiver_energy or 0.0
            if tr.sender_energy is not None:
                known.add(b.device)
            if tr.receiver_energy is not None:
                known.add(nxt.device)
    for src, dst, nbytes in routed or ():
        if src == dst:
            continue  # a tensor already on the device: no transfer (tensor-flow coherence)
        tr = _routed_transfer(table, src, dst, nbytes)
        comm += tr.time
        busy[src] = busy.get(src, 0.0) + tr.time
        for end, e in ((src, tr.sender_energy), (dst, tr.receiver_energy)):
            if e is not None:
                energy[end] = energy.get(end, 0.0) + e
                known.add(end)
    latency = compute + weight + comm
    bottleneck = max(busy.values()) if busy else 0.0
    u = duration if duration is not None else table.system.application.duration
    carbon = inferences = None
    if u is not None:
        inferences = u / bottleneck if bottleneck > 0 else float("inf")
        carbon = 0.0
        for name, e in energy.items():
            dev = table.system.device(name)
            hold = (bottleneck - busy.get(name, 0.0)) * (dev.idle_power or 0.0)
            carbon += (dev.carbon_intensity or 0.0) * inferences * (e + hold)
    return ir.Estimate(latency=latency, compute=compute, communication=comm,
                       weight_loading=weight, bottleneck=bottleneck,
                       energy={d: e for d, e in energy.items() if d in known},
                       carbon=carbon, inferences=inferences)
