"""``partitioner inspect``: the real CLI in a subprocess (table, --json, bad input)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from partitioner.cli import main


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "partitioner", "inspect", *args],
                          capture_output=True, text=True, timeout=120)


def small_cnn(batch: int | str = "N") -> onnx.ModelProto:
    """conv(3->8, 3x3) -> relu -> conv(8->8) -> add skip -> global pool -> flatten -> gemm."""
    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["images", "W1", "B1"], ["c1"], name="stem", **conv),
             helper.make_node("Relu", ["c1"], ["r1"], name="stem_relu"),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], name="block", **conv),
             helper.make_node("Add", ["c2", "r1"], ["s"], name="block_add"),
             helper.make_node("GlobalAveragePool", ["s"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "Wf", "Bf"], ["logits"], name="head", transB=1)]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        [w("W1", 8, 3, 3, 3), w("B1", 8), w("W2", 8, 8, 3, 3), w("Wf", 10, 8), w("Bf", 10)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def cnn_file(save_onnx) -> Path:
    return save_onnx(small_cnn(), "small_cnn.onnx")


def test_json_document(cnn_file):
    result = _cli(str(cnn_file), "--shape", "images=2,3,16,16", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)  # nothing but one JSON document on stdout
    assert doc["model"]["sha256"] == hashlib.sha256(cnn_file.read_bytes()).hexdigest()
    assert doc["model"]["name"] == "small_cnn" and doc["model"]["granularity"] == "major"
    assert doc["model"]["inputs"][0]["shape"] == [2, 3, 16, 16]
    assert doc["model"]["outputs"][0] == {"name": "logits", "shape": [2, 10],
                                          "dtype": "float32", "nbytes": 80}
    layers = doc["layers"]
    assert [layer["name"] for layer in layers] == ["stem", "block", "head"]
    for layer in layers:
        assert {"index", "name", "ops", "flops", "weight_count", "weight_bytes",
                "output_bytes", "cut_bytes", "cut_tensors"} <= set(layer)
    act = 2 * 8 * 16 * 16 * 4
    assert [layer["cut_tensors"] for layer in layers] == [["r1"], ["f"], ["logits"]]
    assert [layer["cut_bytes"] for layer in layers] == [act, 2 * 8 * 4, 80]
    assert layers[0]["flops"] == 2 * (2 * 8 * 16 * 16) * 27 + 2 * 8 * 16 * 16
    assert layers[1]["ops"] == ["Conv", "Add", "GlobalAveragePool", "Flatten"]
    totals = doc["totals"]
    assert totals["layers"] == 3
    assert totals["weight_count"] == 8 * 27 + 8 + 8 * 72 + 80 + 10
    assert totals["weight_bytes"] == 4 * totals["weight_count"]
    assert totals["flops"] == sum(layer["flops"] for layer in layers)
    assert totals["macs"] == (2 * 8 * 16 * 16) * (27 + 72) + 2 * 10 * 8


def test_table_and_node_granularity(save_onnx, capsys):
    path = save_onnx(small_cnn(batch=1))
    table = _cli(str(path))
    assert table.returncode == 0, table.stderr
    assert "stem" in table.stdout and "Conv+Relu" in table.stdout
    assert "3 layers (7 nodes)" in table.stdout and "params" in table.stdout
    assert main(["inspect", str(path), "--granularity", "node", "--json"]) == 0
    assert [layer["name"] for layer in json.loads(capsys.readouterr().out)["layers"]] == [
        "stem", "stem_relu", "block", "block_add", "GlobalAveragePool_4", "Flatten_5", "head"]


@pytest.mark.parametrize(("args", "message"), [
    ([], r"input 'images' axis 0 \('N'\) is dynamic; fix it with --shape images=1,3,16,16"),
    (["--shape", "image=1,3,16,16"], r"has no input 'image'"),
    (["--shape", "images=1,3"], r"rank 4, got 2"),
    (["--shape", "images=1,3,a,16"], r"must be integers"),
])
def test_bad_shapes_exit_2_with_one_line(cnn_file, args, message, capsys):
    assert main(["inspect", str(cnn_file), *args, "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_unfixed_dynamic_dim_in_a_real_process(cnn_file):
    result = _cli(str(cnn_file), "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        f"partitioner inspect: error: {cnn_file}: input 'images' axis 0 ('N') is dynamic; "
        f"fix it with --shape images=1,3,16,16")


def test_missing_and_corrupt_files(tmp_path, capsys):
    missing = _cli(str(tmp_path / "nope.onnx"))
    assert missing.returncode == 2 and "nope.onnx: no such file" in missing.stderr
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07this is not a model at all\xff\xff")
    assert main(["inspect", str(junk)]) == 2
    err = capsys.readouterr().err
    assert "junk.onnx" in err and len(err.strip().splitlines()) == 1


def test_in_process_matches_subprocess(cnn_file, capsys):
    assert main(["inspect", str(cnn_file), "--shape", "images=1,3,16,16", "--json"]) == 0
    in_process = json.loads(capsys.readouterr().out)
    sub = json.loads(_cli(str(cnn_file), "--shape", "images=1,3,16,16", "--json").stdout)
    assert in_process == sub


def _chain(names: list[str]) -> onnx.ModelProto:
    """A chain of MatMuls with the given node names (one major layer each)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for k, name in enumerate(names):
        inits.append(numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32),
                                             f"W{k}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{k}"], [f"y{k}"], name=name))
        x = f"y{k}"
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 4])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_long_layer_names_print_distinct(save_onnx, capsys):
    """Exported names share long prefixes ("/model/decoder/layers.0/encoder_attn/") and
    differ at the end or in the middle: the table must still tell the layers apart."""
    names = [f"/model/decoder/layers.{i}/encoder_attn/{p}_proj/MatMul"
             for i in (0, 1) for p in "qkv"]
    names.append("/model/decoder/layers.1/encoder_attn/a_very_long_output_proj/MatMul")
    assert main(["inspect", str(save_onnx(_chain(names)))]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if re.match(r"\s+\d+\s{2}", line)]
    shown = [re.split(r"\s{2,}", row.strip())[1] for row in rows]
    assert len(shown) == len(names)
    assert len(set(shown)) == len(shown), shown
    assert all(len(s) <= 40 for s in shown)
    # Shortened from the middle: both ends of each name stay readable.
    assert all(s.startswith("/model") and s.endswith("MatMul") for s in shown)


