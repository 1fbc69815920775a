"""Declaring exit heads: ``--exit`` parsing and its one-line errors, branch layers, the
layer order that lets a stage end in a head, and probabilities measured on calibration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import models
from models.builder import GraphBuilder
from partitioner.errors import UserError
from partitioner.frontend import load_model
from partitioner.frontend.exits import (
    ExitSpec,
    branch_layers,
    load_calibration,
    parse_exit,
    resolve_exits,
)
from stagebundle.exits import confidence
from tests.test_runtime_fixtures import ROOT, SYSTEM_TOML


def test_parse_exit_forms() -> None:
    assert parse_exit("exit1=0.656") == ExitSpec("exit1", probability=0.656)
    assert parse_exit("exit1@0.9") == ExitSpec("exit1", threshold=0.9)
    for bad, match in [("exit1", "expected OUTPUT=PROBABILITY"), ("exit1=1.5", r"\[0, 1\]"),
                       ("exit1=-0.1", r"\[0, 1\]"), ("exit1@x", r"\[0, 1\]"),
                       ("=0.5", "no output name")]:
        with pytest.raises(UserError, match=match):
            parse_exit(bad)


def test_branch_layers_of_the_zoo_models() -> None:
    graph = load_model(models.build_model("tiny_branchy")).graph
    names = [layer.name for layer in graph.layers]
    assert [names[k] for k in branch_layers(graph, "exit1")] == ["exit1.conv", "exit1.fc"]
    graph = load_model(models.build_model("resnet18_exit", image_size=64)).graph
    names = [layer.name for layer in graph.layers]
    assert [names[k] for k in branch_layers(graph, "exit1")] == ["exit1.conv", "exit1.fc"]


def _interleaved() -> GraphBuilder:
    """A branchy model whose node order puts trunk layers between fork and head."""
    g = GraphBuilder("interleaved", seed=3)
    x = g.input("input", (1, 3, 16, 16))
    x = g.relu(g.conv(x, 8, 3, name="conv1"), name="relu1")
    b = g.relu(g.conv(x, 4, 3, name="exit1.conv"), name="exit1.relu")
    y = g.relu(g.conv(x, 8, 3, name="conv2"), name="relu2")  # trunk, before the head
    y = g.relu(g.conv(y, 8, 3, name="conv3"), name="relu3")
    b = g.flatten(g.global_avgpool(b, name="exit1.avgpool"), name="exit1.flatten")
    e = g.gemm(b, 5, name="exit1.fc")
    y = g.flatten(g.global_avgpool(y, name="avgpool"), name="flatten")
    g.output(g.gemm(y, 5, name="fc"), "logits")
    g.output(e, "exit1")
    return g


def test_layers_are_reordered_so_the_branch_follows_the_fork(tmp_path: Path) -> None:
    path = tmp_path / "interleaved.onnx"
    import onnx

    onnx.save(_interleaved().build(), str(path))
    prepared = load_model(path)
    before = [layer.name for layer in prepared.graph.layers]
    assert before.index("conv2") < before.index("exit1.fc")
    prepared2, (head,) = resolve_exits(prepared, ["exit1=0.5"])
    after = [layer.name for layer in prepared2.graph.layers]
    assert after == ["conv1", "exit1.conv", "exit1.fc", "conv2", "conv3", "fc"]
    assert head.layer == 2 and head.branch == (1, 2)
    # the reordered model computes what the original does
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})
    got = ort.InferenceSession(prepared2.model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x})
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.save_model("tiny_branchy",
                             tmp_path_factory.mktemp("exits-fe") / "tiny_branchy.onnx")


def test_resolve_errors(tiny: Path) -> None:
    prepared = load_model(tiny)
    for specs, match in [(["nope=0.5"], "not a model output"),
                         (["exit1=0.5", "exit1=0.2"], "given twice"),
                         (["exit1@0.5"], "needs --calibration"),
                         (["exit1=0.5", "logits=0.1"], "main output must stay")]:
        with pytest.raises(UserError, match=match):
            resolve_exits(prepared, specs)


def test_calibration_file_errors(tiny: Path, tmp_path: Path) -> None:
    graph = load_model(tiny).graph
    bad = tmp_path / "bad.npz"
    np.savez(bad, other=np.zeros((2, 1, 3, 32, 32), np.float32))
    with pytest.raises(UserError, match="no array for model input 'input'"):
        load_calibration(bad, graph)
    np.savez(bad, input=np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(UserError, match=r"expected \(samples, 1, 3, 32, 32\)"):
        load_calibration(bad, graph)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(UserError, match="cannot read it"):
        load_calibration(tmp_path / "junk.npz", graph)


def test_measured_probability_is_the_share_above_the_threshold(tiny: Path,
                                                               tmp_path: Path) -> None:
    xs = np.random.default_rng(2).standard_normal((20, 1, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"])
    conf = [confidence(sess.run(["exit1"], {"input": x})[0]) for x in xs]
    threshold = float(np.quantile(conf, 0.25))
    path = tmp_path / "cal.npz"
    np.savez(path, input=xs)
    _, (head,) = resolve_exits(load_model(tiny), [f"exit1@{threshold!r}"], path)
    assert head.head.probability == pytest.approx(np.mean([c >= threshold for c in conf]))
    assert head.head.threshold == threshold


def test_cli_errors_are_one_line(tiny: Path, tmp_path: Path) -> None:
    system = tmp_path / "system.toml"
    system.write_text(SYSTEM_TOML)
    for args, match in [(["--exit", "nope=0.5"], "not a model output"),
                        (["--exit", "exit1=2"], "[0, 1]"),
                        (["--exit", "exit1@0.5"], "needs --calibration")]:
        proc = subprocess.run([sys.executable, "-m", "partitioner", "plan", str(tiny),
                               "--system", str(system), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and match in lines[0], proc.stderr
