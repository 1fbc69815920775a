"""Per-layer int8 variants in the cost table (QUANT, SPEC §5), and what they change in a
plan's price.

A candidate layer ``k`` may run as its int8 variant (``q_k = 1``). Three things change:

* **compute** ``f(k,1)`` instead of ``f(k,0)``: the table stores the *saving*
  ``f(k,0) - f(k,1)`` per (layer, device, frequency). Analytic: the layer's fp32 compute
  (its single-layer bundle of the table) times ``1 - 1/s`` with ``s`` the int8 speed-up
  of the device's class (:data:`INT8_SPEEDUP`, documented below) or a given speed-up per
  device; measured: ``s`` is the speed-up the profiler measured for that layer on that
  device (:mod:`partitioner.analysis.int8_profile`, ``measure_int8``: fp32 / int8 time of
  the layer alone), applied to the table's own price of the layer, so a saving never
  exceeds what the table charges for the layer. A bundle with several
  int8 layers is priced as its measured fp32 price minus the sum of its layers' savings
  (additive: the profiler measures the error of that assumption on mixed bundles).
  The joules saved are the device's compute power times the seconds saved (None without
  a power figure: the energy then stays the fp32 one).
* **transfer** ``g'`` instead of ``g``: when the cut after a model layer crosses devices
  and a float32 tensor in it has a QuantizeLinear/DequantizeLinear pair, it travels as
  8-bit integers (the Q sits in the producing stage, the DQ in the readers'), 1/4 of the
  bytes. ONNX Runtime inserts the pair when the tensor's producer is int8 or when *any*
  of its readers is: a tensor's *triggers* are the candidates that each alone make it
  int8 (from the quantiser's variant of each single candidate), and it travels int8 iff
  one of them is (an OR, exact in the MIP). Saved bytes per (cut, triggers) are in the
  table; their time and energy follow the link model (:func:`wire_saving`, linear in
  the bytes). Cuts next to pseudo positions (source, destination) and model outputs stay
  float32.
* **noise**: ``estimate.noise`` of a plan is the noise of its int8 set *measured on the
  calibration inputs* when that set was measured (the fit's design: singles, pairs,
  random sets, held-out sets, and every set a solve chose, :func:`check_noise`), else the
  fitted polynomial ``eta(q)`` (:mod:`partitioner.analysis.noise`). A least-squares fit
  with pair terms does not pass through its design points (QUANT's quick run: a single
  layer of yolo_small measured 0.0033, fitted 0.0073), so the measurement is the honest
  figure where one exists (:func:`plan_noise`). The MIP's cap still uses ``eta`` plus the
  no-good cuts of measured sets above the cap: conservative for a measured set whose fit
  is above its measurement.

:func:`variant_delta` is the one definition of these savings for a placement; the cost
model (:func:`partitioner.analysis.estimate.evaluate`) subtracts it and the MIP
(:mod:`partitioner.solver.quant`) represents exactly the same terms.

Int8 speed-ups by device class (:data:`INT8_SPEEDUP`), an assumption for analytic
devices only: ``edge`` and ``hub`` CPUs 2.0 (int8 GEMM kernels with 4x narrower operands;
QUANT reports quantised layers faster on its CPU device and edge containers), ``cloud``
1.0 (a GPU running ONNX Runtime's QDQ graph gains nothing from int8 without TensorRT).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from partitioner import ir
from partitioner.analysis.energy import compute_power
from partitioner.errors import fail

if TYPE_CHECKING:
    import numpy as np

    from partitioner.analysis.estimate import Bundle
    from partitioner.analysis.noise import NoiseFit
    from partitioner.frontend import PreparedModel

__all__ = ["INT8_SPEEDUP", "VariantDelta", "build_variants", "wire_saving", "int8_tensors",
           "variant_delta", "predict_noise", "plan_noise", "quantized_layers", "wire_bytes",
           "QuantSetup", "attach_variants", "stage_savings", "report_lines", "bundle_saving",
           "check_noise"]

log = logging.getLogger("partitioner.variants")

INT8_SPEEDUP: Mapping[str, float] = {"edge": 2.0, "hub": 2.0, "cloud": 1.0}


def int8_tensors(graph: ir.LayerGraph, layer: int) -> tuple[str, ...]:
    """The tensors of ``layer`` that travel as int8 when it is quantised: its float32
    outputs that another layer reads (model outputs are delivered as float32)."""
    outputs = {t.name for t in graph.outputs}
    return tuple(t for t in graph.layers[layer].produces
                 if t not in outputs and t in graph.tensors
                 and graph.tensors[t].dtype == "float32")


def _int8_saving(t: ir.TensorInfo) -> int:
    """Bytes saved by sending float32 ``t`` as one byte per element."""
    return t.nbytes - t.nbytes // 4


def _layer_position(table: ir.CostTable) -> dict[int, int]:
    return {p.layer: p.index for p in table.positions if p.layer is not None}


def build_variants(table: ir.CostTable, graph: ir.LayerGraph, candidates: Iterable[int], *,
                   speedup: Mapping[str, float] | None = None,
                   measured: Mapping[tuple[int, str, str | None], float] | None = None,
                   checked: Sequence[tuple[tuple[int, ...], float]] = (),
                   triggers: Mapping[str, Collection[int]] | None = None,
                   noise: Sequence[ir.NoiseTerm] = (), noise_error: float | None = None
                   ) -> ir.VariantCosts:
    """The variant figures of ``candidates`` on ``table`` (see the module docstring).

    Args:
        table: the fp32 cost table.
        graph: its model.
        candidates: model layer indices that may run as int8.
        speedup: int8 speed-up per device *name* (overrides :data:`INT8_SPEEDUP` of its
            class), for analytic figures.
        measured: int8 speed-up (fp32 / int8 time) per ``(layer, device, frequency)``
            measured by the profiler; it replaces the analytic one where given.
        checked: configurations whose noise was measured after a solve (``(layers,
            rho)``); the MIP excludes those measured above its cap.
        triggers: per tensor, the candidates any of which makes it travel int8 (the
            quantiser's variants of single candidates); default: its producer when that
            is a candidate (:func:`int8_tensors`) and its candidate readers.
        noise / noise_error: the fitted noise polynomial and its held-out error.

    Raises:
        UserError: a candidate that is not a model layer, a speed-up that is not positive.
    """
    cands = tuple(sorted(set(candidates)))
    where = _layer_position(table)
    for k in cands:
        if k not in where:
            fail(f"quantisation candidate {k} is not a layer of {graph.name} "
                 f"(0..{len(graph.layers) - 1})")
    speedup = dict(speedup or {})
    for name, s in speedup.items():
        if not s > 0:
            fail(f"int8 speed-up of device {name!r} must be > 0, got {s}")
    compute: dict[tuple[int, str, str | None], tuple[float, float | None]] = {}
    for dev in table.system.devices:
        s = speedup.get(dev.name, INT8_SPEEDUP.get(dev.device_class, 1.0))
        for f in table.frequencies.get(dev.name, (None,)):
            power = compute_power(dev, f)
            for k in cands:
                single = table.bundles.get((where[k], where[k], dev.name, f))
                if single is None:
                    continue  # the layer may not run there (pins)
                factor = s
                if measured is not None and (k, dev.name, f) in measured:
                    factor = measured[(k, dev.name, f)]
                    if not factor > 0:
                        fail(f"measured int8 speed-up of layer {k} on {dev.name!r} must be "
                             f"> 0, got {factor}")
                dt = single.compute * (1.0 - 1.0 / factor)
                compute[(k, dev.name, f)] = (dt, None if power is None else power * dt)
    # model outputs are priced as float32 wherever they go (an upper bound on their bytes)
    outputs = {t.name for t in graph.outputs}
    if triggers is None:
        found: dict[str, set[int]] = {}
        for k in cands:
            for t in int8_tensors(graph, k):
                found.setdefault(t, set()).add(k)
        for layer in graph.layers:
            if layer.index in cands:
                for t in layer.consumes:
                    found.setdefault(t, set()).add(layer.index)
        triggers = found
    trig = {t: tuple(sorted(set(ks) & set(cands))) for t, ks in triggers.items()
            if t not in outputs and t in graph.tensors
            and graph.tensors[t].dtype == "float32" and set(ks) & set(cands)}
    wire: dict[tuple[int, tuple[int, ...]], int] = {}
    pos = table.positions
    for j in range(len(pos) - 1):
        after = pos[j].layer
        if after is None or pos[j + 1].kind != "layer":
            continue
        for t in graph.cut_after(after).tensors:
            if t in trig:
                wire[(j, trig[t])] = wire.get((j, trig[t]), 0) + _int8_saving(graph.tensors[t])
    source = "measured" if measured else "analytic"
    return ir.VariantCosts(candidates=cands, compute=compute, wire=wire,
                           int8_triggers=trig,
                           noise=tuple(noise),
                           noise_error=noise_error, source=source,
                           checked=tuple((tuple(sorted(c)), float(r)) for c, r in checked))


def wire_saving(system: ir.System, src: str, dst: str, nbytes: int) -> ir.TransferCost:
    """Time and energy saved by sending ``nbytes`` fewer from ``src`` to ``dst``: the link
    model is linear in the bytes (its per-transfer latency is paid either way)."""
    from partitioner.analysis.costs import network_transfer

    a, b = system.device(src), system.device(dst)
    full, empty = network_transfer(system, a, b, nbytes), network_transfer(system, a, b, 0)
    if full is None or empty is None:
        return ir.TransferCost(time=0.0)

    def less(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else x - y

    return ir.TransferCost(time=full.time - empty.time,
                           sender_energy=less(full.sender_energy, empty.sender_energy),
                           receiver_energy=less(full.receiver_energy, empty.receiver_energy))


def predict_noise(terms: Iterable[ir.NoiseTerm], quantized: Collection[int]) -> float:
    """``eta(q)``: the sum of the monomials whose layers are all int8."""
    q = set(quantized)
    return float(sum(t.coef for t in terms if set(t.layers) <= q))


def plan_noise(variants: ir.VariantCosts, quantized: Collection[int]) -> tuple[float, bool]:
    """The noise of the int8 set ``quantized``: ``(rho, True)`` measured on the
    calibration inputs when the set was measured (``VariantCosts.checked``), else
    ``(eta, False)`` from the fit; nothing int8 is no noise."""
    conf = tuple(sorted(set(quantized)))
    if not conf:
        return 0.0, False
    for measured_conf, rho in variants.checked:
        if tuple(measured_conf) == conf:
            return float(rho), True
    return (predict_noise(variants.noise, conf) if variants.noise else 0.0), False


@dataclass
class VariantDelta:
    """What the int8 layers of a placement save (subtract from the fp32 estimate)."""

    compute: float = 0.0
    communication: float = 0.0
    busy: dict[str, float] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)
    noise: float | None = None


def _check(variants: ir.VariantCosts | None, quantized: Collection[int]) -> None:
    cands = set(variants.candidates) if variants is not None else set()
    extra = sorted(set(quantized) - cands)
    if extra:
        fail(f"layer {extra[0]} is marked int8 but is not a quantisation candidate "
             f"({', '.join(map(str, sorted(cands))) or 'none'})")


def variant_delta(table: ir.CostTable, bundles: Sequence[Bundle],
                  frequencies: Mapping[str, str | None], quantized: Collection[int], *,
                  chain: bool = True) -> VariantDelta:
    """The savings of the int8 ``quantized`` layers for a canonically split placement.

    ``chain``: price the cuts between devices as the chain's transfers (False when routed
    messages price them; their bytes already count int8 tensors, :func:`wire_bytes`).
    """
    v = table.variants
    _check(v, quantized)
    out = VariantDelta()
    if v is None:
        return out
    out.noise = plan_noise(v, quantized)[0]
    q = set(quantized)
    if not q:
        return out
    pos = table.positions
    for idx, b in enumerate(bundles):
        dt, de = bundle_saving(table, b.first, b.last, b.device, frequencies.get(b.device), q)
        out.compute += dt
        out.busy[b.device] = out.busy.get(b.device, 0.0) + dt
        if de is not None:
            out.energy[b.device] = out.energy.get(b.device, 0.0) + de
        if not chain or idx + 1 >= len(bundles):
            continue
        nxt = bundles[idx + 1]
        if nxt.device == b.device or pos[b.last].kind != "layer" \
                or pos[nxt.first].kind != "layer":
            continue
        for (j, trig), nbytes in v.wire.items():
            if j != b.last or not q & set(trig):
                continue
            tr = wire_saving(table.system, b.device, nxt.device, nbytes)
            out.communication += tr.time
            out.busy[b.device] = out.busy.get(b.device, 0.0) + tr.time
            for end, e in ((b.device, tr.sender_energy), (nxt.device, tr.receiver_energy)):
                if e is not None:
                    out.energy[end] = out.energy.get(end, 0.0) + e
    return out


def bundle_saving(table: ir.CostTable, first: int, last: int, device: str, freq: str | None,
                  quantized: Collection[int]) -> tuple[float, float | None]:
    """Seconds (and joules, None if unknown) the int8 layers save in the bundle of
    positions ``first..last`` on ``device``: the sum of their savings (additive)."""
    v = table.variants
    if v is None or not quantized:
        return 0.0, None
    where = _layer_position(table)
    seconds, joules = 0.0, None
    for k in quantized:
        if first <= where[k] <= last:
            dt, de = v.compute.get((k, device, freq), (0.0, None))
            seconds += dt
            if de is not None:
                joules = (joules or 0.0) + de
    return seconds, joules


def quantized_layers(plan: ir.Plan) -> tuple[int, ...]:
    """Every layer a plan runs as int8."""
    return tuple(sorted(k for s in plan.stages for k in s.quantized))


def wire_bytes(graph: ir.LayerGraph, plan: ir.Plan, table: ir.CostTable | None = None
               ) -> dict[str, ir.TensorInfo]:
    """The graph's tensors as they travel under ``plan``: int8 outputs of its int8 layers
    are one byte per element (routing prices messages with these)."""
    tensors = dict(graph.tensors)
    q = set(quantized_layers(plan))
    if table is not None and table.variants is not None:
        names = [t for t, ks in table.variants.int8_triggers.items() if q & set(ks)]
    else:
        names = [t for k in q for t in int8_tensors(graph, k)]
    for name in names:
        t = tensors.get(name)
        if t is None or t.dtype != "float32":
            continue  # the variant's own graph already names its int8 tensors
        tensors[name] = ir.TensorInfo(t.name, t.shape, "uint8", t.nbytes // 4)
    return tensors


def stage_savings(table: ir.CostTable, plan: ir.Plan) -> list[float]:
    """Compute seconds each stage saves by its int8 layers (the plan report's times)."""
    v = table.variants
    out = [0.0] * len(plan.stages)
    if v is None:
        return out
    for i, st in enumerate(plan.stages):
        for k in st.quantized:
            for dev in st.devices:
                out[i] += v.compute.get((k, dev, plan.frequencies.get(dev)), (0.0, None))[0]
    return out


def report_lines(table: ir.CostTable, plan: ir.Plan, names: Sequence[str]) -> list[str]:
    """The plan report's lines on int8 layers and predicted noise (none without variants)."""
    v = table.variants
    if v is None:
        return []
    q = quantized_layers(plan)
    shown = ", ".join(f"{k} {names[k]}" for k in q) or "none"
    lines = [f"int8 layers ({len(q)} of {len(v.candidates)} candidates): {shown}"]
    noise = plan.estimate.noise
    if noise is not None:
        if plan_noise(v, q)[1]:
            lines.append(f"noise (mean |o - o_q|) {noise:.4g}, measured on the calibration "
                         "inputs")
        else:
            err = "" if v.noise_error is None else f", fit error {v.noise_error:.3g} held out"
            lines.append(f"noise (predicted mean |o - o_q|) {noise:.4g}{err}")
    return lines


# --------------------------------------------------------------------------- pipeline hook


@dataclass(frozen=True)
class QuantSetup:
    """What ``--quantize`` measured: the candidates, the calibration it used, the fit."""

    candidates: tuple[int, ...]
    calibration: Mapping[str, np.ndarray]
    calibration_file: str | None
    fit: NoiseFit | None
    from_cache: bool
    key: Mapping[str, Any] = field(default_factory=dict)
    rounds: int = 0  # configurations measured after a solve (check_noise)


def attach_variants(prepared: PreparedModel, table: ir.CostTable, *,
                    layers: int | str | Sequence[str] = 12,
                    calibration: str | Path | Mapping[str, np.ndarray] | None = None,
                    fit_noise_model: bool = True, degree: int = 2, seed: int = 0,
                    speedup: Mapping[str, float] | None = None,
                    measured: Mapping[tuple[int, str, str | None], float] | None = None
                    ) -> tuple[ir.CostTable, QuantSetup]:
    """``table`` with the int8 variants of the candidate layers, and the noise fit.

    Args:
        prepared: the front end's model.
        table: its fp32 cost table.
        layers: ``--quantize-layers`` (K heaviest, or names).
        calibration: ``--calibration`` file (or loaded arrays); None: seeded random
            data, with a warning that the noise figures are then meaningless.
        fit_noise_model: measure and fit the noise (False with ``--max-noise 0``, which
            quantises nothing anyway).
        degree / seed: of the noise polynomial and its design.
        speedup / measured: int8 compute figures (see :func:`build_variants`).
    """
    from partitioner.analysis import noise
    from partitioner.frontend import quantize as quant

    graph = prepared.graph
    cands = quant.candidate_layers(graph, layers)
    if calibration is None:
        log.warning("--quantize without --calibration: calibrating and measuring noise on "
                    "seeded random inputs; the noise figures are meaningless for real data")
        arrays: Mapping[str, Any] = quant.random_calibration(prepared)
        file = None
    elif isinstance(calibration, (str, Path)):
        arrays, file = quant.load_calibration(calibration, prepared), str(calibration)
    else:
        arrays, file = calibration, None
    # the tensors each single candidate makes int8 (the quantiser's own rule; these
    # variants are the noise design's singles, so they are made once)
    triggers: dict[str, set[int]] | None = None
    if fit_noise_model:
        triggers = {}
        for k in cands:
            for name in quant.quantize_model(prepared, [k], arrays).int8_of:
                triggers.setdefault(name, set()).add(k)
    fit = None
    hit = False
    if fit_noise_model:
        key = {"model": graph.sha256, "granularity": graph.granularity,
               "shapes": sorted([k, list(v)] for k, v in prepared.shapes.items()),
               "calibration": quant.calibration_digest(arrays), "candidates": list(cands),
               "degree": degree, "seed": seed}

        def measure() -> NoiseFit:
            meter = quant.NoiseMeter(prepared, arrays, arrays)
            log.info("measuring the noise of int8 variants of %d layers", len(cands))
            return noise.fit_noise(meter.noise, cands, degree=degree, seed=seed)

        fit, hit = noise.cached_fit(key, measure)
    variants = build_variants(table, graph, cands, speedup=speedup, measured=measured,
                              triggers=triggers, noise=fit.terms if fit else (),
                              noise_error=fit.heldout_error if fit else None,
                              checked=tuple(fit.measured.items()) if fit else ())
    return (dataclasses.replace(table, variants=variants),
            QuantSetup(cands, arrays, file, fit, hit, key if fit else {}))


def _with_fit(table: ir.CostTable, fit: NoiseFit) -> ir.CostTable:
    v = table.variants
    assert v is not None
    return dataclasses.replace(table, variants=dataclasses.replace(
        v, noise=fit.terms, noise_error=fit.heldout_error,
        checked=tuple(fit.measured.items())))


def check_noise(prepared: PreparedModel, table: ir.CostTable, setup: QuantSetup,
                plan: ir.Plan, solve: Any, *, rounds: int = 8
                ) -> tuple[ir.Plan, ir.CostTable, QuantSetup]:
    """Measure the noise of the int8 set a solve chose, refit, and solve again.

    The solver seeks the configurations the fit underestimates (more so the more int8
    layers, far from the measured singles and pairs), so the chosen set is measured on
    the calibration inputs; it joins the fit's data (the polynomial is refitted) and the
    measured set itself is cut off when it is above the cap (``VariantCosts.checked``).
    This repeats until a solve picks a set already measured (hence within the cap) or
    nothing int8, at most ``rounds`` times; the refitted fit is cached.
    """
    from partitioner.analysis import noise
    from partitioner.frontend import quantize as quant

    fit = setup.fit
    if fit is None:
        return plan, table, setup
    meter = None
    done = 0
    for _ in range(rounds):
        chosen = quantized_layers(plan)
        if not chosen or chosen in fit.measured:
            break
        if meter is None:
            meter = quant.NoiseMeter(prepared, setup.calibration, setup.calibration)
        rho = meter.noise(chosen)
        log.info("int8 layers %s: measured noise %.4g, predicted %.4g", list(chosen), rho,
                 plan.estimate.noise or 0.0)
        fit = fit.with_point(chosen, rho)
        done += 1
        table = _with_fit(table, fit)
        plan = solve(table)
    else:
        if quantized_layers(plan) and quantized_layers(plan) not in fit.measured:
            log.warning("noise check: the last plan's int8 set is not measured after %d "
                        "rounds", rounds)
    if done:
        noise.store_fit(setup.key, fit)
    return plan, table, dataclasses.replace(setup, fit=fit, rounds=setup.rounds + done)
