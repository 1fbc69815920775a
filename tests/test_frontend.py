"""Front end: major-layer grouping, cuts, FLOP and weight counts on hand-built graphs."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from partitioner.frontend import load_model

F32 = 4  # bytes per float32 element


def _w(name: str, *shape: int, dtype: type = np.float32) -> TensorProto:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), name)


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto], inits: list[TensorProto],
           opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name: str, *shape: int | str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape) or None)


def skip_dag() -> onnx.ModelProto:
    """Four convs; ``a`` skips two cuts, ``x`` is read by the last layer, ``b`` is an early
    output. Every activation is 1x4x8x8 float32 = 1024 bytes."""
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["t1"], name="conv1", **conv),
        helper.make_node("Relu", ["t1"], ["a"], name="relu1"),
        helper.make_node("Conv", ["a", "W2"], ["b"], name="conv2", **conv),
        helper.make_node("Conv", ["b", "W3"], ["c"], name="conv3", **conv),
        helper.make_node("Add", ["c", "a"], ["d"], name="skip_add"),
        helper.make_node("Conv", ["d", "W4"], ["e"], name="conv4", **conv),
        helper.make_node("Add", ["e", "b"], ["f"], name="add2"),
        helper.make_node("Mul", ["f", "x"], ["out"], name="gate"),
    ]
    inits = [_w("W1", 4, 4, 3, 3), _w("B1", 4), _w("W2", 4, 4, 3, 3), _w("W3", 4, 4, 3, 3),
             _w("W4", 4, 4, 3, 3)]
    return _model(nodes, [_vi("x", 1, 4, 8, 8)], [_vi("out"), _vi("b")], inits)


def test_skip_dag_cut_sets_and_bytes(save_onnx):
    prepared = load_model(save_onnx(skip_dag()))
    g = prepared.graph
    assert [layer.name for layer in g.layers] == ["conv1", "conv2", "conv3", "conv4"]
    assert [layer.ops for layer in g.layers] == [
        ("Conv", "Relu"), ("Conv",), ("Conv", "Add"), ("Conv", "Add", "Mul")]
    act = 1 * 4 * 8 * 8 * F32
    expected = [
        (-1, ("x",)),
        (0, ("x", "a")),            # a is read by skip_add in layer 2, x by gate in layer 3
        (1, ("x", "a", "b")),       # b: read by add2 (layer 3) and an output
        (2, ("x", "b", "d")),       # a consumed in layer 2; c stays inside layer 2
        (3, ("b", "out")),          # the outputs, b produced early and live to the end
    ]
    assert [(c.after, c.tensors) for c in g.cuts] == expected
    assert [c.nbytes for c in g.cuts] == [act * len(t) for _, t in expected]
    assert [layer.cut_bytes for layer in g.layers] == [c.nbytes for c in g.cuts[1:]]
    assert g.cut_after(-1) is g.cuts[0]
    assert all(g.tensors[t].nbytes == act for c in g.cuts for t in c.tensors)
    # output_bytes: what a layer produces that another layer (or the destination) reads.
    assert [layer.output_bytes for layer in g.layers] == [act, act, act, act]
    assert [t.name for t in g.outputs] == ["out", "b"]


def test_skip_dag_flops_and_weights(save_onnx):
    prepared = load_model(save_onnx(skip_dag()))
    layers = prepared.graph.layers
    conv_macs = (4 * 8 * 8) * 4 * 3 * 3  # Cout*Hout*Wout * Cin/groups*kh*kw, batch 1
    elem = 4 * 8 * 8
    assert [layer.flops for layer in layers] == [
        2 * conv_macs + elem, 2 * conv_macs, 2 * conv_macs + elem, 2 * conv_macs + 2 * elem]
    assert prepared.stats.macs == (conv_macs,) * 4
    assert [layer.weight_count for layer in layers] == [144 + 4, 144, 144, 144]
    assert [layer.weight_bytes for layer in layers] == [4 * 148, 4 * 144, 4 * 144, 4 * 144]
    assert prepared.stats.total_weight_count == 148 + 3 * 144


def test_node_granularity_every_node_is_a_layer(save_onnx):
    prepared = load_model(save_onnx(skip_dag()), granularity="node")
    g = prepared.graph
    assert g.granularity == "node"
    assert [layer.name for layer in g.layers] == [
        "conv1", "relu1", "conv2", "conv3", "skip_add", "conv4", "add2", "gate"]
    # After conv3 (layer 3): x, a, b and c are all live.
    assert g.cut_after(3).tensors == ("x", "a", "b", "c")
    assert g.cut_after(0).tensors == ("x", "t1")


def test_conv_gemm_matmul_formulas(save_onnx):
    nodes = [
        # grouped, strided conv: 2x8x16x16 -> 2x16x8x8, W (16, 4, 3, 3), groups 2
        helper.make_node("Conv", ["x", "Wc"], ["c"], name="gconv", group=2, strides=[2, 2],
                         pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Flatten", ["c"], ["fl"], axis=1),                 # 2 x 1024
        helper.make_node("Gemm", ["fl", "Wg", "Bg"], ["g"], name="fc", transB=1),  # 2 x 64
        helper.make_node("Reshape", ["g", "shp"], ["r"]),                   # 2 x 8 x 8
        helper.make_node("MatMul", ["r", "Wm"], ["m"], name="mm"),          # 2 x 8 x 5
        helper.make_node("ConvTranspose", ["x", "Wt"], ["ct"], name="deconv",
                         strides=[2, 2], kernel_shape=[2, 2]),              # 2 x 3 x 32 x 32
    ]
    inits = [_w("Wc", 16, 4, 3, 3), _w("Wg", 64, 1024), _w("Bg", 64),
             numpy_helper.from_array(np.array([2, 8, 8], np.int64), "shp"),
             _w("Wm", 8, 5), _w("Wt", 8, 3, 2, 2)]
    model = _model(nodes, [_vi("x", 2, 8, 16, 16)], [_vi("m"), _vi("ct")], inits)
    prepared = load_model(save_onnx(model))
    by_name = {layer.name: layer for layer in prepared.graph.layers}
    assert list(by_name) == ["gconv", "fc", "mm", "deconv"]
    assert by_name["gconv"].flops == 2 * 16 * 8 * 8 * (8 // 2) * 3 * 3 * 2 + 0  # Flatten: free
    assert by_name["fc"].flops == 2 * 2 * 64 * 1024
    assert by_name["mm"].flops == 2 * 2 * 8 * 5 * 8
    # ConvTranspose: every input element times a (Cout/groups, kh, kw) kernel slice.
    assert by_name["deconv"].flops == 2 * (2 * 8 * 16 * 16) * (3 * 2 * 2)
    assert by_name["fc"].weight_count == 64 * 1024 + 64
    assert by_name["mm"].weight_count == 40  # the int64 Reshape target is not a weight
    assert prepared.stats.total_weight_count == 16 * 36 + 64 * 1025 + 40 + 8 * 3 * 4
    # fc carries the Reshape, so fc's output across the cut is the reshaped tensor.
    assert prepared.graph.cut_after(1).tensors == ("x", "r")


def test_rnn_and_einsum_flops(save_onnx):
    seq, batch, inp, hid = 5, 2, 3, 4
    nodes = [
        helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], name="lstm", hidden_size=hid),
        helper.make_node("Einsum", ["y", "E"], ["z"], name="proj", equation="sdbh,hk->sdbk"),
    ]
    inits = [_w("W", 1, 4 * hid, inp), _w("R", 1, 4 * hid, hid), _w("B", 1, 8 * hid),
             _w("E", hid, 6)]
    model = _model(nodes, [_vi("x", seq, batch, inp)], [_vi("z")], inits)
    prepared = load_model(save_onnx(model))
    lstm, proj = prepared.graph.layers
    macs = seq * batch * 4 * hid * (inp + hid)
    assert lstm.flops == 2 * macs + seq * batch * 17 * hid
    assert prepared.stats.macs[0] == macs
    assert lstm.weight_count == 4 * hid * inp + 4 * hid * hid + 8 * hid
    assert proj.flops == 2 * (seq * 1 * batch * 6) * hid


def test_shared_weight_counts_in_each_layer_once_in_total(save_onnx):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="first"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="second")]
    model = _model(nodes, [_vi("x", 2, 16)], [_vi("y")], [_w("W", 16, 16)])
    prepared = load_model(save_onnx(model))
    assert [layer.weight_count for layer in prepared.graph.layers] == [256, 256]
    assert prepared.stats.total_weight_count == 256
    assert prepared.stats.total_weight_bytes == 256 * F32


def test_float_constant_nodes_are_weights_and_go_with_their_consumer(save_onnx):
    const = helper.make_node("Constant", [], ["Wc"], value=_w("Wc", 8, 8))
    scale = helper.make_node("Constant", [], ["s"], value=_w("s", 1))
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["h"], name="first"), const, scale,
             helper.make_node("MatMul", ["h", "Wc"], ["y0"], name="second"),
             helper.make_node("Mul", ["y0", "s"], ["y"])]
    model = _model(nodes, [_vi("x", 1, 8)], [_vi("y")], [_w("W0", 8, 8)])
    prepared = load_model(save_onnx(model))
    first, second = prepared.graph.layers
    assert (first.weight_count, second.weight_count) == (64, 64 + 1)
    assert all(n.op_type != "Constant" for n in prepared.model.graph.node)
    assert prepared.graph.cut_after(0).tensors == ("h",)  # no weight crosses the cut


def test_prologue_before_first_major_joins_layer_zero(save_onnx):
    nodes = [helper.make_node("Sub", ["x", "mean"], ["n"], name="normalise"),
             helper.make_node("Conv", ["n", "W"], ["y"], name="conv", kernel_shape=[1, 1])]
    mean = numpy_helper.from_array(np.zeros((1, 3, 1, 1), np.float32), "mean")
    model = _model(nodes, [_vi("x", 1, 3, 4, 4)], [_vi("y")], [mean, _w("W", 2, 3, 1, 1)])
    (layer,) = load_model(save_onnx(model)).graph.layers
    assert layer.name == "conv" and layer.ops == ("Sub", "Conv")


def test_non_topological_node_order_is_sorted(save_onnx):
    model = skip_dag()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    prepared = load_model(save_onnx(model))
    assert [c.tensors for c in prepared.graph.cuts] == [
        c.tensors for c in load_model(save_onnx(skip_dag(), "b.onnx")).graph.cuts]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@st.composite
def random_dags(draw: st.DrawFn) -> onnx.ModelProto:
    """Random DAGs of MatMul (major) and Add/Relu/Mul (cheap) nodes on 1x8 tensors, with
    skips anywhere, two inputs and one or two outputs (one possibly produced early)."""
    count = draw(st.integers(3, 12))
    tensors = ["x0", "x1"]
    nodes, inits = [], []
    for i in range(count):
        op = draw(st.sampled_from(["MatMul", "Add", "Relu", "Mul"]))
        a = draw(st.sampled_from(tensors))
        out = f"t{i}"
        if op == "MatMul":
            inits.append(_w(f"W{i}", 8, 8))
            nodes.append(helper.make_node(op, [a, f"W{i}"], [out], name=f"mm{i}"))
        elif op == "Relu":
            nodes.append(helper.make_node(op, [a], [out]))
        else:
            nodes.append(helper.make_node(op, [a, draw(st.sampled_from(tensors))], [out]))
        tensors.append(out)
    outs = sorted({tensors[-1], draw(st.sampled_from(tensors[2:]))})
    return _model(nodes, [_vi("x0", 1, 8), _vi("x1", 1, 8)], [_vi(o) for o in outs], inits)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(model=random_dags(), granularity=st.sampled_from(["major", "node"]))
def test_random_dags_cuts_are_valid(save_onnx, model, granularity):
    prepared = load_model(save_onnx(model), granularity=granularity)
    g, nodes = prepared.graph, prepared.model.graph.node
    layer_of = {i: layer.index for layer in g.layers for i in layer.nodes}
    assert sorted(layer_of) == list(range(len(nodes)))  # each node in exactly one layer
    assert all(list(layer.nodes) == sorted(layer.nodes) for layer in g.layers)
    produced = {o: layer_of[i] for i, n in enumerate(nodes) for o in n.output}
    produced.update({v.name: -1 for v in model.graph.input})
    consumed: dict[str, set[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            if name in produced:
                # Grouping invariant: a producer's layer is never after its consumer's.
                assert produced[name] <= layer_of[i]
                consumed.setdefault(name, set()).add(layer_of[i])
    final = len(g.layers)
    for o in model.graph.output:
        consumed.setdefault(o.name, set()).add(final)
    assert len(g.cuts) == final + 1
    for cut in g.cuts:
        live = {t for t, p in produced.items()
                if p <= cut.after and any(c > cut.after for c in consumed.get(t, ()))}
        assert set(cut.tensors) == live
        assert cut.nbytes == 8 * F32 * len(live)
    # The prepared (reordered) model still computes what the original computes.
    feeds = {"x0": np.ones((1, 8), np.float32), "x1": np.full((1, 8), 0.5, np.float32)}
    for want, got in zip(_run(model, feeds), _run(prepared.model, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_unknown_granularity_is_an_error(save_onnx):
    from partitioner.errors import UserError

    with pytest.raises(UserError, match="granularity"):
        load_model(save_onnx(skip_dag()), granularity="layer")


def test_qdq_weight_dequantisation_goes_with_its_conv(save_onnx):
    # DequantizeLinear of a weight reads only constants: it joins its consumer's layer
    # instead of layer 0, so no dequantised weight crosses a cut; int8 weights count.
    def q(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array(np.ones(shape, np.int8), name)

    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "scale", "zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["W1q", "scale", "zero"], ["W1"]),
             helper.make_node("DequantizeLinear", ["W2q", "scale", "zero"], ["W2"]),
             helper.make_node("Conv", ["xd", "W1"], ["y1"], name="conv1", **conv),
             helper.make_node("Conv", ["y1", "W2"], ["y2"], name="conv2", **conv)]
    model = _model(nodes, [_vi("x", 1, 3, 8, 8)], [_vi("y2")],
                   [scale, zero, q("W1q", 4, 3, 3, 3), q("W2q", 4, 4, 3, 3)], opset=13)
    prepared = load_model(save_onnx(model))
    conv1, conv2 = prepared.graph.layers
    assert conv1.ops == ("QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv")
    assert conv2.ops == ("DequantizeLinear", "Conv")
    assert prepared.graph.cut_after(0).tensors == ("y1",)
    assert conv2.weight_count == 4 * 4 * 9 + 2 and conv2.weight_bytes == 144 + 4 + 1
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32)}
    np.testing.assert_allclose(_run(prepared.model, feeds)[0], _run(model, feeds)[0])
