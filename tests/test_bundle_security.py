"""A bundle directory is untrusted input: every path, size and tensor is checked on load.

Each test tampers with a real compiled bundle the way an attacker who can write the
directory would (re-stamping the SHA-256 so that the hash check alone does not catch it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from partitioner.backend import compile_bundle
from partitioner.errors import UserError
from partitioner.ir import Application, Device, Estimate, Link, Plan, Stage, System
from stagebundle.load import load_bundle, read_verified, sha256_file
from stagebundle.manifest import MANIFEST
from tests.test_slicing import GROUPS
from tests.test_slicing_fixtures import prepare, skip_dag


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    devices = (Device("edge", "edge", 1e9, 1e9, 1e7), Device("hub", "hub", 1e11, 1e10, 1e8))
    system = System(devices, (Link("edge", "hub", 1e7),), Application("edge", "edge"))
    plan = Plan("optimal", "latency", (Stage("edge", None, 0, 1), Stage("hub", None, 2, 8)),
                Estimate(0.5, 0.4, 0.1, 0.0, 0.4), 0.01)
    out = tmp_path_factory.mktemp("sec") / "bundle"
    return compile_bundle(prepare(skip_dag(), GROUPS), plan, system, out)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _manifest(b: Path) -> dict:
    return json.loads((b / MANIFEST).read_text())


def _write(b: Path, doc: dict) -> None:
    (b / MANIFEST).write_text(json.dumps(doc))


def _restamp(b: Path, model: onnx.ModelProto, stage: int = 0) -> None:
    """Save ``model`` as stage ``stage``'s file and record its new SHA-256."""
    doc = _manifest(b)
    path = b / doc["stages"][stage]["file"]
    onnx.save_model(model, str(path))
    doc["stages"][stage]["sha256"] = sha256_file(path)
    _write(b, doc)


def _external(tensor: onnx.TensorProto, location: str) -> None:
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="length", value="16")


def _stage0(b: Path) -> onnx.ModelProto:
    return onnx.load_model(str(b / _manifest(b)["stages"][0]["file"]))


def test_sparse_initializer_pointing_outside_is_refused(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path / "b")
    model = _stage0(b)
    values = numpy_helper.from_array(np.ones(4, np.float32), "sp_values")
    indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "sp_indices")
    _external(values, "../../etc/passwd")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [8]))
    _restamp(b, model)
    with pytest.raises(UserError, match=r"stage 0 .*'sp_values'.*'\.\./\.\./etc/passwd'"):
        load_bundle(b)


def test_tensor_inside_a_local_function_pointing_outside_is_refused(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path / "b")
    model = _stage0(b)
    const = numpy_helper.from_array(np.ones(4, np.float32), "fn_const")
    _external(const, "/etc/shadow")
    node = helper.make_node("Constant", [], ["y"], value=const)
    model.functions.append(helper.make_function("evil", "Leak", [], ["y"], [node],
                                                [helper.make_opsetid("", 17)]))
    _restamp(b, model)
    with pytest.raises(UserError, match=r"'fn_const'.*'/etc/shadow'"):
        load_bundle(b)


def test_sparse_attribute_pointing_outside_is_refused(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path / "b")
    model = _stage0(b)
    values = numpy_helper.from_array(np.ones(2, np.float32), "attr_values")
    indices = numpy_helper.from_array(np.arange(2, dtype=np.int64), "attr_indices")
    _external(values, "secret.bin")
    model.graph.node.append(helper.make_node(
        "Constant", [], ["unused_sparse"],
        sparse_value=helper.make_sparse_tensor(values, indices, [4])))
    _restamp(b, model)
    with pytest.raises(UserError, match=r"'attr_values'.*'secret.bin'"):
        load_bundle(b)


def test_symlinked_manifest_leading_outside_is_refused(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path / "b")
    outside = tmp_path / "elsewhere.json"
    (b / MANIFEST).replace(outside)
    (b / MANIFEST).symlink_to(outside)
    with pytest.raises(UserError, match="leads outside the bundle directory"):
        load_bundle(b)


def test_absurd_declared_shape_is_capped(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path / "b")
    doc = _manifest(b)
    doc["stages"][1]["inputs"][0]["shape"] = [1, 32, 8, 10 ** 15]
    _write(b, doc)
    with pytest.raises(UserError, match=r"declares more than \d+ bytes"):
        load_bundle(b)


def test_declared_shape_must_match_the_stage_file(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path / "b")
    doc = _manifest(b)
    spec = doc["stages"][1]["inputs"][0]
    spec["shape"] = [d + 1 for d in spec["shape"]]
    _write(b, doc)
    with pytest.raises(UserError, match=rf"input '{spec['name']}' is declared .* in the "
                                        r"manifest but"):
        load_bundle(b)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["stages"][0].update(external_data=["x"]), "external_data: .* not a non-empty"),
    (lambda d: d["stages"][0].update(triton=7), "triton: 7 is not a non-empty string"),
    (lambda d: d["stages"][0].update(external_data_sha256={}), "external_data_sha256"),
    (lambda d: d["stages"][0].update(file="stage0\x00.onnx"), "is not a non-empty string"),
    (lambda d: d["stages"][0].update(estimate=[1]), "estimate: expected an object"),
    (lambda d: d.update(stages={"0": {}}), "stages: expected a list"),
])
def test_wrong_types_in_a_manifest_are_one_line_errors(bundle_dir, tmp_path, edit, message):
    b = _copy(bundle_dir, tmp_path / "b")
    doc = _manifest(b)
    edit(doc)
    _write(b, doc)
    with pytest.raises(UserError, match=message) as err:
        load_bundle(b)
    assert "\n" not in str(err.value)


def test_deeply_nested_json_is_a_one_line_error(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path / "b")
    (b / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="not valid JSON"):
        load_bundle(b)


def test_read_verified_checks_the_bytes_it_returns(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path / "b")
    doc = _manifest(b)
    rel, digest = doc["stages"][0]["file"], doc["stages"][0]["sha256"]
    assert read_verified(b, rel, digest, "stage 0") == (b / rel).read_bytes()
    (b / rel).write_bytes((b / rel).read_bytes() + b"\0")
    with pytest.raises(UserError, match="does not match its sha256"):
        read_verified(b, rel, digest, "stage 0")
