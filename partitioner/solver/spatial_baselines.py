"""DISTREDGE's baselines as planner modes, priced by the same cost model as our planner.

Each baseline builds a plan (stages, parts) by its published rule; the plan is then
routed and priced by :func:`partitioner.analysis.spatial_estimate.estimate_plan` exactly
as ours, so every comparison is like for like. The layers a baseline does not split run on the one
device that finishes them soonest (the layer-wise optimum restricted to one device).

* ``offload``: the whole model on the best single device (DISTREDGE §VI baseline "offload
  to the best device").
* ``equal``: DeepThings (Zhao et al., IEEE TCAD 2018): one fused volume, the longest run
  of row-splittable layers from the first, cut into equal row bands over every device
  (at most ``--max-parts``).
* ``proportional``: MoDNN (Mao et al., DATE 2017) / MeDNN: layer by layer, every
  splittable layer its own split stage, rows proportional to device compute speed (FLOPS).
* ``coedge``: CoEdge (Zeng et al., IEEE/ACM ToN 2021): layer by layer, rows from a linear
  model of compute *and* network: device ``q`` gets rows in proportion to
  ``1 / (t_comp,q + t_net,q)`` per row.
* ``aofl``: AOFL (Zhou et al., ICPADS 2019): several fused volumes (the runs between
  down-sampling layers: a stride > 1 ends a volume), rows from the same linear compute +
  network ratio.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from partitioner import ir
from partitioner.analysis.spatial import part_costs, transfer_array, volume
from partitioner.errors import InfeasibleError, fail

__all__ = ["BASELINES", "baseline_plan"]

BASELINES = ("offload", "equal", "proportional", "coedge", "aofl")


def _positions(table: ir.CostTable) -> dict[int, int]:
    return {p.layer: p.index for p in table.positions if p.layer is not None}


def _single_device_plan(graph: ir.LayerGraph, table: ir.CostTable) -> ir.Plan:
    """Every model layer on the one device that is fastest end to end."""
    from partitioner.analysis.routing import route_plan

    best: ir.Plan | None = None
    n = len(graph.layers)
    for dev in table.device_names:
        if any(p.allowed is not None and dev not in p.allowed
               for p in table.positions if p.kind == "layer"):
            continue
        plan = _hand_plan(table, [ir.Stage(dev, None, 0, n - 1)])
        try:
            plan = route_plan(graph, table, plan)
        except InfeasibleError:
            continue
        if best is None or plan.estimate.latency < best.estimate.latency:
            best = plan
    if best is None:
        fail("no single device can run the whole model (pins or links)",
             error=InfeasibleError)
    return best


def _hand_plan(table: ir.CostTable, stages: Sequence[ir.Stage]) -> ir.Plan:
    app = table.system.application
    pseudo: dict[str, str] = {}
    where = _positions(table)
    placement = [""] * len(table.positions)
    for s in stages:
        dev = s.devices[0]
        for k in range(s.first, s.last + 1):
            placement[where[k]] = dev
    for p in table.positions:
        if p.kind == "source" and app.source:
            pseudo["source"], placement[p.index] = app.source, app.source
        elif p.kind == "destination" and app.destination:
            pseudo["destination"], placement[p.index] = app.destination, app.destination
        elif p.kind == "preprocess":
            dev = app.source or stages[0].devices[0]
            pseudo["preprocess"], placement[p.index] = dev, dev
    freqs = {d: (table.frequencies.get(d) or (None,))[0] for s in stages for d in s.devices}
    est = ir.Estimate(latency=math.inf, compute=0.0, communication=0.0,
                      weight_loading=0.0, bottleneck=0.0)
    return ir.Plan(status="feasible", objective="latency", stages=tuple(stages), estimate=est,
                   solve_seconds=0.0, placement=tuple(placement), frequencies=freqs,
                   pseudo=pseudo)


def _bands(weights: Sequence[float], height: int) -> list[int]:
    """Rows per device in proportion to ``weights`` (largest remainders), each >= 0."""
    total = sum(weights)
    exact = [w / total * height for w in weights]
    rows = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(weights)), key=lambda k: exact[k] - rows[k], reverse=True)
    for k in order[:height - sum(rows)]:
        rows[k] += 1
    return rows


def _parts(devices: Sequence[str], rows: Sequence[int]) -> tuple[ir.Part, ...]:
    out, a = [], 0
    for d, r in zip(devices, rows, strict=True):
        if r > 0:
            out.append(ir.Part(d, None, (a, a + r - 1)))
            a += r
    return tuple(out)


def _splittable_runs(graph: ir.LayerGraph) -> list[tuple[int, int]]:
    runs, start = [], None
    for k, layer in enumerate(graph.layers):
        ok = layer.rows is not None and not isinstance(volume(graph, k, k), str)
        if ok and start is None:
            start = k
        if not ok and start is not None:
            runs.append((start, k - 1))
            start = None
    if start is not None:
        runs.append((start, len(graph.layers) - 1))
    return runs


def _downsampling_volumes(graph: ir.LayerGraph, first: int, last: int
                          ) -> list[tuple[int, int]]:
    """AOFL's fused volumes: a layer with a stride > 1 closes a volume."""
    out, start = [], first
    for k in range(first, last + 1):
        rows = graph.layers[k].rows or ()
        if any(op.stride > 1 for op in rows) or k == last:
            out.append((start, k))
            start = k + 1
    return out


