"""Front end preparation: --shape, shape inference, folding of shape code, external data,
and the errors for bad input."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from partitioner.errors import UserError
from partitioner.frontend import load_model

SHAPE_OPS = {"Shape", "Size", "Gather", "Concat", "Unsqueeze", "Slice", "Cast",
             "ConstantOfShape", "Range", "Constant"}


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _i64(name: str, values) -> TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def shape_code_model() -> onnx.ModelProto:
    """Conv, then a Reshape whose target is computed Shape -> Gather -> Unsqueeze -> Concat,
    then a Gemm (flatten keeping the dynamic batch, as exporters write it)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["images", "W"], ["c"], name="conv", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
        helper.make_node("Cast", ["minus1"], ["m1"], to=TensorProto.INT64),
        helper.make_node("Concat", ["n1", "m1"], ["target"], axis=0),
        helper.make_node("Reshape", ["c", "target"], ["flat"]),
        helper.make_node("Gemm", ["flat", "Wf"], ["logits"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal((10, 4 * 8 * 8)).astype(np.float32),
                                     "Wf"),
             _i64("zero", 0), _i64("axes", [0]), _i64("minus1", [-1])]
    inputs = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])]
    return _model(nodes, inputs, outputs, inits)


def test_shape_subgraph_is_folded_and_not_a_cut(save_onnx):
    model = shape_code_model()
    prepared = load_model(save_onnx(model), shapes={"images": (2, 3, 8, 8)})
    ops = [n.op_type for n in prepared.model.graph.node]
    assert ops == ["Conv", "Reshape", "Gemm"]
    assert not SHAPE_OPS & set(ops)
    assert prepared.folded == 5
    conv, fc = prepared.graph.layers
    # Only the reshaped activation crosses the cut: no int64 shape tensor inflates it.
    assert prepared.graph.cut_after(0).tensors == ("flat",)
    assert conv.cut_bytes == 2 * 256 * 4
    assert prepared.graph.outputs[0].shape == (2, 10)
    # The folded target is the one the shape code computes, and the model still runs.
    target = {t.name: t for t in prepared.model.graph.initializer}["target"]
    assert numpy_helper.to_array(target).tolist() == [2, -1]
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"images": x})[0]
    got = ort.InferenceSession(prepared.model.SerializeToString()).run(None, {"images": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_shape_fixes_every_kind_of_dynamic_dim(save_onnx):
    model = shape_code_model()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()                # unset
    dims[2].Clear()
    dims[2].dim_value = -1         # -1
    dims[3].Clear()
    dims[3].dim_param = "?"        # ?
    with pytest.raises(UserError, match=r"input 'images' axis 0 is dynamic.*--shape images="):
        load_model(save_onnx(model))
    prepared = load_model(save_onnx(model), shapes={"images": (1, 3, 8, 8)})
    assert prepared.graph.inputs[0].shape == (1, 3, 8, 8)
    assert prepared.model.graph.input[0].type.tensor_type.shape.dim[3].dim_value == 8


@pytest.mark.parametrize(("shapes", "message"), [
    ({"image": (1, 3, 8, 8)}, r"--shape image: .* has no input 'image' \(inputs: images\)"),
    ({"images": (1, 3, 8)}, r"--shape images: input 'images' has rank 4, got 3"),
    ({"images": (1, 3, 16, 8)}, r"axis 2 of input 'images' is fixed at 8 .*got 16"),
])
def test_bad_shape_options(save_onnx, shapes, message):
    with pytest.raises(UserError, match=message):
        load_model(save_onnx(shape_code_model()), shapes=shapes)


def test_external_weights_are_never_read(save_onnx, tmp_path):
    path = save_onnx(shape_code_model(), "ext.onnx", save_as_external_data=True,
                     all_tensors_to_one_file=True, location="ext.onnx.data",
                     size_threshold=256)
    with_data = load_model(path, shapes={"images": (2, 3, 8, 8)})
    (tmp_path / "ext.onnx.data").unlink()
    without = load_model(path, shapes={"images": (2, 3, 8, 8)})
    assert [layer.weight_count for layer in without.graph.layers] == [4 * 27, 10 * 256]
    assert [layer.weight_bytes for layer in without.graph.layers] == [4 * 27 * 4, 10 * 256 * 4]
    assert without.graph.layers == with_data.graph.layers
    assert without.graph.cuts == with_data.graph.cuts
    # The weights stay references to the (now missing) file, relative to base_dir.
    wf = {t.name: t for t in without.model.graph.initializer}["Wf"]
    assert wf.data_location == TensorProto.EXTERNAL and not wf.raw_data
    assert without.base_dir == tmp_path.resolve()


def test_uninferable_shape_names_the_tensor(save_onnx):
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Mystery", ["r"], ["m"], domain="example.custom", name="odd"),
             helper.make_node("Relu", ["m"], ["y"])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.custom", 1)])
    with pytest.raises(UserError, match=r"shape of tensor 'm' \(output of Mystery node 'odd'\)"):
        load_model(save_onnx(model))


def test_truncated_and_non_onnx_files(save_onnx, tmp_path):
    good = save_onnx(shape_code_model())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match=r"truncated\.onnx"):
        load_model(truncated, shapes={"images": (1, 3, 8, 8)})
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.onnx: not an ONNX model"):
        load_model(empty)
    with pytest.raises(UserError, match="no such file"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(UserError, match="not a file"):
        load_model(tmp_path)


def test_graph_reading_an_undefined_tensor_is_an_error(save_onnx):
    nodes = [helper.make_node("Add", ["x", "ghost"], ["y"], name="add")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [])
    with pytest.raises(UserError, match=r"tensor 'ghost' read by node 'add' is never defined"):
        load_model(save_onnx(model))


def test_initialisers_listed_as_inputs_are_not_model_inputs(save_onnx):
    # IR version 3 models list every initialiser among the graph inputs too.
    model = shape_code_model()
    for t in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type,
                                                               list(t.dims)))
    prepared = load_model(save_onnx(model), shapes={"images": (1, 3, 8, 8)})
    assert [t.name for t in prepared.graph.inputs] == ["images"]
    assert prepared.graph.cuts[0].tensors == ("images",)


