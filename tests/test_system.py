"""System file loading: the example system, presets, and every rejected bad file."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from partitioner.analysis.energy import NETWORK_PRESETS, transfer_energy
from partitioner.analysis.system import load_system
from partitioner.data import example_system_path
from partitioner.errors import UserError

BAD = Path(__file__).parent / "testdata" / "systems"


def _expected(path: Path) -> str:
    if path.suffix == ".json":
        return {"json_negative.json": "device 1 ('pi'): network_bandwidth must be positive"}[
            path.name]
    first = path.read_text().splitlines()[0]
    match = re.match(r"# expect: (.*)", first)
    assert match, f"{path} lacks an '# expect:' header"
    return match.group(1)


def test_example_system_loads_with_published_figures() -> None:
    system = load_system(example_system_path())
    assert [d.name for d in system.devices] == ["pi3", "nano", "gpu1080ti"]
    pi = system.device("pi3")
    assert (pi.device_class, pi.flops, pi.memory_bandwidth, pi.network_bandwidth) == (
        "edge", 3.62e9, 719e6, 1.11e7)
    assert system.device("gpu1080ti").flops == 11300e9
    assert system.link("gpu1080ti", "pi3").bandwidth == 1.0e5  # undirected lookup
    assert system.application.source == "pi3"
    assert system.application.raw_input_bytes == 11059200
    assert system.application.preprocess_flops == 2764800
    assert system.device("nano").memory == 4.0e9


def test_optional_memory_defaults_to_unlimited(tmp_path: Path) -> None:
    f = tmp_path / "one.toml"
    f.write_text('[[device]]\nname="a"\nclass="edge"\nflops=1e9\nmemory_bandwidth=1e9\n'
                 'network_bandwidth=1e6\n')
    dev = load_system(f).devices[0]
    assert math.isinf(dev.memory) and dev.trusted is False and dev.frequencies == ()


def test_network_preset_fills_energy_terms_and_custom_override(tmp_path: Path) -> None:
    doc = {"device": [
        {"name": "a", "class": "edge", "flops": 1e9, "memory_bandwidth": 1e9,
         "network_bandwidth": 1e6, "trusted": True, "frequencies": ["lo", "hi"],
         "frequency_flops": [1e9, 2e9], "frequency_power": [1.0, 3.0], "power": 2.0},
        {"name": "b", "class": "cloud", "flops": 1e12, "memory_bandwidth": 1e11,
         "network_bandwidth": 1e8}],
        "link": [{"between": ["a", "b"], "bandwidth": 1e6, "network": "4g",
                  "beta": 2.0, "latency": 0.01}],
        "application": {"source": "a", "destination": "b", "duration": 3600}}
    f = tmp_path / "sys.json"
    f.write_text(json.dumps(doc))
    system = load_system(f)
    link = system.links[0]
    g4 = NETWORK_PRESETS["4g"]
    assert (link.up_alpha, link.down_alpha, link.up_mbps, link.down_mbps) == (
        g4.up_alpha, g4.down_alpha, g4.up_mbps, g4.down_mbps)
    assert link.beta == 2.0 and link.latency == 0.01 and link.has_energy_model
    send, recv = transfer_energy(link, 2.0)
    assert send == pytest.approx((3.51 * 0.73 + 2.0) * 2.0)
    assert recv == pytest.approx((0.42 * 1.72 + 2.0) * 2.0)
    a = system.device("a")
    assert a.frequency_flops == (1e9, 2e9) and a.frequency_power == (1.0, 3.0)
    assert a.trusted and a.power == 2.0


def test_wifi_preset_powers_match_spec_table(tmp_path: Path) -> None:
    f = tmp_path / "s.toml"
    f.write_text('[[device]]\nname="a"\nclass="edge"\nflops=1e9\nmemory_bandwidth=1e9\n'
                 'network_bandwidth=1e6\n[[device]]\nname="b"\nclass="hub"\nflops=1e9\n'
                 'memory_bandwidth=1e9\nnetwork_bandwidth=1e6\n'
                 '[[link]]\nbetween=["a","b"]\nbandwidth=1e6\nnetwork="wifi"\n')
    send, recv = transfer_energy(load_system(f).links[0], 1.0)
    assert send == pytest.approx(2.27 * 2.36 + 0.13)
    assert recv == pytest.approx(1.10 * 6.87 + 0.13)


@pytest.mark.parametrize("path", sorted(BAD.iterdir()), ids=lambda p: p.name)
def test_bad_system_file_is_rejected_with_one_line_naming_file_and_key(path: Path) -> None:
    with pytest.raises(UserError) as info:
        load_system(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert _expected(path) in message


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such system file"):
        load_system(tmp_path / "absent.toml")


def test_shared_base_of_bad_files_is_valid(tmp_path: Path) -> None:
    # Guard: the base the bad files share is itself valid, so each file tests one fault.
    base = (BAD / "unknown_top_key.toml").read_text().split("[[devices]]")[0]
    (tmp_path / "base.toml").write_text(base)
    assert len(load_system(tmp_path / "base.toml").devices) == 2


def test_cli_reports_bad_system_in_one_line_with_exit_2(tmp_path: Path) -> None:
    # `partitioner plan` is owned elsewhere; profile --lazy loads the system first.
    bad = BAD / "link_unknown_device.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "partitioner", "profile", str(tmp_path / "m.onnx"),
         "--device", "pi", "--lazy", "--system", str(bad), "-o", str(tmp_path / "p.json")],
        capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "link 2: unknown device 'gpu' in between" in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "p.json").exists()
