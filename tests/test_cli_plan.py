"""``partitioner plan`` end to end: front end, system, cost table, solver, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import models
from partitioner.cli import main

SYSTEM = """
[[device]]
name = "cam"
class = "edge"
flops = 2e9
memory_bandwidth = 5e9
network_bandwidth = 1e9
trusted = true
power = 4.0
idle_power = 1.0
carbon_intensity = 0.3

[[device]]
name = "hub"
class = "hub"
flops = 2e11
memory_bandwidth = 5e10
network_bandwidth = 1e9
power = 30.0
idle_power = 5.0
carbon_intensity = 0.1

[[link]]
between = ["cam", "hub"]
bandwidth = 1e9

[application]
source = "cam"
destination = "cam"
duration = 3600
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("plan")
    model = models.save_model("tiny_cnn", d / "tiny.onnx")
    system = d / "system.toml"
    system.write_text(SYSTEM)
    return model, system


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_json_is_one_document_covering_every_layer(files, capsys) -> None:
    model, system = files
    rc, out, err = _run(capsys, str(model), "--system", str(system), "--json", "--quiet")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["status"] == "optimal" and doc["objective"] == "latency"
    rc2, inspect_out, _ = 0, None, None
    rc2 = main(["inspect", str(model), "--json"])
    inspect_out = capsys.readouterr().out
    assert rc2 == 0
    n_layers = len(json.loads(inspect_out)["layers"])
    covered = [k for s in doc["stages"] for k in range(s["layers"][0], s["layers"][1] + 1)]
    assert covered == list(range(n_layers))
    est = doc["estimate"]
    assert est["latency"] == pytest.approx(est["compute"] + est["communication"]
                                           + est["weight_loading"])
    assert doc["pseudo"]["source"] == "cam" and doc["pseudo"]["destination"] == "cam"


def test_plan_human_report_and_private_layers(files, capsys) -> None:
    model, system = files
    rc, out, err = _run(capsys, str(model), "--system", str(system), "--private", "2",
                        "--objective", "throughput")
    assert rc == 0, err
    assert "plan: optimal, objective throughput" in out
    first_stage = out.splitlines()[3].split()
    assert first_stage[1] == "cam" and first_stage[3].startswith("0..")
    assert int(first_stage[3].split("..")[1]) >= 1  # the private layers stay on cam
    assert "bottleneck" in out and "latency" in out


@pytest.mark.parametrize("objective", ["carbon", "energy", "weighted"])
def test_plan_other_objectives(files, capsys, objective: str) -> None:
    model, system = files
    rc, out, err = _run(capsys, str(model), "--system", str(system), "--objective",
                        objective, "--weights", "0.7,0.3", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["objective"] == objective
    if objective == "carbon":
        assert doc["estimate"]["carbon"] > 0


def test_infeasible_latency_cap_exits_2_with_json(files, capsys) -> None:
    model, system = files
    rc, out, err = _run(capsys, str(model), "--system", str(system), "--max-latency",
                        "1e-9", "--json")
    assert rc == 2
    doc = json.loads(out)
    assert doc["status"] == "infeasible"
    assert "latency cap 1e-09 s cannot be met: the fastest plan takes" in doc["message"]
    assert err.count("\n") == 1 and "latency cap" in err


def test_energy_objective_without_power_names_the_device(files, capsys, tmp_path) -> None:
    model, _ = files
    system = tmp_path / "nopower.toml"
    system.write_text(SYSTEM.replace("power = 4.0\n", ""))
    rc, out, err = _run(capsys, str(model), "--system", str(system), "--objective",
                        "energy", "--json")
    assert rc == 2 and out == ""
    assert "edge device 'cam'" in err


def test_bad_weights_and_mbs_are_user_errors(files, capsys) -> None:
    model, system = files
    rc, out, err = _run(capsys, str(model), "--system", str(system), "--weights", "1")
    assert rc == 2 and "--weights" in err and out == ""
    rc, out, err = _run(capsys, str(model), "--system", str(system), "--mbs", "0")
    assert rc == 2 and "--mbs" in err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_an_unwritable_stdout_is_one_line_and_exit_2(files) -> None:
    # A full disk behind the output is the user's environment: one line, exit 2.
    import subprocess
    import sys

    model, system = files
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "partitioner", "plan", str(model),
                               "--system", str(system), "--json"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], proc.stderr
