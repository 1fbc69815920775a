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

import numpy as np

from partitioner.analysis.energy import transfer_energy
from partitioner.analysis.pricing import Measured, price_bundles
from partitioner.analysis.profile_columns import BundleColumns, columns_of
from partitioner.analysis.profiles import Profile, ProfiledBundle, check_profile
from partitioner.errors import fail
from partitioner.ir import (
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


def _measured(profiles: Iterable[Profile], graph: LayerGraph, system: System
              ) -> tuple[dict[str, Measured], dict[str, list[Profile]]]:
    """Per profiled device its bundles in one set of columns (and its profiles)."""
    names = {d.name for d in system.devices}
    per: dict[str, list[Profile]] = {}
    for prof in profiles:
        check_profile(prof, graph)
        if prof.device not in names:
            fail(f"{_file(prof)}: device {prof.device!r} is not in "
                 f"{system.path or 'the system'}")
        per.setdefault(prof.device, []).append(prof)
    n_layers = len(graph.layers)
    out: dict[str, Measured] = {}
    for dev, profs in per.items():
        cols = [columns_of(p.bundles) for p in profs]
        labels = tuple(dict.fromkeys(f for c in cols for f in c.present_labels()))
        def cat(attr: str, cols: list[BundleColumns] = cols) -> np.ndarray:
            return np.concatenate([getattr(c, attr) for c in cols])

        joined = BundleColumns(
            first=cat("first"), last=cat("last"),
            freq=np.concatenate([c.relabelled(labels) for c in cols]), labels=labels,
            latency=cat("latency"), energy=cat("energy"), std=cat("std"), min=cat("min"),
            max=cat("max"), p50=cat("p50"))
        owner = np.concatenate([np.full(len(c), k) for k, c in enumerate(cols)])
        r = joined.first_repeat(n_layers)
        if r is not None:
            b = joined[r]
            keys = joined.keys(n_layers)
            other = profs[int(owner[int(np.argmax(keys == keys[r]))])]
            fail(f"{_file(profs[int(owner[r])])}: bundle {b.first}..{b.last} of device "
                 f"{dev!r} at frequency {b.frequency} is also in "
                 f"{other.path or 'another profile'}")
        files = ", ".join(dict.fromkeys(_file(p) for p in profs if len(p.bundles))) or \
            ", ".join(dict.fromkeys(_file(p) for p in profs))  # none measured anything
        out[dev] = Measured(joined, files, any(p.lazy for p in profs))
    return out, per


def _file(prof: Profile) -> str:
    return prof.path or f"profile of {prof.device}"


def _frequencies(device: Device, measured: set[str | None] | None) -> tuple[str | None, ...]:
    if device.frequencies:
        return device.frequencies
    if measured:
        # A profiled device without frequencies in the system file runs at the
        # frequencies its profiles were measured at.
        return tuple(sorted(measured, key=lambda f: (f is not None, f or "")))
    return (None,)


def _check_frequencies(device: Device, measured: Measured, profs: Sequence[Profile],
                       system: System) -> None:
    """Profiles of a device with DVFS must carry exactly its frequency labels."""
    if not device.frequencies:
        return
    where = system.path or "the system file"
    have = set(measured.columns.labels)
    for prof in profs if have - set(device.frequencies) else ():
        for freq in columns_of(prof.bundles).present_labels():
            if freq not in device.frequencies:
                fail(f"{_file(prof)}: device {device.name!r}: "
                     f"frequency {freq!r} is not one of its frequencies in {where} "
                     f"({', '.join(device.frequencies)})")
    for freq in device.frequencies:
        if freq not in have:
            fail(f"{measured.files}: device {device.name!r} has no measurements at "
                 f"frequency {freq!r} (listed in {where}); profile it with "
                 f"--frequency {freq} or remove the frequency")


def _covered(first: np.ndarray, last: np.ndarray, n_layers: int) -> int:
    """The largest MBS whose every bundle is among the spans ``first[k]..last[k]``."""
    have = np.zeros((n_layers, n_layers), dtype=bool)
    have[first, last] = True
    i = np.arange(n_layers)[:, None]
    j = i + np.arange(n_layers + 1)[None, :]
    run = have[i, np.minimum(j, n_layers - 1)] & (j < n_layers)  # run[i, c]: i..i+c there
    lengths = np.argmin(run, axis=1)  # every row has a False (at c = n_layers - i)
    short = lengths < n_layers - np.arange(n_layers)
    return int(min(n_layers, lengths[short].min())) if short.any() else n_layers


def covered_mbs(spans: Iterable[tuple[int, int]], n_layers: int) -> int:
    """The largest MBS whose every bundle is among ``spans`` (``(first, last)`` pairs)."""
    pairs = np.array(list(spans), dtype=np.int64).reshape(-1, 2)
    return _covered(pairs[:, 0], pairs[:, 1], n_layers)


def _default_mbs(measured: dict[str, Measured], n_layers: int) -> int:
    """The largest MBS that the (full, not lazy) profiles of every device and frequency
    cover, so that profiles measured with ``--mbs 4`` plan without repeating it."""
    mbs = n_layers
    for m in measured.values():
        if m.lazy:
            continue  # unmeasured bundles are estimated from the single layers
        cols = m.columns
        for q in np.unique(cols.freq):
            at = cols.freq == q
            mbs = min(mbs, _covered(cols.first[at], cols.last[at], n_layers))
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
        The :class:`ir.CostTable` the solver consumes; its ``bundles`` are
        :class:`~partitioner.ir.prices.BundlePrices` (priced by
        :mod:`partitioner.analysis.pricing`).

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
    measured, per_device = _measured(profiles, graph, system)
    for dev in system.devices:
        if dev.name in measured:
            _check_frequencies(dev, measured[dev.name], per_device[dev.name], system)
    mbs = _default_mbs(measured, n_layers) if mbs is None else min(mbs, n_layers)
    freqs = {d.name: _frequencies(d, set(measured[d.name].columns.labels)
                                  if d.name in measured else None)
             for d in system.devices}
    bundles = price_bundles(graph, system.devices, freqs, positions, out_bytes, flops, mbs,
                            preload, measured)
    transfers = _transfers(system, out_bytes)
    return CostTable(
        graph_name=graph.name, graph_sha256=graph.sha256, positions=positions,
        system=system, frequencies=freqs, bundles=bundles, transfers=transfers, mbs=mbs,
        preload=preload,
        sources={d.name: "profile" if d.name in measured else "analytic"
                 for d in system.devices},
        weight_sizes=dict(graph.initializer_bytes))


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
