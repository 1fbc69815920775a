"""``partitioner demo``: the whole flow in a real process (workers, loopback, verification).

The demo builds a zoo model, plans it, compiles and verifies the bundle, starts one
``runtime serve`` process per device and runs requests through the chain; these tests run
the real command in a subprocess and check its ``--json`` report against the model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import models
from partitioner.frontend import load_model

TIMEOUT = 300


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "partitioner", "demo", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _layer_names(name: str) -> list[str]:
    return [layer.name for layer in load_model(models.build_model(name)).graph.layers]


def _check_report(report: dict[str, Any], names: list[str], requests: int,
                  devices: set[str]) -> None:
    assert report["model"] == "tiny_cnn"
    assert report["layers"] == len(names)
    plan = report["plan"]
    assert plan["status"] in ("optimal", "feasible")
    # The stages cover every layer once, in order.
    expect = 0
    for stage in plan["stages"]:
        first, last = stage["layers"]
        assert first == expect and last >= first
        assert stage["device"] in devices
        expect = last + 1
    assert expect == len(names)
    assert report["stage_names"] == [[names[s["layers"][0]], names[s["layers"][1]]]
                                     for s in plan["stages"]]
    # Every result through the workers matched ONNX Runtime on the whole model.
    assert report["verified"] is True
    assert 0.0 <= report["max_abs_diff"] <= 1e-4
    measured = report["measured"]
    assert measured["requests"] == requests
    assert 0 < measured["latency_min"] <= measured["latency_mean"] <= measured["latency_max"]
    assert measured["whole_model_latency"] > 0
    assert {str(i) for i in range(len(plan["stages"]))} >= set(measured["stages"])
    assert report["estimated"]["latency"] > 0


def test_demo_tiny_cnn_json():
    proc = _demo("--model", "tiny_cnn", "--requests", "3", "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert "[demo]" not in proc.stderr  # --quiet
    _check_report(report, _layer_names("tiny_cnn"), 3, {"pi3", "nano", "gpu1080ti"})


def test_demo_split_by_memory_caps(tmp_path: Path):
    """With no device able to hold every weight, the demo pipelines over several workers."""
    names = _layer_names("tiny_cnn")
    graph = load_model(models.build_model("tiny_cnn")).graph
    total = sum(layer.weight_bytes for layer in graph.layers)
    cap = max(max(layer.weight_bytes for layer in graph.layers), total * 0.9)
    assert cap < total
    text = ""
    for name, cls, flops in (("edge", "edge", 1e9), ("hub", "hub", 2e10),
                             ("cloud", "cloud", 4e11)):
        text += (f'[[device]]\nname = "{name}"\nclass = "{cls}"\nflops = {flops}\n'
                 f"memory_bandwidth = 1e9\nnetwork_bandwidth = 1e8\nmemory = {cap}\n\n")
    for a, b in (("edge", "hub"), ("edge", "cloud"), ("hub", "cloud")):
        text += f'[[link]]\nbetween = ["{a}", "{b}"]\nbandwidth = 1e8\n\n'
    text += '[application]\nsource = "edge"\ndestination = "edge"\n'
    system = tmp_path / "capped.toml"
    system.write_text(text, encoding="utf-8")
    proc = _demo("--model", "tiny_cnn", "--requests", "2", "--system", str(system),
                 "--workdir", str(tmp_path / "work"), "--json", "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    _check_report(report, names, 2, {"edge", "hub", "cloud"})
    assert len(report["plan"]["stages"]) >= 2
    assert report["system"] == str(system)
    # Each stage's device ran its share of every request.
    used = {s["device"] for s in report["plan"]["stages"]}
    assert {t["device"] for t in report["measured"]["stages"].values()} == used


@pytest.mark.parametrize("args, needle", [
    (("--model", "nosuch"), "nosuch"),
    (("--model", "tiny_cnn", "--requests", "0"), "--requests"),
])
def test_demo_bad_input_exits_2_with_one_line(args, needle):
    proc = _demo(*args, "--json", "--quiet")
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_demo_unwritable_workdir_exits_2_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = _demo("--model", "tiny_cnn", "--workdir", str(blocker / "work"), "--quiet")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "a-file" in lines[0] and "--workdir" in lines[0], proc.stderr
