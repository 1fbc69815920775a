"""Control flow in the front end (issue 15): ``If`` nodes whose condition folds to a constant
are inlined; data-dependent ``If``/``Loop`` nodes are counted (FLOPs and weights of their
sub-graphs) or refused with one line naming the node."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from partitioner.errors import UserError
from partitioner.frontend import load_model

RNG = np.random.default_rng(0)
CONV = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}


def _w(name: str, *shape: int) -> TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _i64(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.array(value, np.int64), name)


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _out(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString()).run(None, feeds)


def exported_if_model(channels: int) -> onnx.ModelProto:
    """What exporters write for ``if x.shape[1] == 3: conv else: flatten``.

    The branches return tensors of different rank (4-D / 2-D), so the ``If`` has no
    single shape until its condition is known. The then-branch holds its own bias
    initialiser and a nested ``If`` (condition from an outer initialiser) whose branch
    reads the outer-scope input ``x``; both branches define a tensor named ``hidden``.
    """
    nested_then = helper.make_graph(
        [helper.make_node("Relu", ["hidden"], ["nested_out"])], "nested_then", [],
        [_out("nested_out")])
    nested_else = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["x_mean"], axes=[1], keepdims=1),
         helper.make_node("Add", ["hidden", "x_mean"], ["nested_sum"])], "nested_else", [],
        [_out("nested_sum")])
    then_branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "W", "B"], ["hidden"], name="then_conv", **CONV),
         helper.make_node("If", ["always"], ["inner"], name="inner_if",
                          then_branch=nested_then, else_branch=nested_else)],
        "then", [], [_out("inner")], [_w("B", 3)])
    else_branch = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["hidden"], name="else_flatten")],
        "else", [], [_out("hidden")])
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
             helper.make_node("Equal", ["c", "three"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="layout_check",
                              then_branch=then_branch, else_branch=else_branch),
             helper.make_node("Sigmoid", ["y"], ["out"], name="head")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])
    return _model(nodes, [x], [_out("out")],
                  [_w("W", 3, channels, 3, 3), _i64("one", 1), _i64("three", 3),
                   numpy_helper.from_array(np.array(True), "always")])


@pytest.mark.parametrize("channels", [3, 4])
def test_if_with_a_constant_condition_is_inlined(channels):
    model = exported_if_model(channels)
    prepared = load_model(model)
    graph = prepared.model.graph
    ops = [n.op_type for n in graph.node]
    assert "If" not in ops  # the outer one and, once surfaced, the nested one
    x = RNG.standard_normal((1, channels, 8, 8)).astype(np.float32)
    want = _run(model, {"x": x})[0]
    got = _run(prepared.model, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    if channels == 3:  # then-branch: the conv is a major layer with its weights
        assert ops == ["Conv", "Relu", "Sigmoid"]
        (layer,) = prepared.graph.layers
        conv_macs = 3 * 8 * 8 * 3 * 3 * 3
        assert layer.flops == 2 * conv_macs + 192 + 192  # conv, relu, sigmoid
        assert set(layer.weights) == {"W", "B"}
        assert prepared.stats.total_weight_count == 3 * 3 * 3 * 3 + 3
        assert prepared.graph.outputs[0].shape == (1, 3, 8, 8)
    else:  # else-branch: flatten only; its weights are gone with the dead branch
        assert ops == ["Flatten", "Sigmoid"]
        assert prepared.graph.outputs[0].shape == (1, 256)
        assert prepared.stats.total_weight_count == 0


def test_inlined_branch_output_that_is_an_outer_name_gets_a_copy():
    """A branch that returns an outer tensor (or its own initialiser) as is (ONNX Runtime
    refuses such a model, exporters write it, and the inlined model must run)."""
    then_branch = helper.make_graph([], "then", [], [_out("x")])
    else_branch = helper.make_graph([], "else", [], [_out("K")], [_w("K", 1, 4)])
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("If", ["flag"], ["y"], name="pick", then_branch=then_branch,
                              else_branch=else_branch),
             helper.make_node("MatMul", ["r", "Wm"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "y"], ["out"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    for flag in (True, False):
        inits = [numpy_helper.from_array(np.array(flag), "flag"), _w("Wm", 4, 4)]
        model = _model(nodes, [x], [_out("out")], inits)
        prepared = load_model(model)
        assert "If" not in [n.op_type for n in prepared.model.graph.node]
        v = RNG.standard_normal((1, 4)).astype(np.float32)
        k = numpy_helper.to_array(else_branch.initializer[0])
        wm = numpy_helper.to_array(inits[1])
        want = np.maximum(v, 0) @ wm + (v if flag else k)
        np.testing.assert_allclose(_run(prepared.model, {"x": v})[0], want, rtol=1e-5)


def gated_model(then_kernel: int, else_out: int) -> onnx.ModelProto:
    """An ``If`` whose condition depends on the data (``sum(x) > 0``), holding the whole
    network: the then-branch a conv with a weight of its own, the else-branch a 1x1 conv
    with an outer weight."""
    pad = then_kernel // 2
    then_branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "Wt"], ["t"], name="then_conv",
                          kernel_shape=[then_kernel] * 2, pads=[pad] * 4)],
        "then", [], [_out("t")], [_w("Wt", 4, 3, then_kernel, then_kernel)])
    else_branch = helper.make_graph(
        [helper.make_node("Conv", ["x", "We"], ["e"], name="else_conv", kernel_shape=[1, 1])],
        "else", [], [_out("e")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"]),
             helper.make_node("If", ["positive"], ["y"], name="gate", then_branch=then_branch,
                              else_branch=else_branch),
             helper.make_node("Relu", ["y"], ["out"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    return _model(nodes, [x], [_out("out")],
                  [_w("We", else_out, 3, 1, 1),
                   numpy_helper.from_array(np.array(0.0, np.float32), "zero")])


def test_data_dependent_if_counts_its_heavier_branch_and_its_weights():
    model = gated_model(then_kernel=3, else_out=4)
    prepared = load_model(model)
    assert [n.op_type for n in prepared.model.graph.node] == ["ReduceSum", "Greater", "If",
                                                             "Relu"]
    # The If holds major ops, so it opens the layer (its cheap prologue joins it).
    (gate,) = prepared.graph.layers
    assert gate.name == "gate"
    then_flops = 2 * (4 * 8 * 8) * (3 * 3 * 3)
    else_flops = 2 * (4 * 8 * 8) * 3
    assert then_flops > else_flops
    relu, reduce_and_compare = 4 * 8 * 8, 2
    assert gate.flops == then_flops + relu + reduce_and_compare
    assert prepared.stats.macs[gate.index] == then_flops // 2
    # The branch's own weight counts (it was hoisted), and so does the outer one (and
    # the float threshold "zero", as any float constant does).
    assert set(gate.weights) == {"Wt", "We", "zero"}
    assert prepared.stats.total_weight_count == 4 * 3 * 3 * 3 + 4 * 3 + 1
    assert set(prepared.graph.initializer_bytes) == {"Wt", "We", "zero"}
    # One note per control-flow node holding major ops, naming it.
    (note,) = prepared.stats.notes
    assert "If node 'gate'" in note and "heavier branch" in note and "\n" not in note
    # Hoisting the branch's weight keeps what the model computes.
    for sign in (1.0, -1.0):
        x = (sign * np.abs(RNG.standard_normal((1, 3, 8, 8)))).astype(np.float32)
        np.testing.assert_allclose(_run(prepared.model, {"x": x})[0],
                                   _run(model, {"x": x})[0], rtol=1e-5)


def test_data_dependent_if_with_branch_shapes_that_differ_is_one_line_naming_it():
    model = gated_model(then_kernel=3, else_out=6)  # 4 vs 6 output channels
    with pytest.raises(UserError) as err:
        load_model(model)
    text = str(err.value)
    assert "\n" not in text
    assert "If node 'gate'" in text and "'positive'" in text
    assert "chooses its branch from the input data" in text


def loop_model(trip: int | None) -> onnx.ModelProto:
    """An unrolled-in-time recurrence written as a ``Loop``: h = tanh(h @ Wh)."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "Wh"], ["mm"], name="step_matmul"),
         helper.make_node("Tanh", ["mm"], ["h_out"]),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 16])])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])]
    inits = [_w("Wh", 16, 16)]
    if trip is None:
        inputs.append(helper.make_tensor_value_info("steps", TensorProto.INT64, []))
    else:
        inits.append(_i64("steps", trip))
    nodes = [helper.make_node("Loop", ["steps", "", "x"], ["h"], name="recurrence", body=body),
             helper.make_node("Relu", ["h"], ["out"])]
    return _model(nodes, inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT,
                                                                [1, 16])], inits)