def test_folded_scalars_keep_rank_zero(save_onnx):
    # Regression: a folded 0-d Constant index must stay 0-d, else Gather keeps the axis.
    nodes = [helper.make_node("Constant", [], ["idx"], value=_i64("v", 0)),
             helper.make_node("Gather", ["x", "idx"], ["g"], axis=1),
             helper.make_node("MatMul", ["g", "W"], ["y"], name="head")]
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    prepared = load_model(save_onnx(model))
    assert prepared.graph.outputs[0].shape == (2, 3)
    assert numpy_helper.to_array(prepared.model.graph.initializer[-1]).shape == ()


def test_model_over_2gb_is_analysed_from_dims_alone(save_onnx):
    # A 2.4 GB weight whose external file does not even exist: only dims and dtype are used.
    big = TensorProto(name="W", dims=[50_000, 12_000], data_type=TensorProto.FLOAT,
                      data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "weights.bin"), ("offset", "0"),
                       ("length", str(50_000 * 12_000 * 4))):
        big.external_data.add(key=key, value=value)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="huge"),
             helper.make_node("Relu", ["h"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 50_000])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [big])
    path = save_onnx(model)
    assert path.stat().st_size < 10_000
    (layer,) = load_model(path).graph.layers
    assert layer.weight_bytes == 50_000 * 12_000 * 4 > 2**31
    assert layer.flops == 2 * 50_000 * 12_000 + 12_000


def test_contrib_ops_are_inferred_by_onnxruntime_symbolic_inference(save_onnx):
    # ONNX's own inference does not know com.microsoft ops; ORT's symbolic inference does.
    ones = [numpy_helper.from_array(np.ones(s, np.float32), n)
            for n, s in (("W", (8, 16)), ("W2", (16, 4)), ("b", (16,)), ("gamma", (16,)),
                         ("beta", (16,)))]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
             helper.make_node("BiasGelu", ["h", "b"], ["g"], domain="com.microsoft"),
             helper.make_node("SkipLayerNormalization", ["g", "g", "gamma", "beta"], ["n"],
                              domain="com.microsoft"),
             helper.make_node("MatMul", ["n", "W2"], ["y"], name="mm2")]
    model = helper.make_model(
        helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], ones),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    prepared = load_model(save_onnx(model))
    assert [layer.ops for layer in prepared.graph.layers] == [
        ("MatMul", "BiasGelu", "SkipLayerNormalization"), ("MatMul",)]
    assert prepared.graph.cut_after(0).tensors == ("n",)
    assert prepared.graph.cut_after(0).nbytes == 2 * 3 * 16 * 4


def test_incomplete_contrib_inference_writes_nothing_to_the_working_directory(
        tmp_path, monkeypatch):
    # onnxruntime's public infer_shapes() saves "sym_shape_infer_temp.onnx" into the
    # current directory when it cannot finish; the front end must leave no file behind.
    import numpy as np
    from onnx import numpy_helper

    from partitioner.errors import UserError
    from partitioner.frontend import load_model

    monkeypatch.chdir(tmp_path)
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("FusedConv", ["x", "w"], ["y"], domain="com.microsoft",
                          activation="Relu", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["y"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UserError, match="'y'.*cannot be inferred"):
        load_model(model)
    assert list(tmp_path.iterdir()) == []
