"""The MIP with per-layer int8 variants against brute force over (placement, q).

Random small cost tables (:mod:`partitioner.solver.synthetic`) get random variant figures
(compute savings, some negative: a slower int8 layer; wire savings on layer-layer cuts;
a noise polynomial with single and pair terms, some pair terms negative). Every
placement, frequency choice and subset of candidates is priced with ``evaluate`` (the
cost model, independent of the MIP) and filtered by the caps; the solver must reach the
same optimum, and its estimate must be ``evaluate`` of its own (placement, q).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest

from partitioner import ir
from partitioner.analysis.estimate import edge_energy
from partitioner.analysis.variants import predict_noise
from partitioner.errors import InfeasibleError
from partitioner.solver import evaluate, solve
from partitioner.solver.synthetic import TableSpec, random_table
from tests.test_solver_bruteforce import objective_value as value


def with_variants(table: ir.CostTable, seed: int, candidates: int = 3) -> ir.CostTable:
    rnd = random.Random(seed)
    layers = [p.layer for p in table.positions if p.layer is not None]
    cands = tuple(sorted(rnd.sample(layers, min(candidates, len(layers)))))
    names = table.device_names
    links = tuple(ir.Link(a, b, rnd.uniform(1e4, 1e5), 0.001, up_alpha=1.0, down_alpha=0.5,
                          beta=0.1, up_mbps=1.0, down_mbps=1.0)
                  for a, b in itertools.combinations(names, 2))
    system = dataclasses.replace(table.system, links=links)
    # cheap sends between devices, so that plans split and the g' terms matter
    table = dataclasses.replace(table, transfers={
        key: t if key[1] == key[2] else dataclasses.replace(t, time=t.time * 0.05)
        for key, t in table.transfers.items()})
    compute = {}
    at = {p.layer: p.index for p in table.positions if p.layer is not None}
    for k in cands:
        for d in names:
            for f in table.frequencies[d]:
                # a saving is a share of the layer's own price (negative: slower int8)
                own = table.bundles[(at[k], at[k], d, f)]
                dt = own.compute * rnd.uniform(-0.3, 0.7)
                de = None if own.energy is None or rnd.random() < 0.3 else own.energy * (
                    dt / own.compute)
                compute[(k, d, f)] = (dt, de)
    pos = table.positions
    # tensors int8 when one layer is (its producer), or when any of two is (a reader too);
    # all of a cut's savings stay below its cheapest transfer (a saving is part of a send)
    slowest = min(k.bandwidth for k in links) if links else 1.0
    wire = {}
    for j in range(len(pos) - 1):
        if pos[j].kind != "layer" or pos[j + 1].kind != "layer" or pos[j].layer is None:
            continue
        keys = [t for t in [(k,) for k in cands] + list(itertools.combinations(cands, 2))
                if pos[j].layer >= t[0] and rnd.random() < 0.5]
        sends = [t.time for (c, a, b), t in table.transfers.items() if c == j and a != b]
        budget = 0.9 * min(sends, default=0.0) * slowest / max(len(keys), 1)
        wire.update({(j, t): max(1, int(budget * rnd.uniform(0.2, 1.0))) for t in keys})
    noise = [ir.NoiseTerm((k,), rnd.uniform(0.01, 0.1)) for k in cands]
    noise += [ir.NoiseTerm(pair, rnd.uniform(-0.01, 0.03))
              for pair in itertools.combinations(cands, 2)]
    variants = ir.VariantCosts(candidates=cands, compute=compute, wire=wire,
                               noise=tuple(noise))
    return dataclasses.replace(table, system=system, variants=variants)


def enumerate_plans(table: ir.CostTable, objective: ir.Objective):
    names = table.device_names
    v = table.variants
    assert v is not None
    choices = [[d for d in names if p.allowed is None or d in p.allowed]
               for p in table.positions]
    subsets = [c for r in range(len(v.candidates) + 1)
               for c in itertools.combinations(v.candidates, r)]
    if objective.max_noise == 0:
        subsets = [()]
    out = []
    for placement in itertools.product(*choices):
        used = sorted(set(placement))
        for fs in itertools.product(*(table.frequencies[d] for d in used)):
            freqs = dict(zip(used, fs, strict=True))
            for q in subsets:
                if objective.max_noise is not None and \
                        predict_noise(v.noise, q) > objective.max_noise + 1e-12:
                    continue
                try:
                    est = evaluate(table, placement, freqs, quantized=q)
                except InfeasibleError:
                    continue
                if objective.max_latency is not None and est.latency > objective.max_latency:
                    continue
                if any(est.energy.get(d, 0.0) > cap for d, cap in objective.max_energy.items()):
                    continue
                out.append((placement, freqs, q, est))
    return out


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


CASES = [(kind, seed) for kind in ("latency", "energy", "throughput", "carbon", "weighted")
         for seed in range(4)]


@pytest.mark.parametrize("kind, seed", CASES)
def test_solve_with_variants_matches_brute_force(kind: str, seed: int) -> None:
    rnd = random.Random(seed)
    spec = TableSpec(layers=3 + seed % 2, devices=2 + seed % 2, mbs=2, spread=0.3,
                     source=True, destination=seed % 2 == 0)
    table = with_variants(random_table(spec, seed), seed)
    assert table.variants is not None
    single = [t.coef for t in table.variants.noise if len(t.layers) == 1]
    cap = rnd.choice([None, sorted(single)[1] * 1.01, 0.05])
    base = ir.Objective(kind=kind, max_noise=cap)  # type: ignore[arg-type]
    plans = enumerate_plans(table, base)
    max_latency = None
    if seed == 3:  # a latency cap that binds
        lat = sorted(e.latency for *_, e in plans)
        max_latency = lat[len(lat) // 3]
    objective = dataclasses.replace(base, max_latency=max_latency)
    plans = enumerate_plans(table, objective)
    assert plans
    bounds = None
    if kind == "weighted":
        lat = [e.latency for *_, e in plans]
        en = [edge_energy(table, e.energy) for *_, e in plans]
        bounds = [(min(lat), max(lat)), (min(en), max(en))]
    best = min(value(table, kind, e, bounds) for *_, e in plans)
    plan = solve(table, objective)
    quantized = tuple(k for s in plan.stages for k in s.quantized)
    again = evaluate(table, plan.placement, plan.frequencies, quantized=quantized,
                     duration=table.system.application.duration)
    assert plan.estimate == again
    assert close(value(table, kind, plan.estimate, bounds), best), \
        (value(table, kind, plan.estimate, bounds), best)
    assert plan.estimate.noise == pytest.approx(predict_noise(table.variants.noise, quantized))
    if cap is not None:
        assert plan.estimate.noise <= cap + 1e-9


def test_max_noise_zero_quantises_nothing_even_when_the_fit_goes_negative() -> None:
    table = with_variants(random_table(TableSpec(layers=3, devices=2, mbs=3), 5), 5)
    v = table.variants
    assert v is not None
    # a fit that predicts negative noise for every configuration
    negative = tuple(ir.NoiseTerm(t.layers, -abs(t.coef)) for t in v.noise)
    table = dataclasses.replace(table, variants=dataclasses.replace(v, noise=negative))
    loose = solve(table, ir.Objective(max_noise=1.0))
    assert any(s.quantized for s in loose.stages)  # int8 is worth it here ...
    plan = solve(table, ir.Objective(max_noise=0.0))
    assert all(not s.quantized for s in plan.stages)  # ... and still off under cap 0
    fp32 = solve(dataclasses.replace(table, variants=None))
    assert plan.estimate.latency == pytest.approx(fp32.estimate.latency)
    assert loose.estimate.latency < plan.estimate.latency


@pytest.mark.parametrize("seed", range(3))
def test_cubic_noise_terms_are_represented_exactly(seed: int) -> None:
    """Degree-3 monomials (one product variable each) under a cap that makes them bind:
    every int8 layer saves time, and the cap admits all of them only if the triple terms
    were ignored, so a wrong linearisation picks a plan whose true noise breaks the cap."""
    table = with_variants(random_table(TableSpec(layers=4, devices=2, mbs=2), seed), seed,
                          candidates=4)
    v = table.variants
    assert v is not None
    faster = {key: (abs(dt) + 1e-3, de) for key, (dt, de) in v.compute.items()}
    lower = tuple(t for t in v.noise if len(t.layers) == 1) + tuple(
        ir.NoiseTerm(t.layers, abs(t.coef)) for t in v.noise if len(t.layers) == 2)
    triples = tuple(ir.NoiseTerm(t, 0.05) for t in itertools.combinations(v.candidates, 3))
    table = dataclasses.replace(table, variants=dataclasses.replace(
        v, compute=faster, noise=lower + triples))
    cap = predict_noise(lower, v.candidates)  # all four fit only without the triples
    objective = ir.Objective(max_noise=cap)
    best = min(e.latency for *_, e in enumerate_plans(table, objective))
    plan = solve(table, objective)
    assert close(plan.estimate.latency, best)
    assert plan.estimate.noise <= cap + 1e-9
    assert len([k for s in plan.stages for k in s.quantized]) < 4  # all four: too noisy


@pytest.mark.parametrize("seed", range(6))
def test_the_mip_objective_is_the_estimate_of_its_plan(seed: int) -> None:
    """The formulation's own optimum (not only the plan it returns) equals brute force:
    a term the MIP mis-represents (a saving without its int8 layer) would show here."""
    from partitioner.solver.network import build_network
    from partitioner.solver.quant import QuantFormulation

    table = with_variants(random_table(TableSpec(layers=4, devices=3, mbs=2), seed), seed)
    cap = 0.08
    form = QuantFormulation(build_network(table), table, integer=True, max_noise=cap)
    result = form.optimize(form.latency)
    placement, freqs, q = form.extract()
    best = min(e.latency for *_, e in enumerate_plans(table, ir.Objective(max_noise=cap)))
    assert close(result.value, best)
    assert close(evaluate(table, placement, freqs, quantized=q).latency, best)
