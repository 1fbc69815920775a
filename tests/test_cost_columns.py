"""The columnar profile and cost-table path (issue 16): the same prices as the per-bundle
rules of SPEC §3, the same errors, and a Mapping like the dict it replaces."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from partitioner.analysis.costs import build_cost_table, covered_mbs
from partitioner.analysis.profile_columns import BundleColumns, columns_from_entries
from partitioner.analysis.profiles import Profile, ProfiledBundle, read_profile
from partitioner.analysis.system import parse_system
from partitioner.errors import UserError
from partitioner.ir import BundleCost, Cut, Layer, LayerGraph, TensorInfo
from partitioner.ir.prices import BundlePrices
from partitioner.solver.runs import run_arrays


def chain(n: int, rng: random.Random) -> LayerGraph:
    inp = TensorInfo("x", (1, 8), "float32", 32)
    tensors = {"x": inp}
    layers, cuts = [], [Cut(-1, ("x",), inp.nbytes)]
    for k in range(n):
        nbytes = rng.randrange(4, 4000, 4)
        t = TensorInfo(f"t{k}", (nbytes // 4,), "float32", nbytes)
        tensors[t.name] = t
        wbytes = rng.choice((0, rng.randrange(4, 10**6, 4)))
        layers.append(Layer(index=k, name=f"l{k}", ops=("MatMul",), nodes=(k,),
                            flops=rng.randrange(1, 10**9), weight_count=wbytes // 4,
                            weight_bytes=wbytes, output_bytes=nbytes, cut_bytes=nbytes))
        cuts.append(Cut(k, (t.name,), nbytes))
    return LayerGraph(name="chain", sha256="cd" * 32, granularity="major",
                      layers=tuple(layers), cuts=tuple(cuts), inputs=(inp,),
                      outputs=(tensors[f"t{n - 1}"],), tensors=tensors)


def system(rng: random.Random, pins: bool):
    devices = []
    for k, cls in enumerate(("edge", "hub", "cloud")):
        d = {"name": f"d{k}", "class": cls, "flops": rng.uniform(1e9, 1e12),
             "memory_bandwidth": rng.uniform(1e9, 1e11), "network_bandwidth": 1e8,
             "power": rng.uniform(1, 200), "trusted": k == 0}
        if k == 1:
            d["frequencies"] = ["lo", "hi"]
            d["frequency_flops"] = [d["flops"] / 2, d["flops"]]
        devices.append(d)
    doc = {"device": devices, "link": [{"between": ["d0", "d1"], "bandwidth": 1e7},
                                       {"between": ["d1", "d2"], "bandwidth": 1e7}]}
    if pins:
        doc["application"] = {"source": "d0", "destination": "d0", "preprocess_flops": 1e6}
    return parse_system(doc, "random.toml")


def rule_price(table, graph, i: int, j: int, device, freq, profile) -> BundleCost:
    """SPEC §3 for one bundle, written out: sums over its positions, then the device."""
    from partitioner.analysis.energy import compute_flops, compute_power

    pos = table.positions[i:j + 1]
    bw = device.memory_bandwidth
    power = compute_power(device, freq)
    internal = sum(graph.cut_after(p.layer).nbytes for p in pos[:-1]) if pos[0].layer \
        is not None else 0
    if profile is not None and pos[0].kind == "layer":
        have = {(b.first, b.last, b.frequency): b for b in profile.bundles}
        b = have.get((pos[0].layer, pos[-1].layer, freq))
        if b is not None:
            lat, en = b.latency, b.energy
        else:
            singles = [have[(p.layer, p.layer, freq)] for p in pos]
            lat = sum(s.latency for s in singles) + internal / bw
            en = None if any(s.energy is None for s in singles) else sum(
                s.energy for s in singles)
        return BundleCost(compute=lat, energy=power * lat if en is None and power else en)
    flops = 0.0
    for p in pos:
        flops += _flops(graph, table, p)
    weights = sum(p.weight_bytes for p in pos)
    compute = flops / compute_flops(device, freq)
    hidden = pos[0].weight_bytes / bw if table.preload and pos[0].kind == "layer" else 0.0
    energy = None if power is None else power * (compute + weights / bw + internal / bw)
    return BundleCost(compute=compute, weight_loading=weights / bw, internal=internal / bw,
                      hidden=hidden, energy=energy)


def _flops(graph, table, p) -> float:
    if p.kind == "layer":
        return float(graph.layers[p.layer].flops)
    return float(table.system.application.preprocess_flops or 0.0) \
        if p.kind == "preprocess" else 0.0


def legal_keys(table, mbs: int):
    """Every (i, j) a device may run as one bundle: pins, pseudo positions alone, MBS."""
    out = []
    n = len(table.positions)
    for d in table.system.devices:
        for f in table.frequencies[d.name]:
            for i, p in enumerate(table.positions):
                for j in range(i, n):
                    run = table.positions[i:j + 1]
                    if any(q.allowed is not None and d.name not in q.allowed for q in run):
                        break
                    if j > i and (p.kind != "layer" or run[-1].kind != "layer"):
                        break
                    if p.kind == "layer" and j - i + 1 > mbs:
                        break
                    out.append((i, j, d.name, f))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_every_bundle_is_priced_by_the_rule(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randrange(3, 9)
    graph = chain(n, rng)
    sysm = system(rng, pins=seed % 2 == 0)
    mbs = rng.randrange(1, n + 1)
    lazy = seed % 3 == 0
    spans = [(a, b) for a in range(n) for b in range(a, n) if b - a < (1 if lazy else mbs)]
    if lazy:
        spans.append((0, 1))
    bundles = tuple(ProfiledBundle(a, b, None, rng.uniform(1e-3, 1e-1),
                                   None if rng.random() < 0.4 else rng.uniform(0, 5))
                    for a, b in spans)
    prof = Profile(device="d2", sha256=graph.sha256, granularity="major",
                   layers=tuple(layer.name for layer in graph.layers), runs=5, trim=0.1,
                   bundles=bundles, lazy=lazy)
    table = build_cost_table(graph, sysm, profiles=[prof], mbs=mbs,
                             private=rng.randrange(0, 2), preload=seed % 4 != 1)
    assert isinstance(table.bundles, BundlePrices)
    assert list(table.bundles) == legal_keys(table, mbs)
    devices = {d.name: d for d in sysm.devices}
    for (i, j, d, f), cost in table.bundles.items():
        want = rule_price(table, graph, i, j, devices[d], f, prof if d == "d2" else None)
        for field in ("compute", "weight_loading", "internal", "hidden"):
            assert getattr(cost, field) == pytest.approx(getattr(want, field), rel=1e-12), \
                (i, j, d, f, field)
        assert (cost.energy is None) == (want.energy is None)
        if want.energy is not None:
            assert cost.energy == pytest.approx(want.energy, rel=1e-12)
    # the solver's run arrays read the columns as they read the dict
    as_dict = replace(table, bundles=dict(table.bundles.items()))
    a, b = run_arrays(table), run_arrays(as_dict)
    assert np.array_equal(a.time, b.time) and np.array_equal(a.energy, b.energy)


def test_bundle_prices_behave_as_a_mapping() -> None:
    rng = random.Random(7)
    graph = chain(4, rng)
    table = build_cost_table(graph, system(rng, pins=True))
    prices = table.bundles
    as_dict = dict(prices.items())
    assert prices == as_dict and len(prices) == len(as_dict)
    key = next(iter(as_dict))
    assert key in prices and prices[key] == as_dict[key] and prices.get(key) == as_dict[key]
    for missing in ((99, 99, "d0", None), (1, 1, "nope", None), (2, 2, "d1", "mid"),
                    ("2", 2, "d1", "lo"), (2, 2, "d1"), "x"):
        assert missing not in prices and prices.get(missing) is None  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        prices[(99, 99, "d0", None)]
    with pytest.raises(ValueError, match="sorted"):
        BundlePrices.concatenate(("a",), ((None,),), [
            {"first": np.array([1, 0]), "last": np.array([1, 0]), "device": np.zeros(2),
             "freq": np.zeros(2), "compute": np.ones(2), "weight_loading": np.zeros(2),
             "internal": np.zeros(2), "hidden": np.zeros(2), "energy": np.ones(2)}])


def _entries(rng: random.Random, n: int) -> list[dict]:
    out = []
    for a in range(n):
        for b in range(a, n):
            e = {"first": a, "last": b, "frequency": rng.choice(("lo", "hi")),
                 "latency": rng.uniform(1e-4, 1)}
            if rng.random() < 0.5:
                e["energy"] = rng.choice((None, 0, rng.uniform(0, 3)))
            if rng.random() < 0.3:
                e = dict(reversed(list(e.items())))  # another writer's key order
            out.append(e)
    return out


def test_profile_columns_read_what_the_entries_say(tmp_path: Path) -> None:
    rng = random.Random(3)
    entries = _entries(rng, 6)
    cols = columns_from_entries(entries, 6)
    assert isinstance(cols, BundleColumns) and len(cols) == len(entries)
    for e, b in zip(entries, cols, strict=True):
        assert (b.first, b.last, b.frequency, b.latency) == (
            e["first"], e["last"], e["frequency"], e["latency"])
        assert b.energy == (None if e.get("energy") is None else float(e["energy"]))
        assert b.std is None
    uniform = [{"first": e["first"], "last": e["last"], "latency": e["latency"]}
               for e in entries]
    same_keys = columns_from_entries(uniform, 6)
    assert same_keys is not None and same_keys.labels == (None,)
    # a file read back equals the profile written, and its bundles are columns
    doc = {"device": "d0", "model": {"sha256": "ab" * 32, "layers": [f"l{k}" for k in range(6)]},
           "runs": 5, "trim": 0.1, "bundles": entries}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    prof = read_profile(tmp_path / "p.json")
    assert isinstance(prof.bundles, BundleColumns)
    assert prof.bundles == tuple(prof.bundles) and prof.frequencies == cols.present_labels()


@pytest.mark.parametrize("bad, message", [
    ({"first": 0, "last": 0, "latency": math.nan}, r"bundles\[1\]\.latency must be a positive"),
    ({"first": 0, "last": 0, "latency": 1.0, "energy": math.nan},
     r"bundles\[1\]\.energy must be a non-negative"),
    ({"first": 0, "last": 0, "latency": 1.0, "energy": -1},
     r"bundles\[1\]\.energy must be a non-negative"),
    ({"first": True, "last": 0, "latency": 1.0}, r"bundles\[1\]\.first must be an integer"),
    ({"first": 0, "last": 7, "latency": 1.0}, r"bundles\[1\]: layers 0\.\.7 outside 0\.\.1"),
    ({"first": 0, "last": 1}, r"bundles\[1\]: missing key 'latency'"),
    ({"first": 0, "last": 1, "latency": 2.0, "frequency": 3}, r"frequency must be a string"),
    ({"first": 1, "last": 1, "latency": 1.0}, r"bundle 1\.\.1 at frequency None is listed twice"),
])
def test_malformed_entries_are_named(tmp_path: Path, bad: dict, message: str) -> None:
    doc = {"device": "d0", "model": {"sha256": "ab" * 32, "layers": ["a", "b"]},
           "runs": 5, "trim": 0.1,
           "bundles": [{"first": 1, "last": 1, "latency": 1.0}, bad]}
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match=message):
        read_profile(tmp_path / "p.json")


def test_covered_mbs_is_the_longest_complete_prefix() -> None:
    full = [(a, b) for a in range(5) for b in range(a, 5)]
    assert covered_mbs(full, 5) == 5
    upto2 = [(a, b) for a, b in full if b - a < 2]
    assert covered_mbs(upto2, 5) == 2
    assert covered_mbs([s for s in upto2 if s != (3, 4)], 5) == 1
    assert covered_mbs([(0, 0)], 5) == 0
