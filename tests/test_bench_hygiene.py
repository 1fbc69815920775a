"""Benchmark hygiene (issue 15): quick runs never overwrite full results; sweep names unique."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import (
    RESULTS,
    linear_slope,
    result_paths,
    split_by_flops,
    zoo_model,
    zoo_models,
)
from benchmarks.partition_sweep import link_names

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "common.py")


def test_quick_results_have_their_own_files(tmp_path) -> None:
    full = result_paths("soak", False)
    quick = result_paths("soak", True)
    assert full == (RESULTS / "soak.json", RESULTS / "soak.png")
    assert quick == (RESULTS / "soak_quick.json", RESULTS / "soak_quick.png")
    assert not set(full) & set(quick)
    assert result_paths("x", True, tmp_path) == (tmp_path / "x_quick.json",
                                                 tmp_path / "x_quick.png")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_benchmark_with_quick_writes_quick_files_apart(script: Path) -> None:
    text = script.read_text()
    if "--quick" not in text:
        pytest.skip("no --quick mode")
    # The shared helpers (result_paths, or write_results which calls it with the run's
    # quick flag), or (scripts of other owners) an explicit `<name>_quick` stem; never the
    # old `-quick` suffix nor a quick mode that only changes the sizes.
    assert "result_paths(" in text or re.search(r"write_results\([^)]*args\.quick", text) \
        or re.search(r"_quick[\"'.]", text), script.name
    assert "-quick" not in text.replace("--quick", ""), script.name


def test_committed_results_follow_the_naming() -> None:
    names = [p.name for p in RESULTS.glob("*.*")]
    assert not [n for n in names if "-quick" in n]


def test_a_quick_run_leaves_the_full_results_alone(tmp_path) -> None:
    """The soak benchmark's quick path, for a few seconds, beside a 'full' result."""
    full_json, full_png = result_paths("soak", False, tmp_path)
    full_json.write_text('{"full": true}\n')
    full_png.write_bytes(b"not a real png")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "soak.py"), "--quick", "--minutes", "0.08",
         "--sample-every", "0.5", "--reconnect-every", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False)
    assert full_json.read_text() == '{"full": true}\n'
    assert full_png.read_bytes() == b"not a real png"
    quick_json, quick_png = result_paths("soak", True, tmp_path)
    assert quick_png.stat().st_size > 1000, proc.stderr[-2000:]
    doc = json.loads(quick_json.read_text())
    # a few seconds say nothing about slopes; they do say every answer was identical
    assert doc["answered"] > 0 and doc["mismatches"] == 0 and doc["errors"] == 0
    assert doc["reconnects"] >= 2
    assert doc["reference_bit_identical_to_chained_in_process"]
    assert set(doc["processes"]) == {"client", "worker edge", "worker hub"}
    assert proc.returncode == (0 if doc["flat"] else 1), proc.stderr[-2000:]


def test_sweep_runs_get_their_own_namespace_devices_and_subnet() -> None:
    a, b = link_names(4242), link_names(4243)
    assert a.ns != b.ns and a.edge_if != b.edge_if and a.cloud_if != b.cloud_if
    assert {a.edge_ip, a.cloud_ip}.isdisjoint({b.edge_ip, b.cloud_ip})
    big = link_names(4_194_304)  # the largest Linux pid
    assert max(len(big.edge_if), len(big.cloud_if)) <= 15  # IFNAMSIZ - 1
    taken = link_names(7, {a.edge_ip for a in [link_names(7)]})
    assert taken.edge_ip != link_names(7).edge_ip  # an address in use is skipped


def test_split_by_flops_covers_every_layer_once() -> None:
    for flops, parts in (([5, 1, 1, 1, 5, 1], 3), ([1] * 7, 7), ([9, 1], 4), ([3], 2)):
        bounds = split_by_flops(flops, parts)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(flops) - 1
        assert all(a <= b for a, b in bounds)
        assert all(b + 1 == c for (_, b), (c, _) in zip(bounds, bounds[1:], strict=False))
        assert len(bounds) == min(parts, len(flops))


def test_linear_slope() -> None:
    assert linear_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert linear_slope([0, 1, 2], [4, 4, 4]) == 0.0
    assert linear_slope([1], [3]) == 0.0


def test_write_results_writes_the_quick_files_beside_the_full_ones(tmp_path) -> None:
    from benchmarks.common import write_results

    def plot(doc: object, png: Path) -> None:
        png.write_bytes(b"png")

    assert write_results("x", True, tmp_path, {"quick": True}, plot) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_quick.json", "x_quick.png"]
    assert json.loads((tmp_path / "x_quick.json").read_text()) == {"quick": True}


def test_model_flags_take_zoo_names_only() -> None:
    assert zoo_models("alexnet,tiny_cnn,") == ["alexnet", "tiny_cnn"]
    assert zoo_model("resnet18") == "resnet18"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown model 'nosuch'"):
        zoo_models("alexnet,nosuch")
    with pytest.raises(argparse.ArgumentTypeError, match="names no model"):
        zoo_models(",")