def test_loop_counts_its_body_times_a_constant_trip_count():
    per_step = 2 * 16 * 16 + 16  # matmul [1,16]x[16,16], tanh; Identity is free
    model = loop_model(5)
    five = load_model(model)
    one = load_model(loop_model(1))
    assert sum(layer.flops for layer in five.graph.layers) == 5 * per_step + 16
    assert sum(layer.flops for layer in one.graph.layers) == per_step + 16
    loop_layer = next(layer for layer in five.graph.layers if "Loop" in layer.ops)
    assert loop_layer.weights == ("Wh",)
    (note,) = five.stats.notes
    assert "Loop node 'recurrence'" in note and "x 5 iterations" in note
    x = RNG.standard_normal((1, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(five.model, {"x": x})[0],
                               _run(model, {"x": x})[0], rtol=1e-5)


def test_loop_with_a_data_dependent_trip_count_is_counted_once_and_said_so():
    prepared = load_model(loop_model(None))
    per_step = 2 * 16 * 16 + 16
    assert sum(layer.flops for layer in prepared.graph.layers) == per_step + 16
    (note,) = prepared.stats.notes
    assert "trip count not constant" in note and "'recurrence'" in note


def test_loop_whose_carried_value_changes_shape_is_one_line_naming_it():
    """The carried value grows each iteration (concat), so its final shape is unknown."""
    body = helper.make_graph(
        [helper.make_node("Concat", ["h_in", "h_in"], ["h_out"], axis=1),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, None])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, None])])
    nodes = [helper.make_node("Loop", ["steps", "", "x"], ["h"], name="doubling", body=body),
             helper.make_node("Relu", ["h"], ["out"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
                           helper.make_tensor_value_info("steps", TensorProto.INT64, [])],
                   [_out("out")], [])
    with pytest.raises(UserError) as err:
        load_model(model)
    text = str(err.value)
    assert "\n" not in text and "Loop node 'doubling'" in text
    assert "changes the shape of a loop-carried value" in text


def _f32(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_nested_control_flow_reading_outer_names():
    """A data-dependent ``If`` inside a ``Loop`` body, both reading main-graph weights, as
    scripted recurrent models are exported; and a ``Scan`` recurrence."""
    inner_then = helper.make_graph([helper.make_node("MatMul", ["h_in", "W"], ["a"])],
                                   "inner_then", [], [_out("a")])
    inner_else = helper.make_graph([helper.make_node("Neg", ["h_in"], ["b"])], "inner_else",
                                   [], [_out("b")])
    body = helper.make_graph(
        [helper.make_node("ReduceSum", ["h_in"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["h_out"], name="inner", then_branch=inner_then,
                          else_branch=inner_else),
         helper.make_node("Identity", ["c_in"], ["c_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []), _f32("h_in", [1, 16])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), _f32("h_out", [1, 16])])
    loop = _model([helper.make_node("Loop", ["M", "", "x"], ["y"], name="loop", body=body)],
                  [_f32("x", [1, 16])], [_out("y")],
                  [_w("W", 16, 16), _i64("M", 3),
                   numpy_helper.from_array(np.array(0, np.float32), "zero")])
    prepared = load_model(loop)
    (layer,) = prepared.graph.layers
    # Per iteration: reduce 1 + compare 1 + the heavier branch (matmul 2*16*16).
    assert layer.flops == 3 * (1 + 1 + 2 * 16 * 16)
    assert set(layer.weights) == {"W", "zero"}
    x = RNG.standard_normal((1, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(prepared.model, {"x": x})[0], _run(loop, {"x": x})[0],
                               rtol=1e-5)

    scan_body = helper.make_graph(
        [helper.make_node("MatMul", ["xt", "Wx"], ["p"]),
         helper.make_node("MatMul", ["hs", "Wh"], ["q"]),
         helper.make_node("Add", ["p", "q"], ["r"]), helper.make_node("Tanh", ["r"], ["hn"]),
         helper.make_node("Identity", ["hn"], ["yt"])], "scan_body",
        [_f32("hs", [1, 8]), _f32("xt", [1, 4])], [_f32("hn", [1, 8]), _f32("yt", [1, 8])])
    scan = _model([helper.make_node("Scan", ["h0", "seq"], ["hT", "ys"], name="scan",
                                    body=scan_body, num_scan_inputs=1)],
                  [_f32("h0", [1, 8]), _f32("seq", [5, 1, 4])], [_out("ys")],
                  [_w("Wx", 4, 8), _w("Wh", 8, 8)])
    prepared = load_model(scan)
    (layer,) = prepared.graph.layers
    assert layer.flops == 5 * (2 * 8 * 4 + 2 * 8 * 8 + 8 + 8)  # five slices of the cell
    assert prepared.graph.outputs[0].shape == (5, 1, 8)


def test_torchscript_export_with_shape_tests_inlines_to_the_real_network():
    """What the TorchScript exporter writes for Python ``if`` on sizes: ``Shape -> Gather ->
    Equal -> If`` around the whole network (before: one layer of ~500 FLOPs)."""
    torch = pytest.importorskip("torch")
    import io
    import warnings

    class Scripted(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8 * 8 * 8, 10)

        def forward(self, x):
            if x.size(1) == 3:
                y = self.conv(x).relu()
            else:
                y = x.flatten(1)
            if y.dim() == 4:
                y = y.flatten(1)
            return self.fc(y) if y.size(1) == 512 else y[:, :10]

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(Scripted()), (torch.randn(1, 3, 8, 8),), buf,
                          dynamo=False, input_names=["x"], opset_version=17,
                          dynamic_axes={"x": {0: "batch"}})
    model = onnx.load_from_string(buf.getvalue())
    assert "If" in [n.op_type for n in model.graph.node]
    prepared = load_model(model, shapes={"x": (1, 3, 8, 8)})
    assert "If" not in [n.op_type for n in prepared.model.graph.node]
    conv, fc = prepared.graph.layers
    assert conv.ops[0] == "Conv" and fc.ops == ("Gemm",)
    assert conv.flops == 2 * (8 * 8 * 8) * 27 + 8 * 8 * 8  # conv 2 * MACs, relu
    assert fc.flops == 2 * 512 * 10
    assert prepared.stats.total_weight_count == 8 * 27 + 8 + 512 * 10 + 10
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(prepared.model, {"x": x})[0], _run(model, {"x": x})[0],
                               rtol=1e-4, atol=1e-5)
