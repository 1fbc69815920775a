"""Bad input to ``partitioner``: one line on stderr naming what is wrong, a non-zero exit,
no traceback, and nothing half-written (docs/INTERFACES.md).

Every case runs the real command in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from tests.test_cli_compile import SYSTEM  # cam and hub, one link

PROFILE = ["--runs", "2", "--warmup", "1", "--mbs", "2"]


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "partitioner", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _fails(*argv: str, expect: str, cwd: Path | None = None) -> str:
    """Run a command that must fail: exit 2, one line on stderr holding ``expect``."""
    proc = _run(*argv, cwd=cwd)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert expect in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad_input")
    model = models.save_model("tiny_cnn", d / "tiny.onnx")
    system = d / "system.toml"
    system.write_text(SYSTEM)
    bundle = d / "bundle"
    proc = _run("compile", str(model), "--system", str(system), "-o", str(bundle),
                "--quiet")
    assert proc.returncode == 0, proc.stderr
    return {"dir": d, "model": model, "system": system, "bundle": bundle}


def _tiny_graph(nodes: list[Any], inputs: list[Any], outputs: list[Any], path: Path,
                **kw: Any) -> Path:
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, **kw),
                                opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _vi(name: str, elem: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, elem, [1, 4])


# ------------------------------------------------------------------------- options


def test_a_usage_error_is_one_line(work) -> None:
    _fails("plan", str(work["model"]), expect="required: --system")
    _fails("inspect", str(work["model"]), "--frob", expect="unrecognized arguments: --frob")


def test_a_shape_given_twice_differently_is_refused(work) -> None:
    _fails("inspect", str(work["model"]), "--shape", "input=1,3,32,32", "--shape",
           "input=1,3,16,16", expect="already given as 1,3,32,32")


def test_an_impossibly_big_shape_is_refused_before_any_work(tmp_path) -> None:
    model = _tiny_graph([helper.make_node("Relu", ["x"], ["y"])],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                        tmp_path / "dyn.onnx")
    for dims in ("4611686018427387904,4", "99999999999999999999999,4"):
        _fails("inspect", str(model), "--shape", f"x={dims}", expect="more than any host")


@pytest.mark.skipif(Path("/proc/sys/vm/overcommit_memory").exists()
                    and Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1",
                    reason="with overcommit always on, a huge allocation may succeed")
def test_a_shape_too_big_for_this_host_is_one_line(tmp_path) -> None:
    model = _tiny_graph([helper.make_node("Relu", ["x"], ["y"])],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                        tmp_path / "dyn.onnx")
    out = tmp_path / "p.json"
    _fails("profile", str(model), "--shape", "x=1000000000000,4", "--device", "cam",
           *PROFILE, "-o", str(out), expect="out of memory")
    assert not out.exists()


def test_calibration_that_nothing_reads_is_refused(work) -> None:
    _fails("plan", str(work["model"]), "--system", str(work["system"]), "--calibration",
           "nope.npz", expect="--calibration nope.npz: needs --exit OUTPUT@T or --quantize")


def test_an_empty_output_path_is_refused(work) -> None:
    _fails("compile", str(work["model"]), "--system", str(work["system"]), "-o", "",
           expect="-o: the path is empty")


def test_a_system_address_without_a_port_is_refused(work, tmp_path) -> None:
    system = tmp_path / "s.toml"
    system.write_text(SYSTEM.replace('name = "hub"\n', 'name = "hub"\naddress = "10.0.0.1"\n'))
    _fails("plan", str(work["model"]), "--system", str(system),
           expect="device 2 ('hub'): address must be HOST:PORT")


# ------------------------------------------------------------------------- models


def _external_model(work: dict[str, Path], tmp_path: Path, location: str) -> Path:
    shutil.copy(work["model"], tmp_path / "src.onnx")
    model = onnx.load(str(tmp_path / "src.onnx"))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    model = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(tmp_path / "bad.onnx"))
    return tmp_path / "bad.onnx"


@pytest.mark.parametrize("location, expect", [
    ("../../etc/passwd", "leaves the model's folder"),
    ("/etc/hostname", "must be a path relative to the model's folder")])
def test_external_data_outside_the_model_folder_is_refused(work, tmp_path, location,
                                                           expect) -> None:
    bad = _external_model(work, tmp_path, location)
    _fails("inspect", str(bad), expect=f"external data location {location!r} {expect}")
    out = tmp_path / "b"
    _fails("compile", str(bad), "--system", str(work["system"]), "-o", str(out),
           expect=expect)
    assert not out.exists()


def test_a_graph_without_outputs_is_refused(tmp_path) -> None:
    model = _tiny_graph([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [],
                        tmp_path / "m.onnx")
    _fails("inspect", str(model), expect="m.onnx: the ONNX graph has no outputs")


def test_an_output_that_no_node_computes_is_refused(tmp_path) -> None:
    model = _tiny_graph([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("q")],
                        tmp_path / "m.onnx")
    _fails("inspect", str(model), expect="model output 'q' is never computed")


def test_a_tensor_written_twice_is_refused(tmp_path) -> None:
    model = _tiny_graph([helper.make_node("Relu", ["x"], ["y"], name="a"),
                         helper.make_node("Relu", ["x"], ["y"], name="b")],
                        [_vi("x")], [_vi("y")], tmp_path / "m.onnx")
    _fails("inspect", str(model), expect="tensor 'y' is written by node 'b' and by node 'a'")


def test_a_model_without_real_inputs_names_the_model(tmp_path) -> None:
    model = _tiny_graph([helper.make_node("Relu", ["w"], ["y"])], [], [_vi("y")],
                        tmp_path / "m.onnx",
                        initializer=[numpy_helper.from_array(np.ones((1, 4), np.float32),
                                                             "w")])
    _fails("inspect", str(model), expect="model 'm': computes nothing from its inputs")


def test_a_model_onnx_runtime_rejects_fails_profile_in_one_line(tmp_path) -> None:
    model = _tiny_graph([helper.make_node("Relu", ["x"], ["y"], foo=3)], [_vi("x")],
                        [_vi("y")], tmp_path / "m.onnx")
    out = tmp_path / "p.json"
    line = _fails("profile", str(model), "--device", "cam", *PROFILE, "-o", str(out),
                  expect="model 'm': ONNX Runtime cannot load it")
    assert "Unrecognized attribute: foo" in line and "/dev/shm" not in line
    assert not out.exists()


def test_compile_refuses_a_string_input_and_leaves_nothing(tmp_path) -> None:
    model = _tiny_graph([helper.make_node("Identity", ["x"], ["y"])],
                        [_vi("x", TensorProto.STRING)], [_vi("y", TensorProto.STRING)],
                        tmp_path / "m.onnx")
    system = tmp_path / "s.toml"
    system.write_text(SYSTEM)
    out = tmp_path / "b"
    _fails("compile", str(model), "--system", str(system), "-o", str(out),
           expect="input 'x' has element type string")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "s.toml"]


# ------------------------------------------------------------------------- profile


def test_profile_refuses_an_empty_device_or_frequency(work, tmp_path) -> None:
    out = tmp_path / "p.json"
    _fails("profile", str(work["model"]), "--device", "", *PROFILE, "-o", str(out),
           expect="--device '': must not be empty")
    _fails("profile", str(work["model"]), "--device", "cam", "--frequency", " ", *PROFILE,
           "-o", str(out), expect="--frequency ' ': must not be empty")
    assert not out.exists()


@pytest.mark.parametrize("threads", ["0", "100000"])
def test_profile_refuses_thread_counts_no_host_has(work, tmp_path, threads) -> None:
    out = tmp_path / "p.json"
    _fails("profile", str(work["model"]), "--device", "cam", *PROFILE, "--threads", threads,
           "-o", str(out), expect=f"--threads {threads}: must be in 1..")
    assert not out.exists()


def test_profile_output_under_a_file_is_named(work, tmp_path) -> None:
    (tmp_path / "afile").write_text("x")
    _fails("profile", str(work["model"]), "--device", "cam", *PROFILE, "-o",
           str(tmp_path / "afile" / "p.json"), expect="is a file, not a directory")


def test_profile_output_that_is_no_profile_says_how_to_start_afresh(work, tmp_path) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text("junk")
    _fails("profile", str(work["model"]), "--device", "cam", *PROFILE, "-o", str(junk),
           expect="pass --force to start afresh")
    assert junk.read_text() == "junk"


def test_a_profile_without_bundles_is_named(work, tmp_path) -> None:
    prof = tmp_path / "p.json"
    proc = _run("profile", str(work["model"]), "--device", "cam", *PROFILE, "-o", str(prof),
                "--quiet")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(prof.read_text())
    doc["bundles"] = []
    prof.write_text(json.dumps(doc))
    line = _fails("plan", str(work["model"]), "--system", str(work["system"]), "--profiles",
                  str(prof), expect="lack bundle layer 0")
    assert line.startswith(f"partitioner plan: error: {prof}: "), line
    assert "profile this device again" in line


# ------------------------------------------------------------------------- compile -o


def test_compile_force_never_replaces_the_current_directory(work, tmp_path) -> None:
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "precious").write_text("x")
    for out in (".", "../inner"):
        _fails("compile", str(work["model"]), "--system", str(work["system"]), "-o", out,
               "--force", cwd=inner, expect="holds the current directory")
    assert sorted(p.name for p in inner.iterdir()) == ["precious"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inner"]


@pytest.mark.parametrize("inside", ["model", "system"])
def test_compile_force_never_deletes_its_own_inputs(work, tmp_path, inside) -> None:
    out = tmp_path / "out"
    out.mkdir()
    files = {k: work[k] for k in ("model", "system")}
    files[inside] = out / work[inside].name
    shutil.copy(work[inside], files[inside])
    _fails("compile", str(files["model"]), "--system", str(files["system"]), "-o", str(out),
           "--force", expect=f"holds the input {str(files[inside])!r}")
    assert files[inside].read_bytes() == work[inside].read_bytes()


def test_compile_to_a_dotdot_path_writes_the_folder_it_names(work, tmp_path) -> None:
    (tmp_path / "x" / "y").mkdir(parents=True)
    proc = _run("compile", str(work["model"]), "--system", str(work["system"]), "-o",
                "x/y/..", "--force", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


# ------------------------------------------------------------------------- explain


def _edit(doc: dict[str, Any], path: str, value: Any) -> None:
    *keys, last = path.split(".")
    for k in keys:
        doc = doc[int(k)] if k.isdigit() else doc[k]  # type: ignore[index]
    doc[int(last) if last.isdigit() else last] = value  # type: ignore[index]


@pytest.mark.parametrize("path, value, expect", [
    ("plan.estimate", "x", "plan.estimate: expected an object or null"),
    ("plan.estimate.latency", "x", "plan.estimate.latency: expected a finite number"),
    ("plan.estimate.latency", float("nan"), "plan.estimate.latency: expected a finite"),
    ("plan.estimate.energy", "x", "plan.estimate.energy: expected an object"),
    ("plan.estimate.carbon", "x", "plan.estimate.carbon: expected a finite number"),
    ("plan.stages", "x", "plan.stages: expected a list"),
    ("plan.stages.0", 5, "plan.stages[0]: expected an object"),
    ("plan.stages.0.id", "zz", "plan.stages[0].id: expected an integer"),
    ("plan.routes", [5], "plan.routes[0]: expected an object"),
    ("plan.routes", [{}], "plan.routes[0].tensor: expected a string"),
    ("stages.0.estimate.compute", "x", "stages[0].estimate.compute: expected a finite"),
    ("stages.0.estimate.parts", "x", "stages[0].estimate.parts: expected a list"),
    ("model.layers", ["a"], "go past the model's 1 layers"),
    ("verification.max_abs_diff", "x", "verification.max_abs_diff: expected a finite"),
    ("timeline", [5], "timeline[0]: expected an object"),
])
def test_explain_of_a_damaged_manifest_is_one_line(work, tmp_path, path, value,
                                                   expect) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(work["bundle"], bundle)
    doc = json.loads((bundle / "manifest.json").read_text())
    _edit(doc, path, value)
    (bundle / "manifest.json").write_text(json.dumps(doc))
    for extra in ([], ["--json"]):
        line = _fails("explain", str(bundle), *extra, expect=expect)
        assert "manifest.json" in line


def test_explain_of_the_undamaged_bundle_still_works(work) -> None:
    proc = _run("explain", "--json", str(work["bundle"]))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stages"]
