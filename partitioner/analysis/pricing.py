"""Every bundle of the extended chain priced with numpy: the body of
:func:`partitioner.analysis.costs.build_cost_table` (the rules are in that module's
docstring; this module computes them for all bundles at once).

Bundles starting at position ``i`` are ``i..i+c`` for ``c`` below ``reach[d, i]`` (pins,
``--private``, pseudo positions and MBS end a run). Their sums (FLOPs, weight bytes,
internal cut bytes; for a lazy profile the single layers' latencies and energies) are
accumulated one offset ``c`` at a time, in the order the per-bundle loop added them, so
every price is the same float the loop computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from partitioner.analysis.energy import compute_flops, compute_power
from partitioner.analysis.profile_columns import BundleColumns
from partitioner.errors import fail
from partitioner.ir import Device, LayerGraph, Position
from partitioner.ir.prices import BundlePrices

__all__ = ["Measured", "price_bundles"]


@dataclass(frozen=True)
class Measured:
    """A device's profiled bundles, every profile of it in one set of columns.

    Attributes:
        columns: the bundles (``labels`` the union of the profiles' labels).
        files: the profile files that contributed, for messages.
        lazy: unmeasured bundles may be estimated from single layers.
    """

    columns: BundleColumns
    files: str
    lazy: bool


@dataclass(frozen=True)
class _Sums:
    """Per start position ``i`` and offset ``c``: the bundle ``i..i+c``'s running sums."""

    flops: np.ndarray  # (n, C)
    weights: np.ndarray  # (n, C)
    internal: np.ndarray  # (n, C): bytes of the cuts inside the bundle


def _running(values: np.ndarray, width: int, start: np.ndarray | None = None) -> np.ndarray:
    """``out[i, c] = start[i] + values[i+1] + ... + values[i+c]`` added left to right
    (``start`` defaults to ``values`` itself: ``values[i] + ... + values[i+c]``)."""
    n = len(values)
    out = np.zeros((n, width))
    out[:, 0] = values if start is None else start
    padded = np.concatenate([values, np.zeros(width)])
    for c in range(1, width):
        out[:, c] = out[:, c - 1] + padded[c:c + n]
    return out


def _sums(positions: Sequence[Position], out_bytes: Sequence[int], flops: Sequence[float],
          width: int) -> _Sums:
    weights = np.array([float(p.weight_bytes) for p in positions])
    cut = np.array([float(b) for b in out_bytes])
    # the cut entering position i + c is out_bytes[i + c - 1]; none inside a single
    shifted = np.concatenate([[0.0], cut[:-1]])  # shifted[k] = out_bytes[k - 1]
    internal = _running(shifted, width, start=np.zeros(len(positions)))
    return _Sums(_running(np.array(flops, dtype=float), width), _running(weights, width),
                 internal)


def _reach(positions: Sequence[Position], device: str, mbs: int) -> np.ndarray:
    """How many bundles start at each position on ``device`` (their lengths 1..reach)."""
    n = len(positions)
    ok = np.array([p.allowed is None or device in p.allowed for p in positions], dtype=bool)
    layer = np.array([p.kind == "layer" for p in positions], dtype=bool)
    run = np.zeros(n + 1, dtype=np.int64)  # consecutive allowed model layers from i
    for i in range(n - 1, -1, -1):
        run[i] = run[i + 1] + 1 if ok[i] and layer[i] else 0
    reach = np.minimum(np.minimum(run[:n], mbs), n - np.arange(n))
    reach[~layer & ok] = 1  # a pseudo position is a bundle alone
    reach[~ok] = 0
    return reach


def price_bundles(graph: LayerGraph, devices: Sequence[Device],
                  freqs: dict[str, tuple[str | None, ...]], positions: Sequence[Position],
                  out_bytes: Sequence[int], flops: Sequence[float], mbs: int, preload: bool,
                  measured: dict[str, Measured]) -> BundlePrices:
    """The price of every legal bundle, as :class:`~partitioner.ir.prices.BundlePrices`.

    Raises:
        UserError: a profiled device lacks a bundle it needs (named by device, frequency,
            layers), or a lazy profile lacks one of the bundle's single layers.
    """
    n = len(positions)
    width = max(1, min(mbs, n))
    sums = _sums(positions, out_bytes, flops, width)
    layer_of = np.array([-1 if p.layer is None else p.layer for p in positions],
                        dtype=np.int64)
    is_layer = layer_of >= 0
    first_weight = np.array([float(p.weight_bytes) for p in positions])
    offsets = np.arange(width)
    blocks = []
    for dk, dev in enumerate(devices):
        reach = _reach(positions, dev.name, mbs)
        legal = offsets[None, :] < reach[:, None]  # (n, C), row-major = (first, last) order
        starts, cs = np.nonzero(legal)
        lasts = starts + cs
        s_flops, s_weights = sums.flops[legal], sums.weights[legal]
        s_internal = sums.internal[legal]
        prof = measured.get(dev.name)
        profiled = is_layer[starts] if prof is not None else np.zeros(len(starts), bool)
        bw = dev.memory_bandwidth
        for q, freq in enumerate(freqs[dev.name]):
            power = compute_power(dev, freq)
            compute = s_flops / compute_flops(dev, freq)
            loading, internal = s_weights / bw, s_internal / bw
            hidden = (np.where(is_layer[starts], first_weight[starts] / bw, 0.0) if preload
                      else np.zeros(len(starts)))
            energy = (np.full(len(starts), math.nan) if power is None
                      else power * (compute + loading + internal))
            if prof is not None and profiled.any():
                lat, en = _profiled_prices(graph, dev, freq, prof, layer_of, starts[profiled],
                                           lasts[profiled], cs[profiled],
                                           s_internal[profiled] / bw)
                if power is not None:
                    en = np.where(np.isnan(en), power * lat, en)
                # A measured latency already contains weight loading and internal cuts.
                compute, loading, internal, hidden, energy = (
                    np.where(profiled, full, part) for full, part in (
                        (_scatter(profiled, lat), compute), (0.0, loading), (0.0, internal),
                        (0.0, hidden), (_scatter(profiled, en), energy)))
            blocks.append({"first": starts, "last": lasts,
                           "device": np.full(len(starts), dk), "freq": np.full(len(starts), q),
                           "compute": compute, "weight_loading": loading,
                           "internal": internal, "hidden": hidden, "energy": energy})
    return BundlePrices.concatenate([d.name for d in devices],
                                    [freqs[d.name] for d in devices], blocks)


def _scatter(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(len(mask))
    out[mask] = values
    return out


def _profiled_prices(graph: LayerGraph, dev: Device, freq: str | None, prof: Measured,
                     layer_of: np.ndarray, starts: np.ndarray, lasts: np.ndarray,
                     cs: np.ndarray, internal_seconds: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Latency and energy (NaN: none) of layer bundles ``starts..lasts`` on a profiled
    device: measured, else (lazy) the singles' sum plus the internal cuts."""
    cols = prof.columns
    n_layers = len(graph.layers)
    code = cols.labels.index(freq) if freq in cols.labels else -1
    at_freq = cols.freq == code
    keys = cols.first[at_freq] * n_layers + cols.last[at_freq]
    order = np.argsort(keys, kind="stable")
    # one sentinel entry past every key (-1 matches no bundle), so a lookup always indexes
    keys = np.append(keys[order], -1)
    lat_m = np.append(cols.latency[at_freq][order], math.nan)
    en_m = np.append(cols.energy[at_freq][order], math.nan)

    def lookup(want: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Measured or not, latency and energy (NaN where not) of the bundles ``want``."""
        k = np.minimum(np.searchsorted(keys[:-1], want), len(keys) - 1)
        hit = keys[k] == want
        return hit, np.where(hit, lat_m[k], math.nan), np.where(hit, en_m[k], math.nan)

    first, last = layer_of[starts], layer_of[lasts]
    hit, latency, energy = lookup(first * n_layers + last)
    if hit.all():
        return latency, energy
    missing_ok = np.zeros(len(hit), dtype=bool)
    if prof.lazy:
        # single layer latencies and energies of the positions, then running sums
        # (a pseudo position, layer -1, asks for key -1 - n: never measured)
        _, s_lat, s_en = lookup(layer_of * n_layers + layer_of)
        width = int(cs.max()) + 1
        run_lat = _running(s_lat, width)[starts, cs]
        # energy: None when any single has none (NaN propagates)
        run_en = _running(s_en, width)[starts, cs]
        est = run_lat + internal_seconds
        missing_ok = ~hit & np.isfinite(run_lat)
        latency = np.where(missing_ok, est, latency)
        energy = np.where(missing_ok, run_en, energy)
    bad = ~hit & ~missing_ok
    if bad.any():
        r = int(np.argmax(bad))
        a, b = int(first[r]), int(last[r])
        missing = f"layers {a}..{b}" if a != b else f"layer {a}"
        hint = (f"profile with a --mbs at least {b - a + 1} or lower --mbs" if a != b else
                "every single layer must be measured: profile this device again")
        fail(f"{prof.files}: device {dev.name!r} at frequency {freq}: the "
             f"profiles lack bundle {missing} ({graph.layers[a].name}.."
             f"{graph.layers[b].name}); {hint}")
    return latency, energy
