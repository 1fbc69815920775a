"""``partitioner profile`` end to end on the tiny zoo CNN (real ORT, real CBC)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from partitioner.analysis.costs import build_cost_table
from partitioner.analysis.profiler import bundle_count
from partitioner.analysis.profiles import load_profile, read_profile
from partitioner.analysis.system import load_system
from partitioner.data import example_system_path

FAST = ["--runs", "5", "--warmup", "1", "--threads", "1"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "partitioner", "profile", *args],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from models import save_model

    return save_model("tiny_cnn", tmp_path_factory.mktemp("m") / "tiny.onnx")


@pytest.fixture(scope="module")
def prepared(tiny):
    from partitioner.frontend import load_model

    return load_model(tiny)


def test_profile_json_counts_bundles_and_resumes(tiny, prepared, tmp_path) -> None:
    out = tmp_path / "p.json"
    proc = cli(str(tiny), "--device", "nano", "--mbs", "2", *FAST, "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # nothing but the JSON document on stdout
    n = len(prepared.graph.layers)
    assert doc["full_set"] == doc["measured_now"] == bundle_count(n, 2)
    profile = load_profile(out, prepared.graph)
    assert len(profile.bundles) == bundle_count(n, 2)
    assert proc.stderr == ""  # stderr is not a terminal: no progress bar
    again = cli(str(tiny), "--device", "nano", "--mbs", "2", *FAST, "-o", str(out), "--json")
    assert json.loads(again.stdout)["measured_now"] == 0
    assert read_profile(out).bundle_map() == profile.bundle_map()
    table = build_cost_table(prepared.graph, load_system(example_system_path()),
                             profiles=[profile], mbs=2)
    assert table.sources["nano"] == "profile"


def test_profile_energy_and_frequency_label(tiny, tmp_path) -> None:
    out = tmp_path / "e.json"
    proc = cli(str(tiny), "--device", "pi3", "--mbs", "1", *FAST, "--energy-meter",
               "power:4", "--frequency", "600MHz", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    profile = read_profile(out)
    assert {b.frequency for b in profile.bundles} == {"600MHz"}
    assert all(b.energy == pytest.approx(4 * b.latency) for b in profile.bundles)
    assert profile.energy_meter == "power:4"
    assert "600MHz" in proc.stderr  # says whether the frequency could be set


@pytest.mark.parametrize("args, message", [
    (["--runs", "0"], "--runs 0: need at least 1 timed run"),
    (["--trim", "0.5"], "--trim 0.5"),
    (["--energy-meter", "volts"], "--energy-meter 'volts'"),
    (["--lazy"], "--lazy needs --system"),
    (["--lazy", "--system", "SYS", "--device", "tpu"], "--device 'tpu' is not in"),
    (["--inputs", "missing.npz"], "missing.npz: cannot read the --inputs file"),
    (["-o", "DIR"], "is a folder; -o needs a profile file name"),
])
def test_bad_options_fail_in_one_line(tiny, tmp_path, args, message) -> None:
    subs = {"SYS": str(example_system_path()), "DIR": str(tmp_path)}
    args = [subs.get(a, a) for a in args]
    base = [str(tiny), "--device", "nano", "-o", str(tmp_path / "x.json")]
    if "--device" in args:
        base = [str(tiny), "-o", str(tmp_path / "x.json")]
    proc = cli(*base, *FAST, *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_lazy_profile_cli_measures_fewer_and_plans(tiny, prepared, tmp_path) -> None:
    # A fast LAN so the hub (this host) takes layers and longer bundles get measured.
    text = example_system_path().read_text().replace("bandwidth = 1.0e6", "bandwidth = 1.0e9")
    system = tmp_path / "fast.toml"
    system.write_text(text)
    out = tmp_path / "lazy.json"
    proc = cli(str(tiny), "--device", "nano", *FAST, "--lazy", "--system", str(system),
               "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    n = len(prepared.graph.layers)
    assert doc["lazy"]["full"] == bundle_count(n, n)
    assert n <= doc["lazy"]["measured"] == doc["bundles_in_file"] < doc["lazy"]["full"]
    assert any(s["device"] == "nano" for s in doc["lazy"]["plan"]["stages"])
    profile = load_profile(out, prepared.graph)
    assert profile.lazy
    # the lazy file feeds the cost model: unmeasured bundles are estimated
    table = build_cost_table(prepared.graph, load_system(system), profiles=[profile])
    assert len([k for k in table.bundles if k[2] == "nano" and k[0] >= 2]) == bundle_count(n, n)


def test_profile_model_with_external_weights(tmp_path) -> None:
    from models import save_model

    model = save_model("tiny_cnn", tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").exists()
    out = tmp_path / "ext.json"
    proc = cli(str(model), "--device", "nano", "--mbs", "2", *FAST, "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    profile = read_profile(out)
    expected = bundle_count(len(profile.layers), 2)
    assert json.loads(proc.stdout)["bundles_in_file"] == len(profile.bundles) == expected


def test_every_set_up_profiles_the_same_bundles(tiny, prepared, tmp_path) -> None:
    docs = {}
    for setup, extra in (("shared", []), ("inline", ["--inline-weights"]),
                         ("one_at_a_time", ["--no-open-ahead"])):
        out = tmp_path / f"{setup}.json"
        proc = cli(str(tiny), "--device", "nano", "--mbs", "3", *FAST, "-o", str(out),
                   "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        docs[setup] = (json.loads(proc.stdout), read_profile(out))
    keys = {setup: p.bundle_map().keys() for setup, (_, p) in docs.items()}
    assert keys["shared"] == keys["inline"] == keys["one_at_a_time"]
    assert len(keys["shared"]) == bundle_count(len(prepared.graph.layers), 3)
    for summary, _ in docs.values():  # where the time went, for the overhead benchmark
        assert summary["setup_seconds"] > 0 and summary["run_seconds"] > 0
    # bundles after the first were opened ahead, except with --no-open-ahead
    assert docs["shared"][0]["ahead_seconds"] > 0 and docs["inline"][0]["ahead_seconds"] > 0
    assert docs["one_at_a_time"][0]["ahead_seconds"] == 0
    shared, inline = docs["shared"][0], docs["inline"][0]
    assert inline["weights_file_seconds"] < shared["weights_file_seconds"]
    assert inline["reused_freed_memory"] is False
