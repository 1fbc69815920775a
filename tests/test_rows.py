"""Row geometry of the front end: the input rows a band of output rows needs, and which
layers can be split by rows (``Layer.rows``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from partitioner.frontend.rows import (
    constant_names,
    input_rows,
    layer_geometry,
    layer_rows,
    node_row_op,
    op_input_rows,
    shape_map,
)
from partitioner.ir import RowOp
from tests.test_parts import _Stack, stack_a, stack_b
from tests.test_slicing_fixtures import prepare, run_model


def test_the_rule_and_its_clipping():
    conv = RowOp("Conv", kernel=3, stride=1, pad_top=1, pad_bottom=1, dilation=1,
                 in_height=10, out_height=10)
    assert op_input_rows(conv, 0, 3) == (0, 4, 1, 0)  # row -1 is padding
    assert op_input_rows(conv, 4, 6) == (3, 7, 0, 0)
    assert op_input_rows(conv, 7, 9) == (6, 9, 0, 1)
    dilated = RowOp("Conv", 3, 2, 2, 2, 2, in_height=11, out_height=6)
    # rows [a*S - P, b*S - P + d*(F-1)] = [2*2-2, 3*2-2+4] = [2, 8]
    assert op_input_rows(dilated, 2, 3) == (2, 8, 0, 0)
    assert op_input_rows(dilated, 5, 5) == (8, 10, 0, 2)
    pool = RowOp("MaxPool", 2, 2, 0, 0, 1, in_height=9, out_height=4)
    assert op_input_rows(pool, 3, 3) == (6, 7, 0, 0)  # row 8 is never read
    # backwards through conv then pool: pool rows 0..1 <- conv rows 0..3 <- input 0..4
    conv10 = RowOp("Conv", 3, 1, 1, 1, 1, in_height=8, out_height=8)
    pool8 = RowOp("MaxPool", 2, 2, 0, 0, 1, in_height=8, out_height=4)
    assert input_rows([conv10, pool8], 0, 1) == (0, 4, 1, 0)
    with pytest.raises(ValueError):
        input_rows([conv10, pool8], 2, 4)


@pytest.mark.parametrize("build", [stack_a, stack_b])
def test_rows_outside_the_rule_cannot_reach_a_band(build):
    """Whole model in ONNX Runtime with every input row the rule does not name set to NaN:
    the band stays finite, so the rule names every row the band depends on; with one row
    of the rule set to NaN instead, the band changes, so it names no row too many."""
    model = build()
    prepared = prepare(model)
    ops = [op for r in layer_rows(prepared.model, prepared.graph) for op in (r or ())]
    assert len(ops) == len(model.graph.node)
    x_shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)
    height = ops[-1].out_height
    rng = np.random.default_rng(3)
    x = rng.standard_normal(x_shape).astype(np.float32)
    y = model.graph.output[0].name
    for a, b in [(0, 0), (1, height // 2), (height - 1, height - 1)]:
        lo, hi, _, _ = input_rows(ops, a, b)
        poisoned = np.full_like(x, np.nan)
        poisoned[:, :, lo:hi + 1] = x[:, :, lo:hi + 1]
        band = run_model(model, {"x": poisoned})[y][:, :, a:b + 1]
        assert np.isfinite(band).all()
        clean = run_model(model, {"x": x})[y][:, :, a:b + 1]
        assert np.array_equal(band, clean)
        if build is stack_b:  # convolutions and average pools propagate a NaN (max pools
            for edge in (lo, hi):  # need not), so each end row of the rule is read
                one = x.copy()
                one[:, :, edge] = np.nan
                assert not np.isfinite(run_model(model, {"x": one})[y][:, :, a:b + 1]).all()


def _branches(second_kernel: int) -> onnx.ModelProto:
    """x -> conv3 (a); a -> convK (b); add(a, b): one layer whose branches both read a."""
    s = _Stack(2, 9, 9)
    a = s.conv(2, 3, pads=[1, 1, 1, 1])
    s.conv(2, second_kernel, pads=[second_kernel // 2] * 4)
    s._add("Add", [a, s.x])
    return s.model()


def test_a_residual_inside_a_layer_splits_only_when_one_path_has_the_kernels():
    for kernel, splittable in ((1, True), (3, True)):
        prepared = prepare(_branches(kernel), [[0, 1, 2]])
        rows = layer_rows(prepared.model, prepared.graph)[0]
        # conv3 -> conv(K) -> add lie on one path; the skip adds only element-wise work
        assert (rows is not None) == splittable
    # two convolutions on parallel branches: not one path
    s = _Stack(2, 9, 9)
    s.conv(2, 3, pads=[1, 1, 1, 1])
    left = s.x
    s.x = "x"
    s.c = 2
    s.conv(2, 3, pads=[1, 1, 1, 1])
    s._add("Add", [left, s.x])
    prepared = prepare(s.model(), [[0, 1, 2]])
    model, layer = prepared.model, prepared.graph.layers[0]
    reason = layer_geometry(model, layer, shape_map(model), constant_names(model))
    assert isinstance(reason, str) and "parallel branches" in reason


def _single(op: str, height: int, **attrs: object) -> str | RowOp:
    s = _Stack(2, height, 5)
    s.op(op, **attrs)
    model = s.model()
    return node_row_op(model.graph.node[0], shape_map(model), constant_names(model))


def test_pool_modes_and_auto_pad():
    assert isinstance(_single("MaxPool", 9, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
                      RowOp)
    reason = _single("MaxPool", 10, kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
    assert isinstance(reason, str) and "ceil_mode" in reason
    same = _single("AveragePool", 10, kernel_shape=[4, 4], strides=[3, 3],
                   auto_pad="SAME_LOWER")
    # out = ceil(10/3) = 4; total pad = 3*3 + 4 - 10 = 3, SAME_LOWER puts 2 on top
    assert isinstance(same, RowOp) and (same.pad_top, same.pad_bottom, same.out_height) == (2, 1, 4)
    assert "not row-local" in str(_single("GlobalAveragePool", 6))


def test_operands_must_broadcast_over_the_rows():
    s = _Stack(2, 6, 5)
    s.inits.append(helper.make_tensor("k", TensorProto.FLOAT, [1, 2, 6, 1], [1.0] * 12))
    s.op("Mul", "k")
    model = s.model()
    reason = node_row_op(model.graph.node[0], shape_map(model), constant_names(model))
    assert isinstance(reason, str) and "varies along the rows" in reason
    s = _Stack(2, 6, 5)
    s.inits.append(helper.make_tensor("k", TensorProto.FLOAT, [2, 1, 1], [1.0, 2.0]))
    s.op("Mul", "k")
    model = s.model()
    assert isinstance(node_row_op(model.graph.node[0], shape_map(model),
                                  constant_names(model)), RowOp)


def test_load_model_fills_layer_rows():
    import models
    from partitioner.frontend import load_model

    cnn = load_model(models.build_model("resnet18", image_size=64)).graph
    first = cnn.layers[0].rows
    assert first is not None
    assert [(r.op, r.kernel, r.stride, r.pad_top) for r in first] == [
        ("Conv", 7, 2, 3), ("BatchNormalization", 1, 1, 0), ("Relu", 1, 1, 0),
        ("MaxPool", 3, 2, 1)]
    assert (first[0].in_height, first[0].out_height, first[-1].out_height) == (64, 32, 16)
    assert cnn.layers[-1].rows is None  # fc (Gemm)
    assert cnn.layers[-2].rows is None  # ends in global pooling + Flatten
    vit = load_model(models.build_model("vit_tiny")).graph
    assert all(layer.rows is None for layer in vit.layers)
