"""extract_layers: stages carry only what they use and chain back to the full model."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from partitioner.errors import UserError
from partitioner.frontend.slicing import extract_layers, uses_external_data
from tests.test_slicing_fixtures import prepare, run_model, skip_dag

# conv1 | relu1+k | early | conv2 | add | conv3 | scale | concat | conv4
GROUPS = [[0], [1, 2], [3], [4], [5], [6], [7], [8], [9]]


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}


def _chain(prepared, bounds: list[tuple[int, int]], feeds, *, save_dir: Path | None = None):
    """Run the slices one after the other, keeping every tensor produced so far."""
    env = dict(feeds)
    for i, (a, b) in enumerate(bounds):
        sub = extract_layers(prepared, a, b)
        onnx.checker.check_model(sub.inlined(), full_check=True)
        if save_dir is not None:
            path = save_dir / f"s{i}.onnx"
            sub.save(path)
            env.update(run_model(path, {t.name: env[t.name] for t in sub.inputs}))
        else:
            env.update(run_model(sub.inlined(), {t.name: env[t.name] for t in sub.inputs}))
    return env


def _partitions(n: int, parts: int):
    for cuts in itertools.combinations(range(n - 1), parts - 1):
        edges = [-1, *cuts, n - 1]
        yield [(edges[i] + 1, edges[i + 1]) for i in range(parts)]


def test_every_partition_reproduces_the_full_model_exactly():
    prepared = prepare(skip_dag(), GROUPS)
    feeds = _feeds()
    ref = run_model(skip_dag(), feeds)
    count = 0
    for parts in (9, 1, 2, 3, 5):
        for bounds in _partitions(len(GROUPS), parts):
            env = _chain(prepared, bounds, feeds)
            for name, want in ref.items():
                np.testing.assert_array_equal(env[name], want, err_msg=f"{bounds} {name}")
            count += 1
            if count > 60:  # enough coverage, keep the test fast
                return


def test_inputs_outputs_and_weights_of_a_middle_slice():
    prepared = prepare(skip_dag(), GROUPS)
    sub = extract_layers(prepared, 3, 5)  # conv2, add, conv3
    assert [t.name for t in sub.inputs] == ["a"]
    # "c" is read by nothing later, "d0" by scale (layer 6), "a" is not produced here.
    assert [t.name for t in sub.outputs] == ["d0"]
    assert sub.outputs[0].shape == (1, 4, 8, 8) and sub.outputs[0].dtype == "float32"
    assert sorted(t.name for t in sub.model.graph.initializer) == ["w2", "w3"]
    # skips crossing the slice: x and a go around it; the slice neither receives x nor emits a
    assert "x" not in {t.name for t in sub.inputs}


def test_model_inputs_and_early_outputs_and_borrowed_constants():
    prepared = prepare(skip_dag(), GROUPS)
    first = extract_layers(prepared, 0, 2)
    assert [t.name for t in first.inputs] == ["x"]
    assert [t.name for t in first.outputs] == ["a", "early"]  # early is a model output
    late = extract_layers(prepared, 6, 8)
    # x is a model input read by concat: it enters the late slice directly
    assert [t.name for t in late.inputs] == ["x", "a", "d0"]
    # the Constant "k" belongs to layer 1 but scale (layer 6) reads it: copied, not received
    assert "k" not in {t.name for t in late.inputs}
    assert any(n.op_type == "Constant" and n.output[0] == "k" for n in late.model.graph.node)
    assert sorted(t.name for t in late.model.graph.initializer) == ["w4"]


def test_bad_range_is_a_user_error():
    prepared = prepare(skip_dag(), GROUPS)
    with pytest.raises(UserError, match="outside 0..8"):
        extract_layers(prepared, 4, 9)
    with pytest.raises(UserError, match="layer range 3..2"):
        extract_layers(prepared, 3, 2)


def test_external_data_stays_external_and_only_used_bytes_are_copied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    model = skip_dag()  # save_model moves its weights out: compare with a fresh copy
    onnx.save_model(model, src / "big.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="big.weights", size_threshold=0)
    loaded = onnx.load_model(src / "big.onnx", load_external_data=False)
    assert uses_external_data(loaded)
    prepared = prepare(loaded, GROUPS, base_dir=src)
    sub = extract_layers(prepared, 3, 5)
    assert sub.has_external_data
    out = tmp_path / "out"
    out.mkdir()
    sub.save(out / "stage.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["stage.onnx", "stage.onnx.data"]
    stage = onnx.load_model(out / "stage.onnx", load_external_data=False)
    for t in stage.graph.initializer:
        assert {e.key: e.value for e in t.external_data}["location"] == "stage.onnx.data"
    # the data file holds w2 and w3 (page aligned), not w1 / w4
    used = 4 * 4 * 3 * 3 * 4
    assert used * 2 <= (out / "stage.onnx.data").stat().st_size <= 4096 + used + 4096
    full = onnx.load_model(out / "stage.onnx")
    weights = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}
    orig = {t.name: numpy_helper.to_array(t) for t in skip_dag().graph.initializer}
    np.testing.assert_array_equal(weights["w2"], orig["w2"])
    np.testing.assert_array_equal(weights["w3"], orig["w3"])
    onnx.checker.check_model(str(out / "stage.onnx"))
    # chained from saved files with external data, the outputs are still exact
    feeds = _feeds()
    env = _chain(prepared, [(0, 2), (3, 5), (6, 8)], feeds, save_dir=out)
    ref = run_model(skip_dag(), feeds)
    np.testing.assert_array_equal(env["y"], ref["y"])


def test_missing_external_file_names_the_tensor(tmp_path):
    onnx.save_model(skip_dag(), tmp_path / "m.onnx", save_as_external_data=True,
                    location="m.bin", size_threshold=0)
    loaded = onnx.load_model(tmp_path / "m.onnx", load_external_data=False)
    (tmp_path / "m.bin").unlink()
    sub = extract_layers(prepare(loaded, GROUPS, base_dir=tmp_path), 0, 0)
    with pytest.raises(UserError, match="tensor 'w1'.*not found"):
        sub.save(tmp_path / "s.onnx")
    assert not (tmp_path / "s.onnx").exists()


def test_outer_scope_reads_of_control_flow_bodies_become_inputs():
    from onnx import TensorProto, helper

    then_g = helper.make_graph(
        [helper.make_node("Add", ["a", "a"], ["t"])], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])])
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["a", "w"], ["e"])], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])])
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    graph = helper.make_graph(
        nodes, "ctrl", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(np.full((2, 3), 3.0, np.float32), "w"),
                     numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    prepared = prepare(model, [[0], [1, 2], [3]])
    last = extract_layers(prepared, 2, 2)
    # "a" and "w" are only read inside the branches, yet the stage needs them
    assert [t.name for t in last.inputs] == ["a", "cond"]
    assert [t.name for t in last.model.graph.initializer] == ["w"]
    for sign in (1.0, -1.0):
        feeds = {"x": sign * np.arange(1, 7, dtype=np.float32).reshape(2, 3)}
        env = _chain(prepared, [(0, 0), (1, 1), (2, 2)], feeds)
        np.testing.assert_array_equal(env["y"], run_model(model, feeds)["y"])


def test_stages_share_the_source_weights_and_stream_them_on_save(tmp_path):
    """The stage holds the source model's initialiser messages (no copy): a change to the
    source shows in the stage. Saved inline (weights streamed after the graph, one at a
    time) the file reads back as exactly the stage model, and so do its bytes."""
    prepared = prepare(skip_dag(), GROUPS)
    sub = extract_layers(prepared, 3, 5)
    assert [t.name for t in sub.weights] == ["w2", "w3"]
    assert not sub.shell.graph.initializer  # the shell carries no weights
    sub.save(tmp_path / "stage.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage.onnx"]
    assert onnx.load_model(tmp_path / "stage.onnx") == sub.model
    assert onnx.load_model_from_string(sub.to_bytes()) == sub.model
    onnx.checker.check_model(str(tmp_path / "stage.onnx"), full_check=True)
    feeds = _feeds()
    env = _chain(prepared, [(0, 2), (3, 5), (6, 8)], feeds, save_dir=tmp_path)
    np.testing.assert_array_equal(env["y"], run_model(skip_dag(), feeds)["y"])
    # shared, not copied: the source's w2 is the stage's w2
    source_w2 = next(t for t in prepared.model.graph.initializer if t.name == "w2")
    source_w2.raw_data = np.zeros(4 * 4 * 3 * 3, np.float32).tobytes()
    assert not numpy_helper.to_array(sub.weights[0]).any()


def test_save_model_round_trips_and_refuses_raw_data_that_contradicts_its_dims(tmp_path):
    from partitioner.frontend.slicing import save_model

    model = skip_dag()
    save_model(model, tmp_path / "m.onnx")
    assert onnx.load_model(tmp_path / "m.onnx") == model
    save_model(model, tmp_path / "e.onnx", external_data="e.bin")
    back = onnx.load_model(tmp_path / "e.onnx")  # loads e.bin
    assert {t.name: numpy_helper.to_array(t).tolist() for t in back.graph.initializer} == \
        {t.name: numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.initializer[0].raw_data = b"\0" * 8  # dims say 4*3*3*3 floats
    with pytest.raises(UserError, match="tensor 'w1': raw_data holds 8 bytes"):
        save_model(bad, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
