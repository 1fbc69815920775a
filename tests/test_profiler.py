"""Bundle profiler: effort, real intermediate inputs, resume, meters, profile files."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from partitioner.analysis.costs import build_cost_table
from partitioner.analysis.meters import cpu_frequency, parse_energy_meter, parse_frequency_khz
from partitioner.analysis.profiler import (
    BundleTimer,
    ProfileSettings,
    bundle_count,
    bundle_ranges,
    capture_intermediates,
    profile_bundles,
    sample_inputs,
    start_profile,
    trimmed_stats,
)
from partitioner.analysis.profiles import load_profile, read_profile, save_profile
from partitioner.analysis.system import parse_system
from partitioner.errors import UserError
from tests.test_slicing_fixtures import prepare, run_model, skip_dag

GROUPS = [[0, 1], [2, 3], [4, 5], [6, 7], [8], [9]]  # 6 layers of the skip DAG
FAST = ProfileSettings(runs=5, warmup=1, trim=0.2, threads=1)


@pytest.fixture(scope="module")
def prepared():
    return prepare(skip_dag(), GROUPS)


@pytest.fixture(scope="module")
def timer(prepared):
    captured = capture_intermediates(prepared, sample_inputs(prepared.graph, seed=3), 1)
    return BundleTimer(prepared, captured, FAST)


def test_effort_is_the_published_count() -> None:
    assert [bundle_count(8, m) for m in range(1, 9)] == [8, 15, 21, 26, 30, 33, 35, 36]
    assert len(bundle_ranges(8, 2)) == 15


@given(st.integers(1, 40), st.integers(1, 50))
def test_ranges_are_every_bundle_up_to_mbs_once(n_layers: int, mbs: int) -> None:
    ranges = bundle_ranges(n_layers, mbs)
    m = min(mbs, n_layers)
    assert len(ranges) == len(set(ranges)) == bundle_count(n_layers, mbs)
    assert len(ranges) == n_layers * m - m * (m - 1) // 2
    assert all(0 <= a <= b < n_layers and b - a < m for a, b in ranges)


def test_trimmed_mean_drops_both_ends() -> None:
    samples = [5.0, 1.0, 100.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0]
    stats = trimmed_stats(samples, 0.1)
    assert stats["latency"] == pytest.approx(5.5)  # drops 1.0 and 100.0
    assert (stats["min"], stats["max"], stats["p50"]) == (1.0, 100.0, 5.5)
    assert stats["std"] == pytest.approx(float(np.std(samples)))
    assert trimmed_stats([2.0, 4.0], 0.4)["latency"] == 3.0  # never drops everything


def test_captured_intermediates_are_the_real_tensors(prepared) -> None:
    inputs = sample_inputs(prepared.graph, seed=3)
    captured = capture_intermediates(prepared, inputs)
    ref = run_model(prepared.model, inputs)
    np.testing.assert_allclose(captured["y"], ref["y"], rtol=1e-5, atol=1e-6)
    for cut in prepared.graph.cuts:
        for name in cut.tensors:
            assert captured[name].shape == prepared.graph.tensors[name].shape


def test_full_profile_loads_back_and_feeds_the_cost_table(prepared, timer, tmp_path) -> None:
    out = tmp_path / "p.json"
    graph = prepared.graph
    prof = start_profile(out, graph, "hub", FAST)
    prof = profile_bundles(prof, bundle_ranges(6, 2), timer.measure, out)
    assert len(prof.bundles) == 6 * 2 - 1
    back = load_profile(out, graph)
    assert back.bundle_map() == prof.bundle_map()
    assert back.runs == 5 and back.trim == 0.2 and back.host["threads"] == 1
    for b in back.bundles:
        assert 0 < b.min <= b.p50 <= b.max and b.min <= b.latency <= b.max
    doc = json.loads(out.read_text())
    assert doc["model"]["layers"] == [f"layer{k}" for k in range(6)]
    assert doc["model"]["sha256"] == graph.sha256
    system = parse_system({"device": [
        {"name": "hub", "class": "hub", "flops": 1e9, "memory_bandwidth": 1e9,
         "network_bandwidth": 1e7}]}, "s.toml")
    table = build_cost_table(graph, system, profiles=[back], mbs=2)
    assert table.sources == {"hub": "profile"}
    for b in back.bundles:
        assert table.bundles[(b.first, b.last, "hub", None)].compute == b.latency
    with pytest.raises(UserError, match="lack bundle layers 0..2"):
        build_cost_table(graph, system, profiles=[back], mbs=3)


def test_resume_skips_measured_bundles(prepared, timer, tmp_path) -> None:
    out = tmp_path / "r.json"
    graph = prepared.graph
    calls: list[tuple[int, int]] = []

    def flaky(a: int, b: int):
        if len(calls) == 4:
            raise KeyboardInterrupt  # interrupted after 4 bundles
        calls.append((a, b))
        return timer.measure(a, b)

    with pytest.raises(KeyboardInterrupt):
        profile_bundles(start_profile(out, graph, "hub", FAST), bundle_ranges(6, 3), flaky,
                        out)
    assert len(read_profile(out).bundles) == 4  # saved after every bundle
    calls.clear()

    def counting(a: int, b: int):
        calls.append((a, b))
        return timer.measure(a, b)

    resumed = start_profile(out, graph, "hub", FAST)
    assert len(resumed.bundles) == 4
    final = profile_bundles(resumed, bundle_ranges(6, 3), counting, out)
    assert len(calls) == bundle_count(6, 3) - 4
    assert len(final.bundles) == bundle_count(6, 3)
    # a different frequency label is a different set of bundles in the same file
    final = profile_bundles(final, bundle_ranges(6, 1), counting, out, frequency="hi")
    assert len(read_profile(out).bundles) == bundle_count(6, 3) + 6
    with pytest.raises(UserError, match="different runs"):
        start_profile(out, graph, "hub", replace(FAST, runs=7))
    with pytest.raises(UserError, match="different device"):
        start_profile(out, graph, "edge", FAST)
    assert start_profile(out, graph, "hub", replace(FAST, runs=7), force=True).bundles == ()


def test_power_and_command_meters(prepared, tmp_path) -> None:
    captured = capture_intermediates(prepared, sample_inputs(prepared.graph))
    meter = parse_energy_meter("power:12.5")
    b = BundleTimer(prepared, captured, FAST, meter).measure(0, 1)
    assert b.energy == pytest.approx(12.5 * b.latency)
    counter = tmp_path / "joules"
    counter.write_text("100")
    # Each call prints the joules so far, then adds 6 J: the batch costs 6 J.
    cmd = f"n=$(cat {counter}); echo $((n + 6)) > {counter}; echo $n"
    b = BundleTimer(prepared, captured, FAST, parse_energy_meter(f"command:{cmd}")).measure(2, 2)
    assert b.energy == pytest.approx(6 / FAST.runs)
    with pytest.raises(UserError, match="printed 'watts'"):
        parse_energy_meter("command:echo watts").start()


def test_bad_meter_specs(tmp_path) -> None:
    with pytest.raises(UserError, match="expected rapl, command:CMD or power:WATTS"):
        parse_energy_meter("joulescope")
    with pytest.raises(UserError, match="non-negative number of watts"):
        parse_energy_meter("power:-3")
    with pytest.raises(UserError, match=r"intel-rapl:0/energy_uj does not exist"):
        parse_energy_meter("rapl", powercap=tmp_path)
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "energy_uj").write_text("2500000\n")
    assert parse_energy_meter("rapl", powercap=tmp_path)._read_rapl() == 2.5
    (zone / "energy_uj").write_text("garbage")
    with pytest.raises(UserError, match="cannot read .*energy_uj"):
        parse_energy_meter("rapl", powercap=tmp_path)


def test_frequency_set_when_writable_and_restored(tmp_path) -> None:
    assert parse_frequency_khz("1.5GHz") == 1_500_000
    assert parse_frequency_khz("614MHz") == 614_000
    assert parse_frequency_khz("turbo") is None
    for cpu in ("cpu0", "cpu1"):
        d = tmp_path / cpu / "cpufreq"
        d.mkdir(parents=True)
        (d / "scaling_max_freq").write_text("2000000\n")
    with cpu_frequency("1.2GHz", root=tmp_path) as note:
        assert "set 2 cpufreq controls to 1200000 kHz" in note
        assert (tmp_path / "cpu1/cpufreq/scaling_max_freq").read_text() == "1200000"
    assert (tmp_path / "cpu1/cpufreq/scaling_max_freq").read_text() == "2000000"
    with cpu_frequency("1.2GHz", root=tmp_path / "none") as note:
        assert "could not set the CPU frequency" in note
    with cpu_frequency(None) as note:
        assert note is None


def test_sample_inputs_from_npz(prepared, tmp_path) -> None:
    x = np.ones((1, 3, 8, 8), np.float32)
    np.savez(tmp_path / "ok.npz", x=x)
    assert np.array_equal(sample_inputs(prepared.graph, tmp_path / "ok.npz")["x"], x)
    np.savez(tmp_path / "shape.npz", x=np.ones((1, 3, 4, 4), np.float32))
    with pytest.raises(UserError, match=r"shape.npz: input 'x' has shape \(1, 3, 4, 4\)"):
        sample_inputs(prepared.graph, tmp_path / "shape.npz")
    np.savez(tmp_path / "none.npz", z=x)
    with pytest.raises(UserError, match="no array for model input 'x'"):
        sample_inputs(prepared.graph, tmp_path / "none.npz")


def test_bad_profiles_are_rejected(prepared, tmp_path) -> None:
    graph = prepared.graph
    good = start_profile(tmp_path / "g.json", graph, "hub", FAST)
    good = profile_bundles(good, [], lambda a, b: None, None)  # type: ignore[arg-type]
    doc = good.to_json()
    doc["bundles"] = [{"first": 0, "last": 0, "frequency": None, "latency": 0.001}]
    cases = {
        "missing": ({k: v for k, v in doc.items() if k != "runs"}, "missing key 'runs'"),
        "negative": ({**doc, "bundles": [{**doc["bundles"][0], "latency": -1}]},
                     r"bundles\[0\].latency must be a positive number"),
        "range": ({**doc, "bundles": [{**doc["bundles"][0], "last": 9}]},
                  "layers 0..9 outside 0..5"),
        "twice": ({**doc, "bundles": doc["bundles"] * 2}, "listed twice"),
        "trim": ({**doc, "trim": 0.7}, "trim must be below 0.5"),
    }
    for name, (bad, message) in cases.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=message):
            read_profile(f)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(UserError, match="junk.json: not a readable JSON profile"):
        read_profile(tmp_path / "junk.json")
    save_profile(replace(good, sha256="f" * 64), tmp_path / "other.json")
    with pytest.raises(UserError, match="other.json: model fingerprint ffffffffffff"):
        load_profile(tmp_path / "other.json", graph)
    save_profile(replace(good, layers=good.layers[:-1]), tmp_path / "short.json")
    with pytest.raises(UserError, match="the profile has 5 layers, m has 6"):
        load_profile(tmp_path / "short.json", graph)


# --------------------------------------------------------------------------- cheap set-up
@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """tiny_cnn: its convolution and Gemm weights are above the 1 KB external threshold."""
    from models import save_model
    from partitioner.frontend import load_model

    return load_model(save_model("tiny_cnn", tmp_path_factory.mktemp("cnn") / "cnn.onnx"))


def test_shared_weights_bundles_compute_what_inline_ones_do(cnn) -> None:
    import onnxruntime as ort

    from partitioner.analysis.profiler import SharedWeights
    from partitioner.frontend.slicing import extract_layers

    inputs = sample_inputs(cnn.graph, seed=1)
    weights = SharedWeights(cnn)
    try:
        assert (weights.folder / "weights.bin").stat().st_size > 0
        captured = capture_intermediates(cnn, inputs, 1, weights=weights)
        plain = capture_intermediates(cnn, inputs, 1)
        assert captured.keys() == plain.keys()
        assert all(np.array_equal(captured[k], plain[k]) for k in plain)
        n = len(cnn.graph.layers)
        for a, b in bundle_ranges(n, n):
            shared = extract_layers(weights.prepared, a, b)
            inline = extract_layers(cnn, a, b)
            # references, not bytes: the shared bundle's proto carries no weight data
            assert shared.model.ByteSize() < inline.model.ByteSize() // 4 or \
                inline.model.ByteSize() < 4096
            feeds = {t.name: captured[t.name] for t in shared.inputs}
            got = weights.session(shared.model, 1).run(None, feeds)
            want = ort.InferenceSession(inline.inlined().SerializeToString(),
                                        providers=["CPUExecutionProvider"]).run(None, feeds)
            assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        assert sorted(p.name for p in weights.folder.iterdir()) == ["model.onnx",
                                                                    "weights.bin"]
    finally:
        weights.close()
    assert not weights.folder.exists()


def test_timer_counts_set_up_and_runs_and_cleans_up(cnn) -> None:
    captured = capture_intermediates(cnn, sample_inputs(cnn.graph), 1)
    with BundleTimer(cnn, captured, FAST) as timer:  # writes its own weight file
        b = timer.measure(0, 2)
        folder = timer.weights.folder
        assert folder.exists() and timer.setup_seconds > 0 and timer.run_seconds > 0
        assert timer.run_seconds >= (FAST.runs + FAST.warmup) * b.min
    assert not folder.exists()
    inline = BundleTimer(cnn, captured, FAST, shared=False)
    inline.measure(0, 2)
    assert inline._weights is None  # the inline set-up never writes a weight file


def test_intermediates_captured_without_prepacking_match_a_plain_run() -> None:
    """The capture session skips ORT's weight pre-packing (it runs once, untimed); the cut
    tensors it returns are still the model's, from a model whose Conv and Gemm weights ORT
    would pre-pack."""
    import models
    from partitioner.analysis.sessions import SharedWeights, _session_options
    from partitioner.frontend import load_model

    assert _session_options(1, prepack=False).get_session_config_entry(
        "session.disable_prepacking") == "1"
    with pytest.raises(RuntimeError, match="disable_prepacking"):  # the default pre-packs
        _session_options(1).get_session_config_entry("session.disable_prepacking")
    prepared = load_model(models.build_model("tiny_cnn"))
    inputs = sample_inputs(prepared.graph, seed=5)
    weights = SharedWeights(prepared)
    try:
        captured = capture_intermediates(prepared, inputs, 1, weights=weights)
    finally:
        weights.close()
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    cut = sorted({n for c in prepared.graph.cuts for n in c.tensors} - set(inputs))
    assert cut, "tiny_cnn has cut tensors"
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in cut
                              if n not in {o.name for o in model.graph.output})
    ref = run_model(model, inputs)
    for name in cut:
        np.testing.assert_allclose(captured[name], ref[name], rtol=1e-4, atol=1e-5,
                                   err_msg=name)
