"""Weights shared by several layers (issue 15): a small CRNN with a re-used convolution and
an unrolled recurrent cell, written the way exporters write them (an ``Identity`` copy of a
re-used parameter, one ``Constant`` per time step holding the same bias). The front end's
totals must equal the file's unique weights, every layer must name the weights it reads,
and no weight copy may travel across a cut."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from partitioner.cli.inspect_cmd import inspect_document
from partitioner.frontend import load_model

STEPS = 4
HIDDEN = 80  # Wh is 80 x 80 = 6400 floats: larger than anything the front end folds
FEATURES = 4
CONV = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}


def crnn() -> onnx.ModelProto:
    """conv1 -> conv2 -> conv2 again (same weight) -> mean over height -> 4 unrolled steps of
    h = tanh(x_t Wx + h Wh + b) -> linear head."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array((0.3 * rng.standard_normal(shape)).astype(np.float32),
                                       name)

    bias = (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["images", "Wc1"], ["c1"], name="conv1", **CONV),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "Wc2"], ["c2"], name="conv2", **CONV),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "Wc2"], ["c3"], name="conv2_again", **CONV),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("ReduceMean", ["r3"], ["pooled"], axes=[2], keepdims=0),
        # The exporter's copies of re-used parameters: one for Wx per step, one for Wh.
        helper.make_node("Identity", ["Wh"], ["Wh_shared"]),
    ]
    h = ""
    for t in range(STEPS):
        wx = "Wx" if t == 0 else f"Wx_copy{t}"
        if t:
            nodes.append(helper.make_node("Identity", ["Wx"], [wx]))
        nodes += [
            helper.make_node("Gather", ["pooled", f"t{t}"], [f"x{t}"], axis=2),
            helper.make_node("MatMul", [f"x{t}", wx], [f"xw{t}"], name=f"cell{t}.input"),
            helper.make_node("Constant", [], [f"b{t}"],
                             value=numpy_helper.from_array(bias, f"b{t}_value")),
        ]
        pre = f"xw{t}"
        if h:
            nodes += [helper.make_node("MatMul", [h, "Wh_shared"], [f"hw{t}"],
                                       name=f"cell{t}.recurrent"),
                      helper.make_node("Add", [f"xw{t}", f"hw{t}"], [f"s{t}"])]
            pre = f"s{t}"
        nodes += [helper.make_node("Add", [pre, f"b{t}"], [f"a{t}"]),
                  helper.make_node("Tanh", [f"a{t}"], [f"h{t}"])]
        h = f"h{t}"
    nodes.append(helper.make_node("Gemm", [h, "Wo"], ["logits"], name="head", transB=1))
    inits = [w("Wc1", 4, 1, 3, 3), w("Wc2", 4, 4, 3, 3), w("Wx", FEATURES, HIDDEN),
             w("Wh", HIDDEN, HIDDEN), w("Wo", 10, HIDDEN)]
    inits += [numpy_helper.from_array(np.array(t, np.int64), f"t{t}") for t in range(STEPS)]
    graph = helper.make_graph(
        nodes, "crnn", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                      [1, 1, 8, STEPS])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def unique_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the file's float constants (initialisers and Constant nodes), each distinct
    value counted once."""
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    arrays += [numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
               for a in n.attribute if a.name == "value"]
    unique = {(a.dtype.str, a.shape, a.tobytes()): a.nbytes for a in arrays
              if a.dtype.kind == "f"}
    return sum(unique.values())


def test_shared_weights_count_once_in_the_totals_and_in_every_layer_that_reads_them():
    model = crnn()
    prepared = load_model(model)
    graph, stats = prepared.graph, prepared.stats
    want = unique_weight_bytes(model)
    assert stats.total_weight_bytes == want
    assert sum(graph.initializer_bytes.values()) == want
    doc = inspect_document(prepared)
    assert doc["totals"]["weight_bytes"] == want
    # Every layer names the weights it reads (by the file's names, no copies)...
    readers = {name: [layer.name for layer in graph.layers if name in layer.weights]
               for name in ("Wc2", "Wx", "Wh")}
    assert readers["Wc2"] == ["conv2", "conv2_again"]
    assert len(readers["Wx"]) == STEPS
    assert len(readers["Wh"]) == STEPS - 1
    assert {"Wc1", "Wc2", "Wx", "Wh", "Wo"} < set(graph.initializer_bytes)
    assert len(graph.initializer_bytes) == 6  # the five parameters and one bias
    # ... so the per-layer sum counts a shared weight in each layer that reads it.
    assert sum(layer.weight_bytes for layer in graph.layers) > want
    # A weight never crosses a cut: the largest cut is an activation, not Wh's copy.
    wh_bytes = HIDDEN * HIDDEN * 4
    assert max(c.nbytes for c in graph.cuts) < wh_bytes
    assert all(not t.startswith(("Wh", "Wx", "b")) for c in graph.cuts for t in c.tensors)
    # The prepared model computes what the file computes.
    x = np.random.default_rng(1).standard_normal((1, 1, 8, STEPS)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString()).run(None, {"images": x})[0]
           for m in (model, prepared.model)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-6)


def test_a_transformed_weight_read_by_several_layers_is_recomputed_in_each():
    """A quantised conv weight (``DequantizeLinear`` of int8) re-used by two convolutions:
    each conv's layer reads the int8 weight itself, and the float copy crosses no cut."""
    rng = np.random.default_rng(2)
    wq = numpy_helper.from_array(rng.integers(-127, 128, (8, 8, 3, 3)).astype(np.int8), "Wq")
    scale = numpy_helper.from_array(np.array(0.01, np.float32), "Wq_scale")
    stem = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
                                   "W_stem")
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "Wq_scale"], ["W_shared"]),
             helper.make_node("Conv", ["images", "W_stem"], ["c0"], name="stem", **CONV),
             helper.make_node("Conv", ["c0", "W_shared"], ["c1"], name="block", **CONV),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "W_shared"], ["c2"], name="block_again", **CONV)]
    graph = helper.make_graph(
        nodes, "reused", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                        [1, 3, 8, 8])],
        [helper.make_tensor_value_info("c2", TensorProto.FLOAT, [1, 8, 8, 8])],
        [wq, scale, stem])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    prepared = load_model(model)
    layers = prepared.graph.layers
    assert [layer.name for layer in layers] == ["stem", "block", "block_again"]
    assert "Wq" in layers[1].weights and "Wq" in layers[2].weights
    activation = 8 * 8 * 8 * 4
    assert [c.nbytes for c in prepared.graph.cuts[1:]] == [activation] * 3
    assert prepared.stats.total_weight_bytes == 8 * 8 * 9 + 4 + 8 * 27 * 4
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)
    run = [ort.InferenceSession(m.SerializeToString()).run(None, {"images": x})[0]
           for m in (model, prepared.model)]
    np.testing.assert_allclose(run[1], run[0], rtol=1e-5, atol=1e-6)


