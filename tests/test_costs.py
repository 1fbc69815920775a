"""Cost table: hand-computed analytic prices on a 3-layer graph, profiled replacements."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from partitioner.analysis.costs import build_cost_table, build_positions
from partitioner.analysis.profiles import Profile, ProfiledBundle
from partitioner.analysis.system import load_system, parse_system
from partitioner.data import example_system_path
from partitioner.errors import UserError
from partitioner.ir import Cut, Layer, LayerGraph, TensorInfo

PI_FLOPS, PI_BW, PI_NIC = 3.62e9, 719e6, 1.11e7


def tiny_graph(name: str = "three") -> LayerGraph:
    """conv (3.62 GFLOP, 7.19 MB weights) -> conv (0.724 GFLOP) -> fc (0.362 GFLOP)."""
    specs = [  # flops, weight bytes, cut bytes after
        (3_620_000_000, 7_190_000, 111_000),
        (724_000_000, 14_380_000, 222_000),
        (362_000_000, 0, 4_000),
    ]
    inp = TensorInfo("x", (1, 3, 224, 224), "float32", 602_112)
    out = TensorInfo("y", (1, 1000), "float32", 4_000)
    tensors = {"x": inp, "y": out}
    layers, cuts = [], [Cut(-1, ("x",), inp.nbytes)]
    for k, (flops, wbytes, cbytes) in enumerate(specs):
        layers.append(Layer(index=k, name=f"l{k}", ops=("Conv",), nodes=(k,), flops=flops,
                            weight_count=wbytes // 4, weight_bytes=wbytes,
                            output_bytes=cbytes, cut_bytes=cbytes))
        t = out if k == 2 else TensorInfo(f"t{k}", (cbytes // 4,), "float32", cbytes)
        tensors[t.name] = t
        cuts.append(Cut(k, (t.name,), cbytes))
    return LayerGraph(name=name, sha256="ab" * 32, granularity="major", layers=tuple(layers),
                      cuts=tuple(cuts), inputs=(inp,), outputs=(out,), tensors=tensors)


def profile(device: str, bundles: dict[tuple[int, int], float], *, lazy: bool = False,
            frequency: str | None = None, energy: float | None = None) -> Profile:
    g = tiny_graph()
    return Profile(device=device, sha256=g.sha256, granularity="major",
                   layers=tuple(layer.name for layer in g.layers), runs=5, trim=0.1,
                   bundles=tuple(ProfiledBundle(a, b, frequency, t, energy)
                                 for (a, b), t in bundles.items()), lazy=lazy)


@pytest.fixture(scope="module")
def system():
    return load_system(example_system_path())


def test_positions_of_the_extended_chain(system) -> None:
    positions, out_bytes, flops = build_positions(tiny_graph(), system)
    assert [p.kind for p in positions] == ["source", "preprocess", "layer", "layer", "layer",
                                           "destination"]
    assert positions[0].allowed == ("pi3",) and positions[-1].allowed == ("pi3",)
    assert positions[1].allowed is None
    assert out_bytes == (11_059_200, 602_112, 111_000, 222_000, 4_000, 4)
    assert flops[1] == 2_764_800 and flops[2] == 3.62e9


def test_analytic_bundle_on_the_pi_is_hand_computed(system) -> None:
    table = build_cost_table(tiny_graph(), system)
    assert table.mbs == 3 and table.sources == {"pi3": "analytic", "nano": "analytic",
                                                 "gpu1080ti": "analytic"}
    # layers 0..1 are positions 2..3
    b = table.bundles[(2, 3, "pi3", None)]
    assert b.compute == pytest.approx(1.0 + 0.2)  # 4.344 GFLOP / 3.62 GFLOP/s
    assert b.weight_loading == pytest.approx((7_190_000 + 14_380_000) / PI_BW)  # 0.03 s
    assert b.internal == pytest.approx(111_000 / PI_BW)
    assert b.hidden == pytest.approx(0.01)
    assert b.energy is not None and b.energy >= 3.7 * b.compute  # the Pi draws 3.7 W
    assert b.time == pytest.approx(1.2 + 0.03 + 111_000 / PI_BW)
    pre = table.bundles[(1, 1, "pi3", None)]
    assert pre.compute == pytest.approx(2_764_800 / PI_FLOPS)
    gpu = table.bundles[(2, 2, "gpu1080ti", None)]
    assert gpu.compute == pytest.approx(3.62e9 / 11300e9)
    # source and destination are pinned: no bundle on other devices
    assert (0, 0, "nano", None) not in table.bundles
    assert (5, 5, "pi3", None) in table.bundles and (5, 5, "gpu1080ti", None) not in table.bundles
    no_preload = build_cost_table(tiny_graph(), system, preload=False)
    assert no_preload.bundles[(2, 3, "pi3", None)].hidden == 0.0


def test_bundle_count_follows_mbs(system) -> None:
    for mbs, expected in ((1, 3), (2, 5), (3, 6), (9, 6)):
        table = build_cost_table(tiny_graph(), system, mbs=mbs)
        layer_bundles = [k for k in table.bundles if k[2] == "nano" and k[0] >= 2]
        assert len(layer_bundles) == expected
        assert all(b - a + 1 <= min(mbs, 3) for a, b, _, _ in layer_bundles)
    with pytest.raises(UserError, match="--mbs 0"):
        build_cost_table(tiny_graph(), system, mbs=0)


def test_transfers_use_min_of_nics_and_link(system) -> None:
    table = build_cost_table(tiny_graph(), system)
    tr = table.transfers
    assert tr[(0, "pi3", "nano")].time == pytest.approx(11_059_200 / 1.0e6)
    assert tr[(0, "pi3", "gpu1080ti")].time == pytest.approx(11_059_200 / 1.0e5)
    assert tr[(0, "pi3", "pi3")].time == pytest.approx(11_059_200 / PI_BW)
    assert tr[(2, "nano", "pi3")].time == pytest.approx(111_000 / 1.0e6)
    assert tr[(4, "gpu1080ti", "pi3")].time == pytest.approx(4_000 / 1.0e5)
    assert (5, "pi3", "pi3") not in tr  # nothing leaves the last position
    assert tr[(0, "pi3", "nano")].sender_energy is None  # no network energy model


def test_unlinked_devices_are_not_connected_and_link_energy(tmp_path: Path) -> None:
    doc = {"device": [
        {"name": "a", "class": "edge", "flops": 1e9, "memory_bandwidth": 1e9,
         "network_bandwidth": 2e6, "power": 2.0},
        {"name": "b", "class": "hub", "flops": 1e10, "memory_bandwidth": 1e10,
         "network_bandwidth": 1e8},
        {"name": "c", "class": "cloud", "flops": 1e12, "memory_bandwidth": 1e11,
         "network_bandwidth": 1e8}],
        "link": [{"between": ["a", "b"], "bandwidth": 1e7, "network": "wifi",
                  "latency": 0.5},
                 {"between": ["b", "c"], "bandwidth": 1e6}]}
    table = build_cost_table(tiny_graph(), parse_system(doc, "s.toml"))
    assert (0, "a", "c") not in table.transfers
    t = table.transfers[(0, "a", "b")]
    assert t.time == pytest.approx(111_000 / 2e6 + 0.5)  # NIC of a is the bottleneck
    assert t.sender_energy == pytest.approx((2.27 * 2.36 + 0.13) * t.time)
    assert t.receiver_energy == pytest.approx((1.10 * 6.87 + 0.13) * t.time)
    back = table.transfers[(0, "b", "a")]
    assert back.sender_energy == pytest.approx((2.27 * 2.36 + 0.13) * back.time)
    b0 = table.bundles[(0, 0, "a", None)]
    # power times the whole bundle time: compute plus weight loading (issue 15)
    assert b0.weight_loading > 0
    assert b0.energy == pytest.approx(2.0 * (b0.compute + b0.weight_loading + b0.internal))


def test_frequency_figures_and_power(tmp_path: Path) -> None:
    doc = {"device": [{"name": "a", "class": "edge", "flops": 1e9, "memory_bandwidth": 1e9,
                       "network_bandwidth": 1e6, "frequencies": ["lo", "hi"],
                       "frequency_flops": [1e9, 4e9], "frequency_power": [1.0, 5.0]}]}
    table = build_cost_table(tiny_graph(), parse_system(doc, "s.toml"))
    assert table.frequencies == {"a": ("lo", "hi")}
    lo, hi = table.bundles[(0, 0, "a", "lo")], table.bundles[(0, 0, "a", "hi")]
    assert lo.compute == pytest.approx(3.62) and hi.compute == pytest.approx(3.62 / 4)
    load = 7_190_000 / 1e9  # weight loading at the memory bandwidth, at either frequency
    assert lo.energy == pytest.approx(1.0 * (3.62 + load))
    assert hi.energy == pytest.approx(5.0 * (3.62 / 4 + load))
    two = table.bundles[(0, 1, "a", "lo")]  # the cut inside the bundle moves in memory too
    assert two.internal == pytest.approx(111_000 / 1e9)
    assert two.energy == pytest.approx(1.0 * two.time)


def test_profiled_prices_replace_analytic_ones(system) -> None:
    measured = {(0, 0): 0.5, (1, 1): 0.25, (2, 2): 0.125, (0, 1): 0.6, (1, 2): 0.3,
                (0, 2): 0.7}
    table = build_cost_table(tiny_graph(), system, profiles=[profile("nano", measured)])
    assert table.sources["nano"] == "profile" and table.sources["pi3"] == "analytic"
    for (a, b), t in measured.items():
        cost = table.bundles[(a + 2, b + 2, "nano", None)]
        assert (cost.compute, cost.weight_loading, cost.internal, cost.hidden) == (t, 0, 0, 0)
    # the pi keeps its analytic price, the preprocess pseudo layer stays analytic on nano
    assert table.bundles[(2, 2, "pi3", None)].compute == pytest.approx(1.0)
    assert table.bundles[(1, 1, "nano", None)].compute == pytest.approx(2_764_800 / 236e9)


def test_profiled_energy_measured_or_from_power(tmp_path: Path) -> None:
    doc = {"device": [{"name": "nano", "class": "hub", "flops": 1e9, "memory_bandwidth": 1e9,
                       "network_bandwidth": 1e6, "power": 10.0}]}
    sysm = parse_system(doc, "s.toml")
    singles = {(0, 0): 0.5, (1, 1): 0.25, (2, 2): 0.125}
    with_meter = build_cost_table(tiny_graph(), sysm, mbs=1,
                                  profiles=[profile("nano", singles, energy=0.3)])
    assert with_meter.bundles[(1, 1, "nano", None)].energy == 0.3
    from_power = build_cost_table(tiny_graph(), sysm, mbs=1, profiles=[profile("nano", singles)])
    assert from_power.bundles[(1, 1, "nano", None)].energy == pytest.approx(2.5)


def test_missing_profiled_bundle_names_device_frequency_and_bundle(system) -> None:
    singles = {(0, 0): 0.5, (1, 1): 0.25, (2, 2): 0.125}
    build_cost_table(tiny_graph(), system, mbs=1, profiles=[profile("nano", singles)])
    with pytest.raises(UserError, match=r"device 'nano' at frequency None: .* bundle "
                                        r"layers 0..1 \(l0..l1\)"):
        build_cost_table(tiny_graph(), system, mbs=2, profiles=[profile("nano", singles)])


def test_lazy_profile_estimates_missing_bundles_from_singles(system) -> None:
    lazy = profile("nano", {(0, 0): 0.5, (1, 1): 0.25, (2, 2): 0.125, (0, 1): 0.9}, lazy=True)
    table = build_cost_table(tiny_graph(), system, profiles=[lazy])
    assert table.bundles[(2, 3, "nano", None)].compute == 0.9  # measured wins
    nano_bw = 25.6e9
    assert table.bundles[(3, 4, "nano", None)].compute == pytest.approx(
        0.25 + 0.125 + 222_000 / nano_bw)
    assert table.bundles[(2, 4, "nano", None)].compute == pytest.approx(
        0.875 + (111_000 + 222_000) / nano_bw)


def test_profiles_of_other_models_or_devices_are_refused(system) -> None:
    good = profile("nano", {(0, 0): 1.0, (1, 1): 1.0, (2, 2): 1.0})
    with pytest.raises(UserError, match="fingerprint"):
        build_cost_table(tiny_graph(), system, mbs=1, profiles=[replace(good, sha256="0" * 64)])
    with pytest.raises(UserError, match="layer list differs at layer 1"):
        build_cost_table(tiny_graph(), system, mbs=1,
                         profiles=[replace(good, layers=("l0", "lx", "l2"))])
    with pytest.raises(UserError, match="device 'tpu' is not in"):
        build_cost_table(tiny_graph(), system, mbs=1, profiles=[replace(good, device="tpu")])
    with pytest.raises(UserError, match="also in"):
        build_cost_table(tiny_graph(), system, mbs=1, profiles=[good, good])


def test_private_layers_only_on_trusted_devices(tmp_path: Path) -> None:
    untrusted = "\n".join(x for x in example_system_path().read_text().splitlines()
                          if not x.startswith("trusted ="))
    (tmp_path / "u.toml").write_text(untrusted)
    with pytest.raises(UserError, match="no device with trusted = true"):
        build_cost_table(tiny_graph(), load_system(tmp_path / "u.toml"), private=1)
    text = untrusted.replace('name = "nano"', 'name = "nano"\ntrusted = true')
    (tmp_path / "t.toml").write_text(text)
    table = build_cost_table(tiny_graph(), load_system(tmp_path / "t.toml"), private=2)
    assert table.positions[2].allowed == ("nano",) and table.positions[4].allowed is None
    assert (2, 2, "pi3", None) not in table.bundles and (3, 4, "pi3", None) not in table.bundles
    assert (2, 4, "nano", None) in table.bundles and (4, 4, "pi3", None) in table.bundles
    with pytest.raises(UserError, match="--private 4"):
        build_cost_table(tiny_graph(), load_system(tmp_path / "t.toml"), private=4)


def test_no_application_means_only_model_layers(tmp_path: Path) -> None:
    doc = {"device": [{"name": "a", "class": "edge", "flops": 1e9, "memory_bandwidth": 1e9,
                       "network_bandwidth": 1e6}]}
    table = build_cost_table(tiny_graph(), parse_system(doc, "s.toml"))
    assert [p.kind for p in table.positions] == ["layer"] * 3
    assert table.bundles[(0, 2, "a", None)].internal == pytest.approx(333_000 / 1e9)


def _dvfs_system():
    doc = {"device": [{"name": "nano", "class": "hub", "flops": 1e9, "memory_bandwidth": 1e9,
                       "network_bandwidth": 1e6, "frequencies": ["lo", "hi"]}]}
    return parse_system(doc, "dvfs.toml")


ALL3 = {(0, 0): 0.5, (1, 1): 0.25, (2, 2): 0.125, (0, 1): 0.6, (1, 2): 0.3, (0, 2): 0.7}


@pytest.mark.parametrize("labels, wrong", [(("lo", "mid"), "'mid'"), (("lo",), "'hi'"),
                                           ((None,), "None")])
def test_profile_frequencies_must_match_the_system(labels, wrong) -> None:
    """An unknown or a missing frequency names the file, device and frequency (not --mbs)."""
    profs = [replace(profile("nano", ALL3, frequency=f), path=f"nano-{f}.json")
             for f in labels]
    with pytest.raises(UserError) as info:
        build_cost_table(tiny_graph(), _dvfs_system(), profiles=profs)
    msg = str(info.value)
    assert "nano" in msg and wrong in msg and ".json" in msg and "--mbs" not in msg
    assert "\n" not in msg


def test_default_mbs_is_what_every_profile_covers() -> None:
    up_to_2 = {k: v for k, v in ALL3.items() if k != (0, 2)}
    profs = [replace(profile("nano", up_to_2, frequency=f), path=f"nano-{f}.json")
             for f in ("lo", "hi")]
    table = build_cost_table(tiny_graph(), _dvfs_system(), profiles=profs)
    assert table.mbs == 2
    full = [replace(profile("nano", ALL3, frequency="lo"), path="a.json"), profs[1]]
    assert build_cost_table(tiny_graph(), _dvfs_system(), profiles=full).mbs == 2
    with pytest.raises(UserError, match=r"nano-(lo|hi)\.json.*--mbs"):
        build_cost_table(tiny_graph(), _dvfs_system(), profiles=profs, mbs=3)
    both = [replace(p, bundles=tuple(b for b in p.bundles if b.first == b.last))
            for p in profs]
    assert build_cost_table(tiny_graph(), _dvfs_system(), profiles=both).mbs == 1
