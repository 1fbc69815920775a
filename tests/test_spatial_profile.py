"""``partitioner profile --spatial``: measured row parts price the spatial planner's parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import models
from partitioner import pipeline
from partitioner.analysis.costs import build_cost_table
from partitioner.analysis.profiles import load_profile
from partitioner.analysis.row_profile import row_counts, splittable_layers, with_row_profiles
from partitioner.analysis.spatial import part_costs, volume
from partitioner.errors import UserError
from partitioner.frontend import load_model
from tests.test_spatial_fixtures import mesh

ROW_COUNTS = (1, 2, 4)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tiny_cnn and its profile on device ``d0``, measured by the CLI (few runs)."""
    root = tmp_path_factory.mktemp("spatialprof")
    model = root / "tiny_cnn.onnx"
    onnx.save(models.build_model("tiny_cnn"), str(model))
    out = root / "d0.json"
    r = subprocess.run([sys.executable, "-m", "partitioner", "profile", str(model), "--device",
                        "d0", "--spatial", "--row-counts", *map(str, ROW_COUNTS), "--runs",
                        "3", "--warmup", "1", "--mbs", "1", "--quiet", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return model, out


def test_cli_writes_row_figures_for_every_splittable_layer(profiled: tuple[Path, Path]) -> None:
    model, out = profiled
    graph = load_model(model).graph
    doc = json.loads(out.read_text())
    got = {(e["first"], e["rows"]) for e in doc["rows"]}
    layers = splittable_layers(graph)
    assert layers, "tiny_cnn has convolution layers the planner can split"
    want = set()
    for k in layers:
        height = graph.layers[k].rows[-1].out_height  # type: ignore[index]
        want |= {(k, r) for r in row_counts(height, ROW_COUNTS)}
        assert (k, height) in got  # the whole layer: the curve's top end
    assert got == want
    assert all(e["first"] == e["last"] and e["latency"] > 0 for e in doc["rows"])
    assert load_profile(out, graph).rows  # it reads back


def test_profiled_rows_price_a_part_by_interpolation(profiled: tuple[Path, Path]) -> None:
    model, out = profiled
    graph = load_model(model).graph
    prof = load_profile(out, graph)
    system = mesh([5e9], source_flops=None)
    plain = build_cost_table(graph, system, profiles=[prof], mbs=1)
    priced = with_row_profiles(plain, graph, [prof])
    k = splittable_layers(graph)[0]
    vol = volume(graph, k, k)
    assert not isinstance(vol, str)
    before = part_costs(plain, vol, "d0", None)
    after = part_costs(priced, vol, "d0", None)
    assert before is not None and after is not None
    measured = sorted((e.rows, e.latency) for e in prof.rows if e.first == k)
    single = next(b.latency for b in prof.bundles if (b.first, b.last) == (k, k))
    for a, b in ((0, 2), (3, 3), (5, vol.height - 1)):  # 3 rows: between 2 and 4
        rows = b - a + 1
        expect = float(np.interp(rows, [c for c, _ in measured], [s for _, s in measured]))
        share = vol.layer_share[0, a, b]
        # the same fixed terms either way: only the layer's compute is replaced
        assert after.compute[a, b] - before.compute[a, b] == pytest.approx(
            expect - single * share, rel=1e-9, abs=1e-15)
    whole = dict(measured)[vol.height]
    assert after.compute[0, vol.height - 1] - before.compute[0, vol.height - 1] \
        == pytest.approx(whole - single, rel=1e-9, abs=1e-15)


def test_plan_spatial_uses_the_row_profile(profiled: tuple[Path, Path]) -> None:
    model, out = profiled
    result = pipeline.plan(model, mesh([5e9, 5e9], source_flops=None),
                           profiles=[out, _copy_as(out, "d1")], spatial=True)
    assert result.table.row_latency
    assert {d for _, d, _ in result.table.row_latency} == {"d0", "d1"}


def _copy_as(path: Path, device: str) -> Path:
    doc = json.loads(path.read_text())
    doc["device"] = device
    other = path.with_name(f"{device}.json")
    other.write_text(json.dumps(doc))
    return other


@pytest.mark.parametrize("change", ["too_many_rows", "not_splittable", "two_layers"])
def test_rows_that_do_not_fit_the_model_are_refused(profiled: tuple[Path, Path],
                                                    tmp_path: Path, change: str) -> None:
    model, out = profiled
    graph = load_model(model).graph
    doc = json.loads(out.read_text())
    entry = doc["rows"][0]
    if change == "too_many_rows":
        entry["rows"] = 10_000
        expect = "10000 rows"
    elif change == "not_splittable":
        entry["first"] = entry["last"] = len(graph.layers) - 1  # the classifier
        expect = "cannot be split by rows"
    else:
        entry["last"] = entry["first"] + 1
        expect = "only single layers"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=expect):
        pipeline.plan(model, mesh([5e9], source_flops=None), profiles=[bad], spatial=True)
    sysfile = tmp_path / "s.toml"
    sysfile.write_text('[[device]]\nname = "d0"\nclass = "edge"\nflops = 5e9\n'
                       'memory_bandwidth = 25e9\nnetwork_bandwidth = 1e8\n')
    r = subprocess.run([sys.executable, "-m", "partitioner", "plan", str(model), "--system",
                        str(sysfile), "--profiles", str(bad), "--spatial"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and expect in r.stderr and "bad.json" in r.stderr


def test_row_counts_option_needs_spatial(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "partitioner", "profile", "m.onnx", "--device",
                        "d0", "--row-counts", "2", "-o", str(tmp_path / "p.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--row-counts needs --spatial" in r.stderr
