"""Profiled row parts (DISTREDGE profiles a layer-volume per row count, per device).

``partitioner profile --spatial`` measures, for every row-splittable layer ``k`` of the
model, the latency of the back end's own part model (:func:`partitioner.backend.parts.
build_parts`) that computes the first ``r`` output rows of that layer, for several row
counts ``r``. The part model reads its input rows *halo included* and pads at its band's
border like a split stage's part, so the measured figure carries the halo recompute. It is
run in ONNX Runtime with the profiler's own timer (:class:`partitioner.analysis.profiler.
BundleTimer`: same session options, warm-up, trimmed mean) on the real intermediate
tensors, cut to the part's rows.

Why single layers: the spatial cost model (:mod:`partitioner.analysis.spatial`) prices a
part of a volume layer by layer (the rows each layer computes follow from the geometry
backwards through the volume); so a measured curve per layer prices every volume and
every cut the planner considers, without one measurement per (volume, cut).

In the cost model (:func:`row_compute`) a layer with a curve on the part's device and
frequency costs the linear interpolation of the curve at the number of output rows it
computes in that part (clamped to the measured ends); a layer without one keeps the
analytic share (its single-layer price times the share of rows). The parts are measured
anchored at row 0 (one border, as the first part of a split); a part in the middle of a
split reads halo on both sides, a little more than the curve holds: docs/SPATIAL.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from partitioner import ir
from partitioner.analysis.profiles import Profile, ProfiledRows, save_profile
from partitioner.errors import fail

__all__ = ["splittable_layers", "row_counts", "measure_row_part", "profile_rows",
           "with_row_profiles", "row_compute", "curve_for"]

HEIGHT = 2
Curve = tuple[tuple[int, float], ...]  # (rows, seconds), rows ascending


def splittable_layers(graph: ir.LayerGraph) -> list[int]:
    """Model layers the planner could split by rows (``Layer.rows`` set)."""
    return [layer.index for layer in graph.layers if layer.rows is not None]


def _out_height(layer: ir.Layer) -> int:
    assert layer.rows is not None
    return layer.rows[-1].out_height


def row_counts(height: int, asked: Sequence[int] | None) -> list[int]:
    """Row counts to measure for an output of ``height`` rows: the asked ones that fit
    (default: 1, a quarter, a half), always with the whole height (the curve's top end)."""
    wanted = asked if asked else (1, height // 4, height // 2)
    return sorted({r for r in wanted if 1 <= r < height} | {height})


def measure_row_part(timer: Any, layer: int, rows: int,
                     frequency: str | None = None) -> ProfiledRows:
    """Time the part model of layer ``layer`` that computes output rows ``0..rows-1``.

    ``timer`` is a :class:`~partitioner.analysis.profiler.BundleTimer` (its prepared model,
    captured tensors, settings and shared weight file)."""
    from partitioner.backend.parts import build_parts
    from stagebundle.graph import take_rows

    prepared = timer.weights.prepared if timer.shared else timer.prepared
    height = _out_height(prepared.graph.layers[layer])
    parts = [ir.Part("here", frequency, (0, rows - 1))]
    if rows < height:  # the rest of the rows, so that the parts tile the output
        parts.append(ir.Part("here", frequency, (rows, height - 1)))
    stage = ir.Stage(device=None, frequency=frequency, first=layer, last=layer, id=0,
                     parts=tuple(parts))
    t0 = time.perf_counter()
    part = build_parts(prepared, stage)[0]
    if timer.shared:
        sess = timer.weights.session(part.model.model, timer.settings.threads)
    else:
        from partitioner.analysis.sessions import open_session

        sess = open_session(part.model.model, timer.settings.threads, part.model.base_dir)
    what = f"layer {layer} rows 0..{rows - 1}"
    feeds = {t.name: take_rows(timer.captured[t.name], None, want, what)
             for t, want in part.inputs}
    outputs = [o.name for o in sess.get_outputs()]

    def once() -> float:
        t = time.perf_counter()
        sess.run(outputs, feeds)
        return time.perf_counter() - t

    timer.setup_seconds += time.perf_counter() - t0
    stats, _ = timer.time_runs(once)
    return ProfiledRows(layer, layer, rows, frequency, stats["latency"])


def profile_rows(profile: Profile, graph: ir.LayerGraph, asked: Sequence[int] | None,
                 measure: Callable[[int, int], ProfiledRows], path: str | Path | None, *,
                 frequency: str | None = None) -> Profile:
    """Measure every (splittable layer, row count) not yet in ``profile`` at
    ``frequency``, saving atomically after each (a restart resumes)."""
    done = {(r.first, r.last, r.rows, r.frequency) for r in profile.rows}
    for k in splittable_layers(graph):
        for rows in row_counts(_out_height(graph.layers[k]), asked):
            if (k, k, rows, frequency) in done:
                continue
            profile = profile.with_rows(replace(measure(k, rows), frequency=frequency))
            if path is not None:
                save_profile(profile, path)
    return profile


def with_row_profiles(table: ir.CostTable, graph: ir.LayerGraph,
                      profiles: Sequence[Profile]) -> ir.CostTable:
    """``table`` with the row curves of ``profiles`` (``CostTable.row_latency``).

    Raises:
        UserError: a row entry does not fit the model: a layer range of more than one
            layer, a layer that cannot be split by rows, or more rows than its output has
            (naming the file, the entry and the layer).
    """
    curves: dict[tuple[int, str, str | None], dict[int, float]] = {}
    for prof in profiles:
        file = prof.path or f"profile of {prof.device}"
        for i, r in enumerate(prof.rows):
            where = f"{file}: rows[{i}] (layers {r.first}..{r.last})"
            if r.first != r.last:
                fail(f"{where}: only single layers are priced by rows")
            layer = graph.layers[r.first]
            if layer.rows is None:
                fail(f"{where}: layer {layer.name!r} of {graph.name} cannot be split by rows")
            if r.rows > _out_height(layer):
                fail(f"{where}: {r.rows} rows, but layer {layer.name!r} of {graph.name} "
                     f"outputs {_out_height(layer)}")
            curves.setdefault((r.first, prof.device, r.frequency), {})[r.rows] = r.latency
    if not curves:
        return table
    return replace(table, row_latency={key: tuple(sorted(c.items()))
                                       for key, c in curves.items()})


def row_compute(curve: Curve, band: tuple[np.ndarray, np.ndarray, int]) -> np.ndarray:
    """``(H, H)`` seconds of a layer in every part ``[a, b]``: the curve interpolated
    linearly at the rows ``hi[b] - lo[a] + 1`` of the layer's output the part computes
    (clamped to the curve's ends; 0 rows price as the smallest count, masked later)."""
    lo, hi, _ = band
    rows = np.maximum(hi[None, :] - lo[:, None] + 1, 0)
    counts = np.array([c for c, _ in curve], dtype=np.float64)
    seconds = np.array([s for _, s in curve], dtype=np.float64)
    return np.interp(rows, counts, seconds)


def curve_for(table: ir.CostTable, layer: int, device: str,
              frequency: str | None) -> Curve | None:
    """The measured curve of ``layer`` on ``device`` at ``frequency``, if any."""
    row_latency: Mapping[tuple[int, str, str | None], Curve] = table.row_latency
    return row_latency.get((layer, device, frequency))
