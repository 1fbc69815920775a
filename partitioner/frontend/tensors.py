"""Small helpers about ONNX tensors: dtypes, element sizes, static shapes, weights.

Weights are never materialised here: sizes come from the declared dims and dtype, so a
model whose initialisers live in an external ``.data`` file is analysed without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto

__all__ = [
    "CONTROL_FLOW",
    "dtype_name",
    "tensor_nbytes",
    "static_shape",
    "is_external",
    "is_weight_dtype",
    "constant_value_proto",
    "graph_attrs",
    "subgraph_inputs",
    "node_inputs",
]

# Ops whose attributes hold sub-graphs that run (ONNX control flow).
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})

# Sub-byte element types: their byte size is ceil(n * bits / 8), not n * itemsize.
_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(TensorProto, name)
}

# Integer indices and shapes (int64) and masks (bool) are not weights: the SPEC counts
# parameters (§2 "w_l"), which are float or quantised-integer tensors.
_NOT_WEIGHT = {TensorProto.INT64, TensorProto.UINT64, TensorProto.BOOL, TensorProto.STRING,
               TensorProto.UNDEFINED}


def dtype_name(elem_type: int) -> str:
    """The numpy dtype name of an ONNX element type (``"float32"``, ``"int64"``...)."""
    if elem_type == TensorProto.BFLOAT16:
        return "bfloat16"
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, ValueError, TypeError):
        return TensorProto.DataType.Name(elem_type).lower()


def element_bits(elem_type: int) -> int:
    """Bits per element of an ONNX element type."""
    if elem_type in _BITS:
        return _BITS[elem_type]
    if elem_type == TensorProto.STRING:
        return 0
    try:
        return 8 * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, ValueError, TypeError):
        return 8 * 2 if elem_type == TensorProto.BFLOAT16 else 0


def tensor_nbytes(shape: tuple[int, ...] | list[int], elem_type: int) -> int:
    """Bytes of a tensor of that shape and element type (ceil for sub-byte types)."""
    return math.ceil(math.prod(shape) * element_bits(elem_type) / 8)


def static_shape(type_proto: onnx.TypeProto) -> tuple[int, ...] | None:
    """The shape of a tensor type if every dim is a known value >= 0, else None."""
    if type_proto.WhichOneof("value") != "tensor_type":
        return None
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value") or d.dim_value < 0:
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def is_external(tensor: TensorProto) -> bool:
    """Whether the tensor's bytes live in an external file (not loaded here)."""
    return tensor.data_location == TensorProto.EXTERNAL


def is_weight_dtype(elem_type: int) -> bool:
    """Whether a constant of this element type counts as a weight parameter."""
    return elem_type not in _NOT_WEIGHT


def constant_value_proto(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor a ``Constant`` node holds, normalised to a TensorProto (None if sparse)."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            values = attr.floats if attr.name == "value_floats" else (
                attr.ints if attr.name == "value_ints" else None)
            if attr.name == "value_float":
                return onnx.numpy_helper.from_array(np.array(attr.f, np.float32))
            if attr.name == "value_int":
                return onnx.numpy_helper.from_array(np.array(attr.i, np.int64))
            dtype = np.float32 if attr.name == "value_floats" else np.int64
            return onnx.numpy_helper.from_array(np.array(list(values or []), dtype))
    return None


def graph_attrs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The sub-graphs of a control-flow node (``If`` branches, ``Loop``/``Scan`` bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Outer-scope names a (control-flow) sub-graph reads implicitly."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    used: set[str] = set()
    for node in graph.node:
        for name in node_inputs(node):
            if name not in defined:
                used.add(name)
        defined.update(node.output)
    return used


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs plus outer-scope names its sub-graphs use."""
    names = [n for n in node.input if n]
    for g in graph_attrs(node):
        names.extend(sorted(subgraph_inputs(g) - set(names)))
    return names
