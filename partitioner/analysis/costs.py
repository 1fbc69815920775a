"""Price every bundle and every transfer of the extended chain: :func:`build_cost_table`.

The extended chain (SPEC §2) is: a *source* pseudo layer pinned to
``application.source`` (when set; output = ``raw_input_bytes`` or the model input size), a
*preprocess* pseudo layer (when ``preprocess_flops`` is set; not pinned; output = the model
input size), the model layers, and a *destination* pseudo layer pinned to
``application.destination`` (when set; its input is the model output).

Bundles (SPEC §3) are every pseudo position alone and every run of at most ``mbs`` model
layers, on every device allowed to run all of them, at every frequency of the device.

* Analytic device (DISS eq. 4.1-4.3): ``compute = sum FLOP / FLOPS_{d,f}``,
  ``weight_loading = sum w * alpha / BW_dd`` (``Layer.weight_bytes`` carries the real
  dtypes), ``internal`` = the cuts inside the bundle over ``BW_dd``, ``hidden`` = the
  weight loading of the first layer when preloading (ODIWeP), energy
  ``P_{d,f} * (compute + weight_loading + internal)`` when the device has a power figure
  (the device draws power while it loads weights and moves its internal cuts too, even
  when preloading hides the loading time from the latency).
* Profiled device (DISS §4.4, DIME): ``compute`` = the measured bundle latency, which
  already contains weight loading and the internal cuts, so the other terms are 0; energy
  is the measured energy, else ``P_{d,f} * latency`` when the device has a power figure.
  Every needed bundle must be measured, except in a *lazy* profile whose unmeasured
  bundles are estimated as the sum of their measured single layers plus their internal
  cuts over ``BW_dd`` (see :mod:`partitioner.analysis.lazy`).

Transfers after position ``k``: on one device ``bytes / BW_dd``; between linked devices
``bytes / min(NIC_d, NIC_d', link) + latency``, with sender/receiver energy from the
link's network model (SPEC §4). Unlinked pairs have no entry (not connected).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from partitioner.analysis.energy import compute_flops, compute_power, transfer_energy
from partitioner.analysis.profiles import Profile, ProfiledBundle, check_profile
from partitioner.errors import fail
from partitioner.ir import (
    BundleCost,
    CostTable,
    Device,
    LayerGraph,
    Position,
    System,
    TransferCost,
)

__all__ = ["build_cost_table", "build_positions", "covered_mbs", "estimate_bundle",
           "network_transfer"]

_PSEUDO_BYTES_DESTINATION = 4  # SPEC §2: the destination's output is one element


def build_positions(graph: LayerGraph, system: System, private: int = 0
                    ) -> tuple[tuple[Position, ...], tuple[int, ...], tuple[float, ...]]:
    """The extended chain, the bytes leaving each position and each position's FLOPs.

    Args:
        graph: the model.
        system: the devices and the application (source, preprocess, destination).
        private: model layers ``0..private-1`` may run only on trusted devices.

    Returns:
        ``(positions, output_bytes, flops)`` aligned with each other.

    Raises:
        UserError: ``private`` out of range, or private layers but no trusted device.
    """
    app = system.application
    n_layers = len(graph.layers)
    if not 0 <= private <= n_layers:
        fail(f"--private {private}: must be between 0 and the number of layers "
             f"({n_layers}) of {graph.name}")
    trusted = tuple(d.name for d in system.devices if d.trusted)
    if private and not trusted:
        where = system.path or "the system file"
        fail(f"--private {private}: {where} has no device with trusted = true")
    positions: list[Position] = []
    out_bytes: list[int] = []
    flops: list[float] = []

    def add(name: str, kind: str, layer: int | None, weight: int,
            allowed: tuple[str, ...] | None, nbytes: int, flop: float,
            weights: tuple[str, ...] = ()) -> None:
        positions.append(Position(index=len(positions), name=name, kind=kind,  # type: ignore[arg-type]
                                  layer=layer, weight_bytes=weight, allowed=allowed,
                                  weights=weights))
        out_bytes.append(int(nbytes))
        flops.append(float(flop))

    if app.source is not None:
        add("<source>", "source", None, 0, (app.source,),
            app.raw_input_bytes or graph.input_bytes, 0.0)
    if app.preprocess_flops is not None:
        add("<preprocess>", "preprocess", None, 0, None, graph.input_bytes,
            app.preprocess_flops)
    for layer in graph.layers:
        add(layer.name, "layer", layer.index, layer.weight_bytes,
            trusted if layer.index < private else None, graph.cut_after(layer.index).nbytes,
            layer.flops, layer.weights)
    if app.destination is not None:
        add("<destination>", "destination", None, 0, (app.destination,),
            _PSEUDO_BYTES_DESTINATION, 0.0)
    return tuple(positions), tuple(out_bytes), tuple(flops)


def _analytic(device: Device, freq: str | None, flops: float, weights: float,
              first_weight: float, internal_bytes: float, preload: bool) -> BundleCost:
    speed = compute_flops(device, freq)
    bw = device.memory_bandwidth
    compute = flops / speed
    power = compute_power(device, freq)
    loading, internal = weights / bw, internal_bytes / bw
    return BundleCost(
        compute=compute,
        weight_loading=loading,
        internal=internal,
        # ODIWeP: the first layer's weights load while the previous device computes.
        hidden=first_weight / bw if preload else 0.0,
        # Energy is spent for the whole bundle time (DISS eq. 4.3 prices only compute,
        # which left out 17 % on AlexNet); a hidden load still draws power.
        energy=None if power is None else power * (compute + loading + internal))


def estimate_bundle(singles: Sequence[ProfiledBundle], internal_seconds: float
                    ) -> tuple[float, float | None]:
    """Lazy estimate of an unmeasured bundle: sum of singles plus internal cut transfers.

    Returns:
        ``(latency, energy)``; energy is None unless every single has one.
    """
    latency = sum(b.latency for b in singles) + internal_seconds
    energies = [b.energy for b in singles]
    energy = None if any(e is None for e in energies) else sum(e for e in energies if e)
    return latency, energy


_Measured = dict[tuple[int, int, str | None], tuple[ProfiledBundle, Profile]]


def _profile_index(profiles: Iterable[Profile], graph: LayerGraph, system: System
                   ) -> dict[str, _Measured]:
    index: dict[str, _Measured] = {}
    names = {d.name for d in system.devices}
    for prof in profiles:
        check_profile(prof, graph)
        file = prof.path or f"profile of {prof.device}"
        if prof.device not in names:
            fail(f"{file}: device {prof.device!r} is not in {system.path or 'the system'}")
        per = index.setdefault(prof.device, {})
        for b in prof.bundles:
            key = (b.first, b.last, b.frequency)
            if key in per:
                other = per[key][1].path or "another profile"
                fail(f"{file}: bundle {b.first}..{b.last} of device {prof.device!r} at "
                     f"frequency {b.frequency} is also in {other}")
            per[key] = (b, prof)
    return index


def _frequencies(device: Device, measured: set[str | None] | None) -> tuple[str | None, ...]:
    if device.frequencies:
        return device.frequencies
    if measured:
        # A profiled device without frequencies in the system file runs at the
        # frequencies its profiles were measured at.
        return tuple(sorted(measured, key=lambda f: (f is not None, f or "")))
    return (None,)


def _files(measured: _Measured) -> str:
    return ", ".join(dict.fromkeys(p.path or f"profile of {p.device}"
                                   for _, p in measured.values()))


def _check_frequencies(device: Device, measured: _Measured, system: System) -> None:
    """Profiles of a device with DVFS must carry exactly its frequency labels."""
    if not device.frequencies:
        return
    where = system.path or "the system file"
    have = {k[2] for k in measured}
    # (the entries are walked for the message only when a label is unknown)
    for (_, _, freq), (_, prof) in (measured.items() if have - set(device.frequencies)
                                    else ()):
        if freq not in device.frequencies:
            fail(f"{prof.path or f'profile of {device.name}'}: device {device.name!r}: "
                 f"frequency {freq!r} is not one of its frequencies in {where} "
                 f"({', '.join(device.frequencies)})")
    for freq in device.frequencies:
        if freq not in have:
            fail(f"{_files(measured)}: device {device.name!r} has no measurements at "
                 f"frequency {freq!r} (listed in {where}); profile it with "
                 f"--frequency {freq} or remove the frequency")


def covered_mbs(spans: Iterable[tuple[int, int]], n_layers: int) -> int:
    """The largest MBS whose every bundle is among ``spans`` (``(first, last)`` pairs)."""
    have = set(spans)
    mbs = n_layers
    for i in range(n_layers):
        c = 0
        while c < mbs and i + c < n_layers and (i, i + c) in have:
            c += 1
        if c < min(mbs, n_layers - i):
            mbs = c
    return mbs


def _default_mbs(index: dict[str, _Measured], lazy: set[str], n_layers: int) -> int:
    """The largest MBS that the (full, not lazy) profiles of every device and frequency
    cover, so that profiles measured with ``--mbs 4`` plan without repeating it."""
    mbs = n_layers
    for dev, measured in index.items():
        if dev in lazy:
            continue  # unmeasured bundles are estimated from the single layers
        per_freq: dict[str | None, list[tuple[int, int]]] = {}
        for first, last, freq in measured:
            per_freq.setdefault(freq, []).append((first, last))
        for spans in per_freq.values():
            mbs = min(mbs, covered_mbs(spans, n_layers))
    return max(mbs, 1)  # a missing single layer is reported by name when it is priced


def build_cost_table(graph: LayerGraph, system: System, *, profiles: Sequence[Profile] = (),
                     mbs: int | None = None, preload: bool = True, private: int = 0
                     ) -> CostTable:
    """Price every bundle and transfer of the extended chain (see the module docstring).

    Args:
        graph: the model.
        system: devices, links and application.
        profiles: measured profiles; a device with at least one is priced from them.
        mbs: maximum bundle size in model layers (default: the largest that every
            profile covers, all layers without profiles; clamped to L).
        preload: model weight preloading (ODIWeP) in ``BundleCost.hidden``.
        private: model layers ``0..private-1`` only on trusted devices.

    Returns:
        The :class:`ir.CostTable` the solver consumes.

    Raises:
        UserError: a profile of another model or an unknown device, a profiled device
            missing a bundle (naming device, frequency and bundle), bad ``mbs``/``private``.
    """
    n_layers = len(graph.layers)
    if n_layers == 0:
        fail(f"{graph.name}: the model has no layers to place")
    if mbs is not None and mbs < 1:
        fail(f"--mbs {mbs}: the maximum bundle size must be at least 1")
    positions, out_bytes, flops = build_positions(graph, system, private)
    index = _profile_index(profiles, graph, system)
    lazy = {p.device for p in profiles if p.lazy}
    for dev in system.devices:
        if dev.name in index:
            _check_frequencies(dev, index[dev.name], system)
    mbs = _default_mbs(index, lazy, n_layers) if mbs is None else min(mbs, n_layers)
    freqs = {d.name: _frequencies(d, {k[2] for k in index.get(d.name, {})})
             for d in system.devices}
    bundles: dict[tuple[int, int, str, str | None], BundleCost] = {}
    n = len(positions)
    for dev in system.devices:
        measured = index.get(dev.name)
        for freq in freqs[dev.name]:
            power = compute_power(dev, freq)
            for i in range(n):
                pos_i = positions[i]
                last_j = i if pos_i.kind != "layer" else min(n - 1, i + mbs - 1)
                total_flops = total_weights = internal = 0.0
                for j in range(i, last_j + 1):
                    pos_j = positions[j]
                    # Runs grow one position at a time: stop at the first position that is
                    # a pseudo layer or may not run on this device (pins, --private).
                    if (j > i and pos_j.kind != "layer") or (
                            pos_j.allowed is not None and dev.name not in pos_j.allowed):
                        break
                    if j > i:
                        internal += out_bytes[j - 1]
                    total_flops += flops[j]
                    total_weights += pos_j.weight_bytes
                    if measured is None or pos_i.kind != "layer":
                        # Pseudo layers are never profiled: their analytic price is exact
                        # for the 0-FLOP source/destination and an estimate for preprocess.
                        cost = _analytic(dev, freq, total_flops, total_weights,
                                         pos_i.weight_bytes, internal,
                                         preload and pos_i.kind == "layer")
                    else:
                        cost = _profiled(dev, freq, graph, pos_i, pos_j, measured, internal,
                                         dev.name in lazy, power)
                    bundles[(i, j, dev.name, freq)] = cost
    transfers = _transfers(system, out_bytes)
    return CostTable(
        graph_name=graph.name, graph_sha256=graph.sha256, positions=positions,
        system=system, frequencies=freqs, bundles=bundles, transfers=transfers, mbs=mbs,
        preload=preload,
        sources={d.name: "profile" if d.name in index else "analytic" for d in system.devices},
        weight_sizes=dict(graph.initializer_bytes))


def _profiled(dev: Device, freq: str | None, graph: LayerGraph, pos_i: Position,
              pos_j: Position, measured: _Measured, internal_bytes: float, lazy: bool,
              power: float | None) -> BundleCost:
    first, last = pos_i.layer, pos_j.layer
    assert first is not None and last is not None
    hit = measured.get((first, last, freq))
    if hit is not None:
        latency, energy = hit[0].latency, hit[0].energy
    else:
        singles = [measured.get((k, k, freq)) for k in range(first, last + 1)]
        if not lazy or any(s is None for s in singles):
            missing = f"layers {first}..{last}" if first != last else f"layer {first}"
            fail(f"{_files(measured)}: device {dev.name!r} at frequency {freq}: the "
                 f"profiles lack bundle {missing} ({graph.layers[first].name}.."
                 f"{graph.layers[last].name}); profile with a --mbs at least "
                 f"{last - first + 1} or lower --mbs")
        latency, energy = estimate_bundle([s[0] for s in singles if s is not None],
                                          internal_bytes / dev.memory_bandwidth)
    if energy is None and power is not None:
        energy = power * latency
    # A measured latency already contains weight loading and internal cuts (DISS §4.4).
    return BundleCost(compute=latency, energy=energy)


def network_transfer(system: System, src: Device, dst: Device, nbytes: float
                     ) -> TransferCost | None:
    """``nbytes`` from ``src`` to another device ``dst``; None when they are not linked.

    SPEC §1: ``BW_dd' = min(NIC_d, NIC_d', link_dd')``, time ``bytes / BW + latency``,
    sender/receiver energy from the link's network model. The one rule for every
    transfer between devices: the cuts of the chain here, routed tensors in
    :mod:`partitioner.analysis.routing`.
    """
    link = system.link(src.name, dst.name)
    if link is None:
        return None
    bw = min(src.network_bandwidth, dst.network_bandwidth, link.bandwidth)
    t = nbytes / bw + link.latency
    send, recv = transfer_energy(link, t)
    return TransferCost(time=t, sender_energy=send, receiver_energy=recv)


def _transfers(system: System, out_bytes: Sequence[int]
               ) -> dict[tuple[int, str, str], TransferCost]:
    transfers: dict[tuple[int, str, str], TransferCost] = {}
    for k, nbytes in enumerate(out_bytes[:-1]):
        for src in system.devices:
            for dst in system.devices:
                if src.name == dst.name:
                    # An in-memory copy: no network energy model applies. None (not 0 J)
                    # so that it does not count as an energy figure for the device.
                    transfers[(k, src.name, dst.name)] = TransferCost(
                        time=nbytes / src.memory_bandwidth)
                    continue
                tr = network_transfer(system, src, dst, nbytes)
                if tr is not None:
                    transfers[(k, src.name, dst.name)] = tr
    return transfers