def _token_model() -> onnx.ModelProto:
    """input_ids and attention_mask (batch, sequence) -> embedding * mask -> linear."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
             helper.make_node("Mul", ["emb", "m3"], ["masked"]),
             helper.make_node("MatMul", ["masked", "W"], ["hidden"], name="proj")]
    dims = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, dims)],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [*dims, 8])],
        [numpy_helper.from_array(rng.standard_normal((50, 8)).astype(np.float32), "E"),
         numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W"),
         numpy_helper.from_array(np.array([-1], np.int64), "last")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_sequence_inputs_get_a_shape_hint_that_runs(save_onnx, capsys):
    path = save_onnx(_token_model())
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--shape input_ids=1,128 --shape attention_mask=1,128" in err, err
    # The suggestion is a command line that works as written.
    options = re.findall(r"--shape (\S+)", err)
    assert main(["inspect", str(path), "--json", *[a for o in options
                                                    for a in ("--shape", o)]]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["outputs"][0]["shape"] == [1, 128, 8]


@pytest.mark.parametrize(("name", "elem", "dims", "hint"), [
    ("images", TensorProto.FLOAT, ["N", 3, "H", "W"], "images=1,3,224,224"),
    ("pixels", TensorProto.UINT8, ["N", "H", "W", 3], "pixels=1,224,224,3"),
    ("input_values", TensorProto.FLOAT, ["batch", "samples"], "input_values=1,16000"),
    ("features", TensorProto.FLOAT, ["batch", "frames", 80], "features=1,128,80"),
])
def test_shape_hint_fits_the_kind_of_input(name, elem, dims, hint):
    from partitioner.errors import UserError
    from partitioner.frontend import load_model

    node = helper.make_node("Relu" if elem == TensorProto.FLOAT else "Cast", [name], ["out"],
                            **({} if elem == TensorProto.FLOAT else {"to": TensorProto.FLOAT}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(name, elem, dims)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UserError, match=re.escape(f"--shape {hint}")):
        load_model(model)


def test_control_flow_note_on_stderr(save_onnx):
    """A data-dependent If holding the network: inspect says so in one line on stderr."""
    rng = np.random.default_rng(0)
    out = helper.make_tensor_value_info("t", TensorProto.FLOAT, None)
    then_branch = helper.make_graph([helper.make_node("Conv", ["images", "W"], ["t"])],
                                    "then", [], [out])
    else_branch = helper.make_graph([helper.make_node("Conv", ["conv_in", "W2"], ["t"])],
                                    "else", [], [out])
    nodes = [helper.make_node("Slice", ["images", "s0", "s1", "s2"], ["conv_in"]),  # 6 x 6
             helper.make_node("ReduceSum", ["images"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["y"], name="gate", then_branch=then_branch,
                              else_branch=else_branch)]
    graph = helper.make_graph(
        nodes, "gated", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                       [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "W2"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(np.array([0, 0, 1, 1], np.int64), "s0"),
         numpy_helper.from_array(np.array([1, 3, 7, 7], np.int64), "s1"),
         numpy_helper.from_array(np.array([0, 1, 2, 3], np.int64), "s2")])
    path = save_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result = _cli(str(path), "--json")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "If node 'gate'" in notes[0], result.stderr
    doc = json.loads(result.stdout)
    assert doc["totals"]["flops"] >= 2 * (4 * 6 * 6) * 27  # the conv branch is counted
    assert "note:" not in _cli(str(path), "--json", "--quiet").stderr


def test_input_of_unknown_rank_names_itself_in_the_hint():
    from partitioner.errors import UserError
    from partitioner.frontend import load_model

    graph = helper.make_graph(
        [helper.make_node("Cast", ["token_ids"], ["out"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("token_ids", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UserError, match=r"--shape token_ids=D0,D1,\.\.\. \(e\.g\. 1,128\)"):
        load_model(model)