def test_tied_embedding_counts_once():
    """The input embedding and the output projection share one matrix (``Gather`` of E and
    ``MatMul`` with ``Transpose(E)``, as tied language models export)."""
    rng = np.random.default_rng(4)
    vocab, dim = 100, 64  # 6400 floats: the transpose is not folded into a copy
    emb = numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "E")
    w = numpy_helper.from_array(rng.standard_normal((dim, dim)).astype(np.float32), "W")
    nodes = [helper.make_node("Gather", ["E", "ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "W"], ["h"], name="mix"),
             helper.make_node("Transpose", ["E"], ["E_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "E_t"], ["logits"], name="unembed")]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 8, vocab])], [emb, w])
    prepared = load_model(helper.make_model(graph,
                                            opset_imports=[helper.make_opsetid("", 17)]))
    readers = [layer.name for layer in prepared.graph.layers if "E" in layer.weights]
    assert readers == ["mix", "unembed"]  # the (cheap) Gather joins the first major layer
    assert prepared.stats.total_weight_bytes == (vocab * dim + dim * dim) * 4
    assert sum(prepared.graph.initializer_bytes.values()) == (vocab * dim + dim * dim) * 4
    assert max(c.nbytes for c in prepared.graph.cuts) == 8 * vocab * 4  # the logits