def _linear_weights(graph: ir.LayerGraph, table: ir.CostTable, first: int, last: int,
                    devices: Sequence[str], source: str, network: bool) -> list[float]:
    """Rows per second of each device: compute only (MoDNN) or compute + network."""
    vol = volume(graph, first, last)
    assert not isinstance(vol, str)
    h = vol.height
    out = []
    for d in devices:
        pc = part_costs(table, vol, d, (table.frequencies.get(d) or (None,))[0])
        if pc is None:
            out.append(0.0)
            continue
        per_row = (pc.compute[0, h - 1]) / h
        if network:
            nbytes = np.array([[vol.input_bytes[0, h - 1] + vol.output_bytes[0, h - 1]]])
            per_row += float(transfer_array(table.system, source, d, nbytes)[0, 0]) / h
        out.append(0.0 if not math.isfinite(per_row) or per_row <= 0 else 1.0 / per_row)
    return out


def baseline_plan(graph: ir.LayerGraph, table: ir.CostTable, kind: str,
                  max_parts: int | None = None) -> ir.Plan:
    """The routed, priced plan of baseline ``kind`` (see the module docstring)."""
    from partitioner.analysis.routing import route_plan

    if kind not in BASELINES:
        fail(f"--spatial-baseline {kind!r}: expected one of {', '.join(BASELINES)}")
    offload = _single_device_plan(graph, table)
    if kind == "offload":
        return offload
    rest = offload.stages[0].device
    assert rest is not None
    app = table.system.application
    source = app.source or rest
    devices = list(table.device_names)
    limit = max_parts or len(devices)
    runs = _splittable_runs(graph)
    if not runs:
        return offload
    if kind == "equal":
        first, last = runs[0]
        volumes = [(first, last)]
    elif kind == "aofl":
        volumes = [v for r in runs for v in _downsampling_volumes(graph, *r)]
    else:
        volumes = [(k, k) for r in runs for k in range(r[0], r[1] + 1)]
    if kind == "equal":
        volumes = volumes[:1]
    stages: list[ir.Stage] = []
    nxt = 0
    for first, last in volumes:
        if first == 0 and not app.source:
            continue  # the input must come from somewhere: the first stage is whole
        if first > nxt:
            stages.append(ir.Stage(rest, None, nxt, first - 1))
        vol = volume(graph, first, last)
        assert not isinstance(vol, str)
        if kind == "equal":
            chosen = devices[:limit]
            weights = [1.0] * len(chosen)
        else:
            speeds = (_linear_weights(graph, table, first, last, devices, source,
                                      network=kind != "proportional"))
            ranked = sorted(range(len(devices)), key=lambda k: -speeds[k])[:limit]
            chosen = [devices[k] for k in sorted(ranked)]
            weights = [speeds[k] for k in sorted(ranked)]
        rows = _bands(weights, vol.height)
        parts = _parts(chosen, rows)
        stages.append(ir.Stage(None, None, first, last, parts=parts)
                      if len(parts) > 1 else ir.Stage(parts[0].device, None, first, last))
        nxt = last + 1
    if nxt < len(graph.layers):
        stages.append(ir.Stage(rest, None, nxt, len(graph.layers) - 1))
    merged: list[ir.Stage] = []
    for s in stages:  # neighbouring whole stages on one device are one stage
        if merged and not s.parts and not merged[-1].parts and merged[-1].device == s.device:
            merged[-1] = ir.Stage(s.device, None, merged[-1].first, s.last)
        else:
            merged.append(s)
    plan = _hand_plan(table, merged)
    try:
        return route_plan(graph, table, plan)
    except InfeasibleError:
        return offload
