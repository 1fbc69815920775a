"""--quantize through the one pipeline on a real model (ONNX Runtime quantises and measures).

tiny_cnn with 4 candidates keeps every measurement well under a second.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from partitioner import pipeline
from partitioner.analysis.estimate import evaluate
from partitioner.analysis.system import parse_system
from partitioner.analysis.variants import predict_noise
from partitioner.frontend import load_model
from partitioner.frontend import quantize as Q

SYSTEM = {
    "device": [
        {"name": "device", "class": "edge", "flops": 2e8, "memory_bandwidth": 5e9,
         "network_bandwidth": 1e9, "power": 3.0},
        {"name": "edge", "class": "hub", "flops": 8e8, "memory_bandwidth": 1e10,
         "network_bandwidth": 1e9, "power": 15.0}],
    "link": [{"from": "device", "to": "edge", "bandwidth": 5e6, "latency": 0.005},
             {"from": "edge", "to": "device", "bandwidth": 20e6, "latency": 0.005}],
    "application": {"source": "device", "destination": "device"}}


@pytest.fixture(scope="module")
def prepared():
    import models

    return load_model(models.build_model("tiny_cnn"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def calibration(prepared):
    return Q.random_calibration(prepared, n=6, seed=1)


def _plan(prepared, calibration, **kw):
    return pipeline.plan(prepared, parse_system(SYSTEM, "sys.toml"), quantize=True,
                         quantize_layers=4, calibration=calibration, **kw)


def test_max_noise_zero_quantises_nothing_and_a_loose_cap_lowers_the_estimate(
        prepared, calibration) -> None:
    fp32 = pipeline.plan(prepared, parse_system(SYSTEM, "sys.toml"))
    zero = _plan(prepared, calibration, max_noise=0.0)
    assert all(not s.quantized for s in zero.plan.stages)
    assert zero.plan.estimate.latency == pytest.approx(fp32.plan.estimate.latency)
    assert zero.plan.estimate.noise == 0.0
    loose = _plan(prepared, calibration, max_noise=10.0)
    quantized = [k for s in loose.plan.stages for k in s.quantized]
    assert quantized
    assert loose.plan.estimate.latency < fp32.plan.estimate.latency
    assert loose.quant is not None and loose.quant.fit is not None
    measured = loose.quant.fit.measured
    conf = tuple(sorted(quantized))
    expected = measured[conf] if conf in measured else loose.quant.fit.predict(quantized)
    assert loose.plan.estimate.noise == pytest.approx(expected)
    assert loose.quant.fit.heldout_error is not None  # the fit reports its error


def test_a_second_plan_reads_the_noise_fit_from_the_cache(prepared, calibration) -> None:
    first = _plan(prepared, calibration, max_noise=0.05)
    second = _plan(prepared, calibration, max_noise=0.05)
    assert first.quant is not None and second.quant is not None
    assert (first.quant.from_cache, second.quant.from_cache) == (False, True)
    assert first.quant.fit == second.quant.fit
    other = Q.random_calibration(prepared, n=6, seed=2)
    third = _plan(prepared, other, max_noise=0.05)
    assert third.quant is not None and not third.quant.from_cache  # another digest


def test_plan_estimate_equals_the_best_of_brute_force_over_placement_and_q(
        prepared, calibration) -> None:
    result = _plan(prepared, calibration, max_noise=0.06)
    table, plan = result.table, result.plan
    v = table.variants
    assert v is not None and v.noise
    choices = [[d for d in table.device_names if p.allowed is None or d in p.allowed]
               for p in table.positions]
    too_noisy = {c for c, rho in v.checked if rho > 0.06}  # measured above the cap
    best = np.inf
    for placement in itertools.product(*choices):
        for r in range(len(v.candidates) + 1):
            for q in itertools.combinations(v.candidates, r):
                if predict_noise(v.noise, q) > 0.06 or q in too_noisy:
                    continue
                best = min(best, evaluate(table, placement, {}, quantized=q).latency)
    q_plan = [k for s in plan.stages for k in s.quantized]
    own = evaluate(table, plan.placement, plan.frequencies, quantized=q_plan)
    assert plan.estimate.latency == pytest.approx(best, rel=1e-9)
    # routing keeps the chain price on this chain-shaped model
    assert own.latency == pytest.approx(plan.estimate.latency, rel=1e-9)


def test_wire_savings_are_the_quantised_models_cut_sizes(prepared, calibration) -> None:
    result = _plan(prepared, calibration, max_noise=0.5)
    v = result.table.variants
    assert v is not None and any(v.wire.values())
    graph = prepared.graph
    outputs = {t.name for t in graph.outputs}
    at = {p.layer: p.index for p in result.table.positions if p.layer is not None}
    sets = [(k,) for k in v.candidates] + list(itertools.combinations(v.candidates, 2))
    for q in sets + [v.candidates]:
        variant = Q.quantize_model(prepared, q, calibration)
        for i in range(len(graph.layers) - 1):
            cut = graph.cut_after(i)
            if any(t in outputs for t in cut.tensors):
                continue  # model outputs are priced float32
            saved = cut.nbytes - variant.prepared.graph.cuts[i + 1].nbytes
            priced = sum(b for (j, trig), b in v.wire.items()
                         if j == at[i] and set(trig) & set(q))
            assert priced == saved, (q, i)


def _cli(*args: str):
    return subprocess.run([sys.executable, "-m", "partitioner", "plan", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra, message", [
    (["--max-noise", "0.1"], "--max-noise needs --quantize"),
    (["--quantize-layers", "2"], "--quantize-layers needs --quantize"),
    (["--quantize", "--max-noise", "-1"], "--max-noise -1.0: must be >= 0"),
    (["--quantize", "--quantize-layers", "nope"], "has no layer 'nope'"),
    (["--quantize", "--calibration", "missing.npz"], "missing.npz"),
])
def test_cli_errors_are_one_line(tmp_path, extra, message) -> None:
    import models

    model = tmp_path / "tiny.onnx"
    models.save_model("tiny_cnn", str(model))
    system = tmp_path / "sys.json"
    system.write_text(json.dumps(SYSTEM))
    done = _cli(str(model), "--system", str(system), *extra)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_compiled_bundle_explains_its_int8_layers(tmp_path, prepared, calibration) -> None:
    from partitioner.backend.explain import explain, format_text
    from stagebundle import load_bundle

    result = pipeline.compile(prepared, parse_system(SYSTEM, "sys.toml"), tmp_path / "b",
                              quantize=True, quantize_layers=4, calibration=calibration,
                              max_noise=10.0)
    quantized = [k for s in result.plan.stages for k in s.quantized]
    assert quantized
    doc = explain(load_bundle(tmp_path / "b"))
    assert sorted(k for s in doc["stages"] for k in s["quantized"]) == quantized
    text = format_text(doc)
    assert "int8 layers: " in text and "noise (predicted" in text
    names = [layer.name for layer in prepared.graph.layers]
    assert f"{quantized[0]} {names[quantized[0]]}" in text
    # the manifest's per-stage compute is the int8 price (timeline), adding up to the plan
    total = sum(s["estimate"]["compute"] for s in doc["stages"])
    assert total == pytest.approx(result.plan.estimate.compute, rel=1e-9)


def test_the_planned_int8_set_is_measured_within_the_cap(prepared, calibration) -> None:
    """check_noise: the set a solve picks is measured; one above the cap is cut off."""
    fit0 = _plan(prepared, calibration, max_noise=0.0)  # no fit: nothing measured yet
    assert fit0.quant is not None and fit0.quant.fit is None
    for cap in (0.03, 0.06, 0.2):
        result = _plan(prepared, calibration, max_noise=cap)
        q = tuple(k for s in result.plan.stages for k in s.quantized)
        assert result.quant is not None and result.quant.fit is not None
        measured = result.quant.fit.measured
        if q:
            assert q in measured and measured[q] <= cap
        v = result.table.variants
        assert v is not None and dict(v.checked) == measured


def test_estimate_noise_is_the_measured_noise_of_a_measured_set(prepared, calibration) -> None:
    """A least-squares fit need not pass through its design points: the plan's
    estimate.noise is the set's noise measured on the calibration inputs (the same
    NoiseMeter), not the fit, whenever the set was measured."""
    result = _plan(prepared, calibration, max_noise=10.0)
    q = tuple(sorted(k for s in result.plan.stages for k in s.quantized))
    assert q and result.quant is not None and result.quant.fit is not None
    fit = result.quant.fit
    assert q in fit.measured  # check_noise measured the chosen set
    again = Q.NoiseMeter(prepared, calibration, calibration).noise(q)
    assert result.plan.estimate.noise == pytest.approx(again, rel=1e-6)
    assert result.plan.estimate.noise == pytest.approx(fit.measured[q], rel=1e-12)
    # every measured set is priced by its measurement, an unmeasured one by the fit
    from partitioner.analysis.variants import plan_noise

    v = result.table.variants
    assert v is not None
    for conf, rho in fit.measured.items():
        assert plan_noise(v, conf) == (pytest.approx(rho), True)
    unmeasured = [c for r in range(1, len(v.candidates) + 1)
                  for c in itertools.combinations(v.candidates, r) if c not in fit.measured]
    for conf in unmeasured:
        assert plan_noise(v, conf) == (pytest.approx(fit.predict(conf)), False)
    assert plan_noise(v, ()) == (0.0, False)
