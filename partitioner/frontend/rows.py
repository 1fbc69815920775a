"""Row geometry: which layers can be split by output rows, and the rows each part needs.

DISTREDGE splits a run of convolutional layers by the rows (height axis, NCHW axis 2) of
its output: each device computes a band of output rows from the band of input rows it
needs. For one op with kernel ``F``, stride ``S``, top padding ``P`` and dilation ``d``,
output rows ``[a, b]`` need input rows ``[a*S - P, b*S - P + d*(F-1)]``; clipped to the
input, the rows cut off become that band's own padding, so the bands reproduce the whole
op exactly. Over a run of ops the rule is applied backwards, op by op.

An op is *row-local* when it maps rows like that: Conv, MaxPool / AveragePool (floor
mode, or ceil mode when it adds no row), BatchNormalization, LRN and element-wise ops
(kernel 1), Concat / Split over the channels, and Add / Sub / Mul / Div / ... whose other
operand is a weight or a tensor that broadcasts over the rows or has the same rows. Gemm,
MatMul, Flatten, Reshape, global pooling, attention and Concat over the height are not.
A layer can be split when its data nodes are row-local and its non-element-wise ops lie
on one path (a branch that only adds element-wise work, as a residual Add, is fine).
:func:`layer_rows` fills ``Layer.rows``; :func:`node_row_op` is the per-node rule that
the back end's part builder shares.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import onnx
from onnx import helper

from partitioner.frontend.tensors import node_inputs, static_shape
from partitioner.ir import Layer, LayerGraph, RowOp

__all__ = [
    "ELEMENTWISE",
    "BINARY",
    "Shapes",
    "shape_map",
    "constant_names",
    "spatial_pads",
    "node_row_op",
    "layer_rows",
    "layer_geometry",
    "with_rows",
    "op_input_rows",
    "input_rows",
    "output_height",
]

HEIGHT = 2  # NCHW

#: Ops that act on each element (or each pixel's channel vector) alone: rows map 1:1.
ELEMENTWISE = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip",
    "Elu", "Selu", "Celu", "Gelu", "Softplus", "Softsign", "Mish", "Identity", "Dropout",
    "Cast", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Floor", "Ceil",
    "Round", "Sign", "Not", "IsNaN", "IsInf", "BatchNormalization", "LRN",
    "QuantizeLinear", "DequantizeLinear",
})
#: Element-wise ops with several operands; each operand must broadcast over the rows or
#: have the output's rows.
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Where",
                    "Equal", "Greater", "Less", "And", "Or", "Xor", "BitShift", "Mod"})
_POOLS = frozenset({"MaxPool", "AveragePool"})

Shapes = Mapping[str, tuple[int, ...]]


def shape_map(model: onnx.ModelProto, weights: Iterable[onnx.TensorProto] = ()
              ) -> dict[str, tuple[int, ...]]:
    """Static shape of every value the model's top graph knows (initialisers and the
    extra ``weights`` of a stage shell included)."""
    g = model.graph
    shapes: dict[str, tuple[int, ...]] = {t.name: tuple(int(d) for d in t.dims)
                                          for t in (*g.initializer, *weights)}
    for vi in (*g.input, *g.value_info, *g.output):
        s = static_shape(vi.type)
        if s is not None:
            shapes[vi.name] = s
    return shapes


def constant_names(model: onnx.ModelProto, weights: Iterable[onnx.TensorProto] = ()
                   ) -> set[str]:
    """Initialisers (and ``weights``) and every value computed from constants only."""
    const = {t.name for t in (*model.graph.initializer, *weights)}
    for node in model.graph.node:
        if all(n in const for n in node_inputs(node) if n):
            const.update(o for o in node.output if o)
    return const


def _ints(node: onnx.NodeProto, name: str, default: Sequence[int]) -> list[int]:
    for a in node.attribute:
        if a.name == name:
            return list(helper.get_attribute_value(a))
    return list(default)


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    return default


def _str_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else str(value)
    return default


def _kernel(node: onnx.NodeProto, shapes: Shapes) -> list[int] | None:
    kernel = _ints(node, "kernel_shape", [])
    if not kernel and node.op_type == "Conv" and len(node.input) > 1:
        w = shapes.get(node.input[1])
        kernel = list(w[2:]) if w is not None else []
    return kernel or None


def spatial_pads(node: onnx.NodeProto, in_shape: Sequence[int], shapes: Shapes
                 ) -> tuple[list[int], list[int], list[int], list[int]] | str:
    """``(kernel, strides, dilations, pads)`` of a Conv / pool, ``auto_pad`` made explicit.

    ``pads`` is ONNX's ``[begin_0, begin_1, ..., end_0, end_1, ...]`` over the spatial
    axes; a string is the reason the geometry is unknown.
    """
    kernel = _kernel(node, shapes)
    if kernel is None:
        return "kernel shape unknown"
    n = len(kernel)
    strides = _ints(node, "strides", [1] * n)
    dilations = _ints(node, "dilations", [1] * n)
    auto = _str_attr(node, "auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = _ints(node, "pads", [0] * (2 * n))
    elif auto == "VALID":
        pads = [0] * (2 * n)
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(n):
            size = int(in_shape[2 + i])
            out = math.ceil(size / strides[i])
            total = max((out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - size, 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        pads = begin + end
    else:
        return f"auto_pad {auto!r} unknown"
    return kernel, strides, dilations, pads


def output_height(op: RowOp) -> int:
    """Rows a (floor-mode) op produces from ``op.in_height`` rows."""
    span = op.in_height + op.pad_top + op.pad_bottom - op.dilation * (op.kernel - 1) - 1
    return span // op.stride + 1


def node_row_op(node: onnx.NodeProto, shapes: Shapes, const: set[str]) -> RowOp | str:
    """The row geometry of one data node, or the reason it cannot be split by rows."""
    data = [n for n in node.input if n and n not in const]
    outs = [o for o in node.output if o]
    op = node.op_type
    if not data:
        return "reads only weights"
    out_shape = shapes.get(outs[0]) if outs else None
    in_shape = shapes.get(data[0])
    if out_shape is None or in_shape is None:
        return "shape unknown"
    if len(out_shape) != 4 or len(in_shape) != 4:
        return (f"{op} maps a {len(in_shape)}-D tensor to a {len(out_shape)}-D one "
                f"(row parts need NCHW)")
    if node.domain not in ("", "ai.onnx"):
        return f"op {node.domain}.{op} is not row-local"
    if op in ("Conv", *_POOLS):
        if op == "MaxPool" and len(outs) > 1:
            return "MaxPool with indices"
        if op == "Conv" and any(n not in const for n in node.input[1:] if n):
            return "Conv with a computed weight"
        if len(data) != 1:
            return f"{op} reads several data tensors"
        geo = spatial_pads(node, in_shape, shapes)
        if isinstance(geo, str):
            return geo
        kernel, strides, dilations, pads = geo
        if len(kernel) != 2:
            return f"{len(kernel)}-D {op}"
        row = RowOp(op, kernel[0], strides[0], pads[0], pads[2], dilations[0],
                    in_shape[HEIGHT], out_shape[HEIGHT])
        floor_rows = output_height(row)
        if op in _POOLS and _int(node, "ceil_mode", 0) and floor_rows != row.out_height:
            return f"{op} with ceil_mode 1 adds a row"
        if floor_rows != row.out_height:
            return f"output height {row.out_height} does not follow from the kernel"
        return row
    channel_op = op in ("Concat", "Split") and _int(node, "axis", 0) % 4 == 1
    if op in ("Concat", "Split") and not channel_op:
        return f"{op} over axis {_int(node, 'axis', 0)} (only the channel axis keeps rows)"
    if op in ELEMENTWISE or op in BINARY or channel_op:
        if op in ELEMENTWISE and len(data) > 1:
            return f"{op} reads several data tensors"
        if op == "Clip" or op in ("QuantizeLinear", "DequantizeLinear"):
            # the bounds / scales must be weights; per-axis along the rows is not local
            if op != "Clip" and _int(node, "axis", 1) in (HEIGHT, HEIGHT - 4):
                return f"{op} per-row quantisation"
        if in_shape[HEIGHT] != out_shape[HEIGHT]:
            return f"{op} changes the height"
        for name in node.input:
            s = shapes.get(name) if name else None
            if s is None or name in data[:1]:
                continue
            # aligned to the output from the right: axis 2 of 4 is the second-last
            h = s[-2] if len(s) >= 2 else 1
            if h != 1 and h != out_shape[HEIGHT]:
                return f"operand {name!r} of {op} does not broadcast over the rows"
            if h != 1 and name in const:
                return f"weight {name!r} of {op} varies along the rows"
        return RowOp(op, 1, 1, 0, 0, 1, in_shape[HEIGHT], out_shape[HEIGHT])
    if op == "Softmax" or op == "LogSoftmax":
        axis = _int(node, "axis", -1) % 4
        if axis == 1:
            return RowOp(op, 1, 1, 0, 0, 1, in_shape[HEIGHT], out_shape[HEIGHT])
        return f"{op} over axis {axis}"
    return f"{op} is not row-local"


def layer_geometry(model: onnx.ModelProto, layer: Layer, shapes: Shapes, const: set[str]
                   ) -> tuple[RowOp, ...] | str:
    """The row ops of ``layer`` in execution order, or why it cannot be split by rows."""
    nodes = model.graph.node
    ops: list[tuple[int, RowOp]] = []
    for i in layer.nodes:
        node = nodes[i]
        if all(n in const for n in node_inputs(node) if n):
            continue  # a weight-only node (Constant, DequantizeLinear of a weight)
        row = node_row_op(node, shapes, const)
        if isinstance(row, str):
            return f"node {node.name or node.op_type!r}: {row}"
        ops.append((i, row))
    if not ops:
        return "no data nodes"
    # Ops that widen the rows (kernel > 1, stride, padding) must lie on one path, so
    # that applying the ops backwards in order gives exactly each band's rows.
    geometric = [i for i, r in ops if (r.kernel, r.stride, r.pad_top, r.pad_bottom) != (1, 1, 0, 0)]
    ancestors = _ancestors(model, layer.nodes)
    for before, after in zip(geometric, geometric[1:], strict=False):
        if before not in ancestors[after]:
            return (f"nodes {nodes[before].name or before!r} and {nodes[after].name or after!r} "
                    f"are parallel branches with kernels")
    return tuple(r for _, r in ops)


def _ancestors(model: onnx.ModelProto, indices: Sequence[int]) -> dict[int, set[int]]:
    """For each node of ``indices``, the nodes of ``indices`` it depends on."""
    nodes = model.graph.node
    chosen = set(indices)
    producer = {o: i for i in indices for o in nodes[i].output if o}
    result: dict[int, set[int]] = {}
    for i in sorted(chosen):
        anc: set[int] = set()
        for name in nodes[i].input:
            p = producer.get(name)
            if p is not None and p != i:
                anc.add(p)
                anc |= result.get(p, set())
        result[i] = anc
    return result


def layer_rows(model: onnx.ModelProto, graph: LayerGraph) -> tuple[tuple[RowOp, ...] | None, ...]:
    """``Layer.rows`` of every layer of ``graph`` (None where it cannot be split)."""
    shapes = shape_map(model)
    const = constant_names(model)
    out = []
    for layer in graph.layers:
        geo = layer_geometry(model, layer, shapes, const)
        out.append(None if isinstance(geo, str) else geo)
    return tuple(out)


def with_rows(model: onnx.ModelProto, graph: LayerGraph) -> LayerGraph:
    """``graph`` with ``Layer.rows`` filled in (the front end's post-pass)."""
    rows = layer_rows(model, graph)
    return replace(graph, layers=tuple(replace(layer, rows=r)
                                       for layer, r in zip(graph.layers, rows, strict=True)))


def op_input_rows(op: RowOp, first: int, last: int) -> tuple[int, int, int, int]:
    """Input rows ``(lo, hi)`` that output rows ``first..last`` of ``op`` need, and the
    padding ``(pad_top, pad_bottom)`` the band needs where they are clipped."""
    lo = first * op.stride - op.pad_top
    hi = last * op.stride - op.pad_top + op.dilation * (op.kernel - 1)
    top, bottom = max(0, -lo), max(0, hi - (op.in_height - 1))
    return lo + top, hi - bottom, top, bottom


def input_rows(ops: Sequence[RowOp], first: int, last: int) -> tuple[int, int, int, int]:
    """Rows of the first op's input that output rows ``first..last`` of the last op need,
    and the padding of the first op in that band: the rule applied backwards."""
    if not ops:
        raise ValueError("no row ops")
    if not 0 <= first <= last < ops[-1].out_height:
        raise ValueError(f"rows {first}..{last} outside 0..{ops[-1].out_height - 1}")
    a, b, top, bottom = first, last, 0, 0
    for op in reversed(ops):
        a, b, top, bottom = op_input_rows(op, a, b)
    return a, b, top, bottom
