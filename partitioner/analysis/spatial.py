"""What a row part of a layer-volume costs (DISTREDGE), and the estimate of a plan with parts.

A *volume* is a run of row-splittable model layers ``first..last`` (``Layer.rows`` set).
A part computes output rows ``[a, b]`` of the volume's last output (its *main* output).
Its cost follows from the row geometry of :mod:`partitioner.frontend.rows`, applied
backwards layer by layer through the volume (the halo included):

* **rows per layer**: the band of every layer's output that the part computes; for an op
  with kernel F, stride S, top padding P and dilation d, output rows ``[a, b]`` need
  input rows ``[a*S - P, b*S - P + d(F-1)]``, clipped. The lower end depends on ``a``
  only and the upper on ``b`` only, so every band is two vectors over the rows and all
  ``H^2`` parts of a volume are priced at once (numpy outer operations);
* **compute** (halo recompute included): each layer's single-layer price on the device
  (the cost table's bundle ``k..k``: analytic FLOPs / FLOPS, or the profiled latency)
  times the share of its output rows the part computes (the largest share over the ops
  of the layer, so a Conv + pool layer is priced by its Conv's wider band) -- or, where
  ``profile --spatial`` measured the layer's row parts on the device, the measured
  latency interpolated at the part's output rows of the layer
  (:mod:`partitioner.analysis.row_profile`) -- plus the
  volume's weights loaded in full and its internal cuts scaled like the compute, minus
  the first layer's preloaded weights (ODIWeP) as for a layer-wise run. One part over
  every row costs exactly what the layer-wise run of the volume costs (analytic device,
  ``mbs`` at least the volume's length);
* **scatter**: the rows (halo included) of every tensor the volume reads from outside,
  sent by the previous stage's device, or the pieces the previous split stage's parts
  hold (a part on the same device sends nothing);
* **gather**: the part's rows of every volume output read later (the main output's
  ``[a, b]``; others at the same relative heights, as :mod:`partitioner.backend.parts`
  cuts them), sent to the next stage's device.

Every transfer is priced with the project's one link rule,
:func:`partitioner.analysis.costs.network_transfer`.

**The timing model of a split stage** (one image in flight): the parts run in parallel;
a part starts when its input messages have arrived (the messages *into one unit* are
received one after the other, as for a layer-wise stage) and its gather messages leave
when it finishes; the stage ends when the last part's gather has arrived (a barrier).
So a split stage costs ``max_p (in_p + compute_p + out_p)``, where ``out_p`` counts the
messages to non-split receivers (a message into a later split stage counts at its
receiver). A layer-wise stage costs the sum of its incoming messages plus its bundles,
exactly as :func:`partitioner.analysis.estimate.evaluate` prices it, so
:func:`partitioner.analysis.spatial_estimate.estimate_plan` of a plan without parts
equals that function's figure.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from partitioner import ir
from partitioner.analysis.costs import network_transfer
from partitioner.analysis.energy import compute_power
from partitioner.analysis.row_profile import curve_for, row_compute
from partitioner.errors import fail

__all__ = ["upper_mask", "Volume", "volume", "unit_rows", "PartCosts", "part_costs", "message_time",
           "part_rows_detail"]

HEIGHT = 2
Band = tuple[np.ndarray, np.ndarray]  # lower end per first row a, upper end per last row b


@functools.lru_cache(maxsize=64)
def upper_mask(h: int) -> np.ndarray:
    """``(h, h)`` booleans: True where ``b >= a`` (a part's rows are non-empty)."""
    mask = np.triu(np.ones((h, h), bool))
    mask.flags.writeable = False
    return mask


@dataclass(frozen=True)
class Volume:
    """Row geometry of model layers ``first..last`` split by the rows of ``main``.

    ``bands[k]`` are, per layer of the volume and per op of it, ``(lo[a], hi[b],
    out_height)``; ``inputs`` the tensors read from outside with their needed rows;
    ``outputs`` the tensors read after the volume with ``(height, row bytes)``.
    """

    first: int
    last: int
    main: str
    height: int
    bands: tuple[tuple[tuple[np.ndarray, np.ndarray, int], ...], ...]
    # name, lo, hi, row bytes, whole bytes (0: sliced by rows)
    inputs: tuple[tuple[str, np.ndarray, np.ndarray, int, int], ...]
    outputs: tuple[tuple[str, int, int], ...]  # name, height, row bytes

    @functools.cached_property
    def layer_share(self) -> np.ndarray:
        """``(L, H, H)``: per layer, the largest share of its ops' output rows a part
        ``[a, b]`` computes (0 where ``b < a``)."""
        h = self.height
        out = np.zeros((len(self.bands), h, h))
        for k, ops in enumerate(self.bands):
            for lo, hi, height in ops:
                rows = np.maximum(hi[None, :] - lo[:, None] + 1, 0) / height
                np.maximum(out[k], rows, out=out[k])
        return out * upper_mask(h)[None]

    @functools.cached_property
    def input_bytes(self) -> np.ndarray:
        """``(H, H)``: bytes part ``[a, b]`` reads from outside (halo included)."""
        total = np.zeros((self.height, self.height))
        for _, lo, hi, rowbytes, whole in self.inputs:
            total += whole if whole else np.maximum(hi[None, :] - lo[:, None] + 1, 0) * rowbytes
        return total

    def output_rows(self, a: int, b: int) -> dict[str, tuple[int, int]]:
        """Rows of every volume output part ``[a, b]`` holds (the relative-height rule of
        :mod:`partitioner.backend.parts` for outputs other than the main one)."""
        h = self.height
        return {name: (a * oh // h, (b + 1) * oh // h - 1) if name != self.main else (a, b)
                for name, oh, _ in self.outputs}

    @functools.cached_property
    def output_bytes(self) -> np.ndarray:
        """``(H, H)``: bytes part ``[a, b]`` sends to the next stage."""
        a = np.arange(self.height)
        total = np.zeros((self.height, self.height))
        for name, oh, rowbytes in self.outputs:
            if name == self.main:
                rows = a[None, :] - a[:, None] + 1
            else:
                rows = (a[None, :] + 1) * oh // self.height - a[:, None] * oh // self.height
            total += np.maximum(rows, 0) * rowbytes
        return total


def _clip_back(op: ir.RowOp, lo: np.ndarray, hi: np.ndarray) -> Band:
    """:func:`partitioner.frontend.rows.op_input_rows` on vectors of band ends."""
    new_lo = np.maximum(lo * op.stride - op.pad_top, 0)
    new_hi = np.minimum(hi * op.stride - op.pad_top + op.dilation * (op.kernel - 1),
                        op.in_height - 1)
    return new_lo, new_hi


def _height(t: ir.TensorInfo | None) -> int | None:
    return t.shape[HEIGHT] if t is not None and len(t.shape) == 4 else None


def volume(graph: ir.LayerGraph, first: int, last: int) -> Volume | str:
    """The geometry of layers ``first..last`` split by rows, or why they cannot be."""
    layers = graph.layers[first:last + 1]
    for layer in layers:
        if layer.rows is None:
            return f"layer {layer.index} ({layer.name}) cannot be split by rows"
    tensors = {**graph.tensors, **{t.name: t for t in (*graph.inputs, *graph.outputs)}}
    produced = [n for layer in layers for n in layer.produces]
    live = set(graph.cut_after(last).tensors) | {t.name for t in graph.outputs}
    outs = [n for n in dict.fromkeys(produced) if n in live]
    if not outs:
        return "the layers produce nothing read later"
    for n in outs:
        if _height(tensors.get(n)) is None:
            return f"output {n!r} is not 4-D"
    main = outs[-1]
    h_main = tensors[main].shape[HEIGHT]
    rows = np.arange(h_main)
    need: dict[str, Band] = {main: (rows, rows)}
    for n in outs[:-1]:
        oh = tensors[n].shape[HEIGHT]
        need[n] = (rows * oh // h_main, (rows + 1) * oh // h_main - 1)
    bands: list[tuple[tuple[np.ndarray, np.ndarray, int], ...]] = []
    for layer in reversed(layers):
        assert layer.rows is not None
        mine = [need[n] for n in layer.produces if n in need]
        if not mine:
            bands.append(())
            continue
        lo = np.minimum.reduce([m[0] for m in mine])
        hi = np.maximum.reduce([m[1] for m in mine])
        band_out = (lo, hi)
        ops = []
        for op in reversed(layer.rows):
            ops.append((lo, hi, op.out_height))
            lo, hi = _clip_back(op, lo, hi)
        bands.append(tuple(ops))
        in_h, out_h = layer.rows[0].in_height, layer.rows[-1].out_height
        main_in = next((n for n in layer.consumes if _height(tensors.get(n)) == in_h), None)
        for n in layer.consumes:
            t = tensors.get(n)
            th = _height(t)
            if n == main_in:
                want = (lo, hi)
            elif th == out_h:
                want = band_out
            elif th is None:
                return f"layer {layer.index} reads {n!r}, which is not 4-D"
            else:
                want = (np.zeros(h_main, int), np.full(h_main, th - 1))
            old = need.get(n)
            need[n] = want if old is None else (np.minimum(old[0], want[0]),
                                                np.maximum(old[1], want[1]))
    inside = set(produced)
    inputs = []
    for n, (lo, hi) in need.items():
        if n in inside:
            continue
        t = tensors[n]
        th = _height(t)
        assert th is not None
        inputs.append((n, lo, hi, t.nbytes // th, 0))
    outputs = tuple((n, tensors[n].shape[HEIGHT],
                     tensors[n].nbytes // tensors[n].shape[HEIGHT]) for n in outs)
    return Volume(first, last, main, h_main, tuple(reversed(bands)), tuple(inputs), outputs)


def unit_rows(graph: ir.LayerGraph, plan: ir.Plan):  # type: ignore[no-untyped-def]
    """Routing's ``UnitRows`` from the analytic geometry: the rows each part of a split
    stage receives (halo included) and holds (the back end's part models agree on
    chains; see :mod:`partitioner.backend.parts`)."""
    cache: dict[int, Volume] = {}

    def rows(stage: int, part: int) -> tuple[dict[str, tuple[int, int] | None],
                                             dict[str, tuple[int, int] | None]]:
        s = plan.stages[stage]
        assert s.parts is not None
        vol = cache.get(stage)
        if vol is None:
            got = volume(graph, s.first, s.last)
            if isinstance(got, str):
                fail(f"stage {stage} (layers {s.first}..{s.last}): {got}")
            cache[stage] = vol = got
        a, b = s.parts[part].rows
        ins: dict[str, tuple[int, int] | None] = {
            n: (int(lo[a]), int(hi[b])) for n, lo, hi, _, _ in vol.inputs}
        held: dict[str, tuple[int, int] | None] = dict(vol.output_rows(a, b))
        return ins, held

    def rows_or_whole(stage: int, part: int) -> tuple[dict[str, tuple[int, int] | None],
                                                      dict[str, tuple[int, int] | None]]:
        s = plan.stages[stage]
        if stage not in cache and isinstance(volume(graph, s.first, s.last), str):
            # no row geometry (a hand-built graph): whole inputs, own rows of 4-D outputs
            assert s.parts is not None
            a, b = s.parts[part].rows
            held: dict[str, tuple[int, int] | None] = {}
            for k in range(s.first, s.last + 1):
                for n in graph.layers[k].produces:
                    t = graph.tensors.get(n)
                    fits = t is not None and len(t.shape) == 4 and b < t.shape[HEIGHT]
                    held[n] = (a, b) if fits else None
            return {}, held
        return rows(stage, part)
    return rows_or_whole


def part_rows_detail(graph: ir.LayerGraph, stage: ir.Stage) -> list[dict[str, object]]:
    """Per part: output rows, input rows of each tensor read (halo included), halo rows
    (input rows read beyond the part's share), for ``explain``."""
    vol = volume(graph, stage.first, stage.last)
    if isinstance(vol, str) or not stage.parts:
        return []
    out = []
    for p in stage.parts:
        a, b = p.rows
        reads = {n: [int(lo[a]), int(hi[b])] for n, lo, hi, _, _ in vol.inputs}
        halo = 0
        for n, lo, hi, _, _ in vol.inputs:
            h_in = graph.tensors[n].shape[HEIGHT] if n in graph.tensors else vol.height
            share = (b - a + 1) * h_in / vol.height
            halo = max(halo, int(round(int(hi[b]) - int(lo[a]) + 1 - share)))
        out.append({"device": p.device, "rows": [a, b], "reads": reads, "halo_rows": halo})
    return out


# --------------------------------------------------------------------------- prices


def message_time(system: ir.System, src: str, dst: str, nbytes: float) -> float:
    """Seconds to send ``nbytes`` from ``src`` to ``dst`` (0 on one device or for 0 B)."""
    if src == dst or nbytes <= 0:
        return 0.0
    cost = network_transfer(system, system.device(src), system.device(dst), nbytes)
    return math.inf if cost is None else cost.time


_LINKS: dict[int, tuple[ir.System, dict[tuple[str, str], tuple[float, float]]]] = {}


def _bw_lat(system: ir.System, src: str, dst: str) -> tuple[float, float]:
    """Bandwidth and latency of the pair (bandwidth 0: not linked), cached per system
    object (hashing a frozen system on every call costs more than the lookup)."""
    held = _LINKS.get(id(system))
    if held is None or held[0] is not system:
        if len(_LINKS) > 16:
            _LINKS.clear()
        held = _LINKS[id(system)] = (system, {})
    pairs = held[1]
    key = (src, dst)
    if key not in pairs:
        link = system.link(src, dst)
        if link is None:
            pairs[key] = (0.0, math.inf)
        else:
            s, d = system.device(src), system.device(dst)
            pairs[key] = (min(s.network_bandwidth, d.network_bandwidth, link.bandwidth),
                          link.latency)
    return pairs[key]


def transfer_array(system: ir.System, src: str, dst: str, nbytes: np.ndarray) -> np.ndarray:
    """:func:`message_time` over an array of byte counts (the same formula)."""
    if src == dst:
        return np.zeros_like(nbytes)
    bw, lat = _bw_lat(system, src, dst)
    if not bw:
        return np.where(nbytes > 0, math.inf, 0.0)
    return np.where(nbytes > 0, nbytes / bw + lat, 0.0)


@dataclass(frozen=True)
class PartCosts:
    """Compute seconds (and joules) of every part ``[a, b]`` of a volume on a device."""

    device: str
    frequency: str | None
    compute: np.ndarray  # (H, H), inf where b < a or no price
    energy: np.ndarray | None


def _position_of(table: ir.CostTable) -> dict[int, int]:
    return {p.layer: p.index for p in table.positions if p.layer is not None}


def part_costs(table: ir.CostTable, vol: Volume, device: str, frequency: str | None,
               share: np.ndarray | None = None) -> PartCosts | None:
    """Compute time of every part of ``vol`` on ``device`` (module docstring), or None
    when a layer of the volume may not run there (pins) or has no price."""
    share = vol.layer_share if share is None else share
    where = _position_of(table)
    h = vol.height
    total = np.zeros((h, h))
    fixed = hidden = 0.0
    for i, k in enumerate(range(vol.first, vol.last + 1)):
        pos = where[k]
        b = table.bundles.get((pos, pos, device, frequency))
        if b is None:
            return None
        curve = curve_for(table, k, device, frequency)
        if curve is not None and vol.bands[i]:
            # profiled (profile --spatial): the layer's measured part at its rows
            total += row_compute(curve, vol.bands[i][0])
        else:
            total += b.compute * share[i]
        fixed += b.weight_loading
        if i == 0 and table.preload:
            hidden = b.hidden
            fixed -= hidden
        if k < vol.last:
            internal = table.transfers.get((pos, device, device))
            if internal is not None:
                total += internal.time * share[i]
    compute = np.where(upper_mask(h), total + fixed, math.inf)
    power = compute_power(table.system.device(device), frequency)
    # the device draws power while it loads weights, hidden by preloading or not
    energy = None if power is None else power * (compute + hidden)
    return PartCosts(device, frequency, compute, energy)
