"""Random, profiled-looking cost tables for tests and the scaling benchmark.

A synthetic table mimics what ``partitioner.analysis.costs`` builds from profiles: every
bundle of ``1..mbs`` model layers on every device and frequency is priced, and a
bundle's price is the sum of its layers' single-layer prices times a random factor in
``[1 - spread, 1 + spread]``, so the sum of parts both under- and over-estimates it (the
reason for bundle-correct pricing, SPEC §3). Faster frequencies cost more energy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from partitioner import ir

__all__ = ["TableSpec", "random_table"]

_CLASSES: tuple[ir.DeviceClass, ...] = ("edge", "hub", "cloud")


@dataclass(frozen=True)
class TableSpec:
    """Shape of a random table.

    Attributes:
        layers: model layers.
        devices: devices (classes cycle edge, hub, cloud; device 0 is the edge source).
        frequencies: frequencies per device (1: no DVFS, labels ``None``).
        mbs: maximum bundle size (0: all layers).
        source / preprocess / destination: which pseudo positions to add.
        spread: bundle price factor spread around the sum of single-layer prices.
        link_prob: probability that two different devices are connected.
        pin_prob: probability that a model layer is pinned to one or two devices.
        memory_frac: device memory as a fraction of the model's weights (0: unlimited).
        energy_none_prob: probability that a non-edge device has no energy figures.
        preload: model weight preloading (hidden weight time).
        hidden_by_end: the hidden time of a bundle depends on where it ends (else only
            on its first layer, as in the analytic ODIWeP model).
        freq_jitter: independent noise of each frequency's price of a bundle (measurement
            noise); a layer's work and a bundle's factor are shared by all frequencies,
            and a higher frequency runs faster and draws more power.
        shared_prob: probability that a model layer also reads the one shared initialiser
            ``"shared.weight"`` (as big as the model's other weights together; it counts in
            each reader's ``weight_bytes`` and is held once per device).
    """

    layers: int = 4
    devices: int = 3
    frequencies: int = 1
    mbs: int = 0
    source: bool = True
    preprocess: bool = False
    destination: bool = True
    spread: float = 0.5
    link_prob: float = 1.0
    pin_prob: float = 0.0
    memory_frac: float = 0.0
    energy_none_prob: float = 0.0
    preload: bool = True
    hidden_by_end: bool = False
    freq_jitter: float = 0.05
    shared_prob: float = 0.0


def random_table(spec: TableSpec, seed: int) -> ir.CostTable:
    """A random cost table of the given shape (deterministic in ``seed``)."""
    rnd = random.Random(seed)
    names = [f"d{k}" for k in range(spec.devices)]
    speed = [rnd.uniform(0.2, 5.0) * (1 + k) for k in range(spec.devices)]
    weights = [rnd.randint(0, 1000) for _ in range(spec.layers)]
    shared_size = max(sum(weights), 1)
    readers = {k for k in range(spec.layers)
               if spec.shared_prob and rnd.random() < spec.shared_prob}
    weights = [w + (shared_size if k in readers else 0) for k, w in enumerate(weights)]
    total_w = (sum(weights) - shared_size * max(len(readers) - 1, 0)) or 1
    devices = []
    for k, name in enumerate(names):
        mem = total_w * spec.memory_frac * rnd.uniform(0.5, 1.5) if spec.memory_frac else ir.INF
        freqs = tuple(f"{600 + 300 * q}MHz" for q in range(spec.frequencies)) \
            if spec.frequencies > 1 else ()
        devices.append(ir.Device(name, _CLASSES[k % 3], 1e9 * speed[k], 1e9, 1e8, memory=mem,
                                 frequencies=freqs, idle_power=rnd.uniform(0.0, 3.0),
                                 carbon_intensity=rnd.uniform(0.05, 1.0)))
    system = ir.System(tuple(devices), (), ir.Application(
        source=names[0] if spec.source else None,
        destination=names[0] if spec.destination else None, duration=3600.0))
    pos: list[ir.Position] = []
    if spec.source:
        pos.append(ir.Position(len(pos), "<source>", "source", None, 0, (names[0],)))
    if spec.preprocess:
        pos.append(ir.Position(len(pos), "<preprocess>", "preprocess", None, 0))
    for layer in range(spec.layers):
        allowed = None
        if spec.pin_prob and rnd.random() < spec.pin_prob:
            allowed = tuple(sorted(rnd.sample(names, min(len(names), rnd.randint(1, 2)))))
        pos.append(ir.Position(len(pos), f"layer{layer}", "layer", layer, weights[layer],
                               allowed, ("shared.weight",) if layer in readers else ()))
    if spec.destination:
        pos.append(ir.Position(len(pos), "<destination>", "destination", None, 0,
                               (names[0],)))
    n = len(pos)
    mbs = spec.mbs or max(spec.layers, 1)
    freq_of = {d.name: (d.frequencies or (None,)) for d in devices}
    no_energy = {d.name for d in devices
                 if d.device_class != "edge" and rnd.random() < spec.energy_none_prob}
    single: dict[tuple[int, str, str | None], tuple[float, float]] = {}
    bundles: dict[tuple[int, int, str, str | None], ir.BundleCost] = {}
    hid = {(k, d): rnd.uniform(0.5, 1.0) for k in range(n) for d in names}
    for k in range(n):
        for d, s in zip(names, speed, strict=True):
            work = rnd.uniform(0.5, 2.0) if pos[k].kind in ("layer", "preprocess") else 0.0
            for q, f in enumerate(freq_of[d]):
                fast = 1.0 + 0.5 * q
                t = work / (s * fast) * 1e-2
                single[k, d, f] = (t, t * (2.0 + 3.0 * q * q))
    for i in range(n):
        for j in range(i, n):
            if pos[i].kind != "layer" and j > i:
                break
            if pos[j].kind != "layer" and j > i:
                break
            if pos[i].kind == "layer" and j - i + 1 > mbs:
                break
            for d in names:
                shared = rnd.uniform(1 - spec.spread, 1 + spec.spread) if j > i else 1.0
                for f in freq_of[d]:
                    t = sum(single[k, d, f][0] for k in range(i, j + 1))
                    e = sum(single[k, d, f][1] for k in range(i, j + 1))
                    factor = shared * rnd.uniform(1 - spec.freq_jitter, 1 + spec.freq_jitter)
                    wl = sum(pos[k].weight_bytes for k in range(i, j + 1)) * 1e-7
                    bundles[i, j, d, f] = ir.BundleCost(
                        compute=t * factor, weight_loading=wl,
                        hidden=pos[i].weight_bytes * 1e-7 * (
                            rnd.uniform(0.5, 1.0) if spec.hidden_by_end else hid[i, d])
                        if spec.preload else 0.0,
                        energy=None if d in no_energy else e * factor)
    transfers: dict[tuple[int, str, str], ir.TransferCost] = {}
    connected = {(a, b) for a in names for b in names
                 if a == b or rnd.random() < spec.link_prob}
    for k in range(n - 1):
        size = rnd.uniform(0.1, 1.0)
        for a, b in sorted(connected):
            t = size * (1e-4 if a == b else rnd.uniform(2e-3, 2e-2))
            transfers[k, a, b] = ir.TransferCost(
                t, None if a in no_energy else t * 1.5, None if b in no_energy else t * 0.5)
    return ir.CostTable("synthetic", f"seed{seed}", tuple(pos), system, freq_of, bundles,
                        transfers, mbs, spec.preload, {d: "profile" for d in names},
                        {"shared.weight": shared_size} if readers else {})
