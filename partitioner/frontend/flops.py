"""FLOP counting per ONNX node (SPEC §2: a multiply-accumulate counts 2 FLOP).

Major ops are counted from their defining equations; every other (cheap) op costs one
FLOP per output element, except pure re-labelling ops (reshapes, identities) that do no
arithmetic at all.

Control flow counts what its sub-graphs compute: a data-dependent ``If`` its heavier
branch (the branch a device must be provisioned for; an ``If`` whose condition is a
constant never gets here, the front end inlined its taken branch), a ``Loop`` its body
times the trip count when that is a constant (once when it is not: the number of
iterations is then unknown before running), a ``Scan`` its body once per scanned slice.
Such a node is major when a sub-graph holds a major op.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx

from partitioner.frontend.tensors import CONTROL_FLOW, graph_attrs, static_shape

__all__ = ["MAJOR_OPS", "node_cost", "is_major"]

# Ops that open a new major layer (issue 2; SPEC §2 "convolution, Gemm/MatMul and other
# heavy compute ops"). Matched on op_type whatever the domain (com.microsoft fused kinds).
MAJOR_OPS = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "DeformConv", "FusedConv",
    "Gemm", "QGemm", "FusedGemm", "MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul",
    "MatMulNBits", "DynamicQuantizeMatMul", "LSTM", "GRU", "RNN", "Attention",
    "MultiHeadAttention", "GroupQueryAttention", "QAttention", "Einsum",
})
_CONV = {"Conv", "ConvInteger", "QLinearConv", "DeformConv", "FusedConv"}
_MATMUL = {"MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul", "DynamicQuantizeMatMul",
           "MatMulNBits"}
_GEMM = {"Gemm", "QGemm", "FusedGemm"}
_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "QAttention"}
# No arithmetic: only the tensor's metadata changes (or nothing at all).
_FREE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Shape", "Size",
         "Constant"}

Shape = tuple[int, ...]
ShapeOf = Callable[[str], "Shape | None"]
ValueOf = Callable[[str], "np.ndarray | None"]


def is_major(node: onnx.NodeProto) -> bool:
    """Whether a node opens a new major layer (control flow: if a sub-graph holds one)."""
    if node.op_type in CONTROL_FLOW:
        return any(is_major(n) for g in graph_attrs(node) for n in g.node)
    return node.op_type in MAJOR_OPS


def _graph_cost(graph: onnx.GraphProto, shape_of: ShapeOf,
                value_of: ValueOf | None) -> tuple[int, int]:
    """``(flops, macs)`` of a sub-graph; its own names shadow the enclosing ones."""
    local: dict[str, Shape | None] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        local[vi.name] = static_shape(vi.type)
    for t in graph.initializer:
        local[t.name] = tuple(int(d) for d in t.dims)

    def scoped(name: str) -> Shape | None:
        return local[name] if name in local else shape_of(name)

    flops = macs = 0
    for node in graph.node:
        f, m = node_cost(node, scoped, value_of)
        flops, macs = flops + f, macs + m
    return flops, macs


def _trip_count(node: onnx.NodeProto, value_of: ValueOf | None) -> int:
    """A ``Loop``'s constant trip count ``M``, or 1 when it is absent or not constant."""
    name = _input(node, 0)
    value = value_of(name) if value_of is not None and name else None
    if value is None or value.size != 1:
        return 1
    return max(0, int(value.reshape(-1)[0]))


def _scan_length(node: onnx.NodeProto, shape_of: ShapeOf) -> int:
    """Iterations of a ``Scan``: the first scanned input's length along its scan axis."""
    count = _attr(node, "num_scan_inputs", 0)
    axes = next((list(a.ints) for a in node.attribute if a.name == "scan_input_axes"), [])
    if count <= 0 or len(node.input) < count:
        return 1
    shape = shape_of(node.input[len(node.input) - count])
    if shape is None or not shape:
        return 1
    axis = axes[0] if axes else 0
    return shape[axis % len(shape)]


def _control_flow(node: onnx.NodeProto, shape_of: ShapeOf,
                  value_of: ValueOf | None) -> tuple[int, int]:
    """See the module docstring: heavier ``If`` branch, body x iterations for loops."""
    costs = [_graph_cost(g, shape_of, value_of) for g in graph_attrs(node)]
    if not costs:
        return 0, 0
    if node.op_type == "If":
        return max(costs)
    flops, macs = costs[0]
    times = _trip_count(node, value_of) if node.op_type == "Loop" else \
        _scan_length(node, shape_of)
    return flops * times, macs * times


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _numel(shape: Shape | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _input(node: onnx.NodeProto, k: int) -> str:
    return node.input[k] if len(node.input) > k else ""


def _rnn(node: onnx.NodeProto, shape_of: ShapeOf) -> tuple[int, int]:
    """LSTM/GRU/RNN by their gate equations (ONNX operator spec), per step and direction.

    MACs: gates * H * (I + H) (input and recurrent projections). Element-wise work per
    hidden unit: LSTM 17 (8 bias adds, 4 activations, 5 for the cell and output update),
    GRU 13 (6 bias adds, 3 activations, 4 for the reset/update blend), RNN 3.
    """
    x, w = shape_of(node.input[0]), shape_of(node.input[1])
    if x is None or w is None or len(x) != 3 or len(w) != 3:
        return 0, 0
    gates, elementwise = {"LSTM": (4, 17), "GRU": (3, 13), "RNN": (1, 3)}[node.op_type]
    hidden = _attr(node, "hidden_size") or w[1] // gates
    steps, batch = (x[1], x[0]) if _attr(node, "layout") == 1 else (x[0], x[1])
    dirs, inp = w[0], w[2]
    runs = steps * batch * dirs
    macs = runs * gates * hidden * (inp + hidden)
    return 2 * macs + runs * elementwise * hidden, macs


def _einsum(node: onnx.NodeProto, shape_of: ShapeOf, out: Shape | None) -> tuple[int, int]:
    """MACs = output elements times the sizes of the contracted (summed-out) indices."""
    equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    sizes: dict[str, int] = {}
    for term, name in zip(terms, node.input, strict=False):
        shape = shape_of(name)
        if shape is None:
            continue
        before, dots, after = term.partition("...")
        if not dots:
            before, after = term, ""
        pairs = list(zip(before, shape, strict=False))
        if after:
            pairs += list(zip(after, shape[len(shape) - len(after):], strict=False))
        for letter, size in pairs:
            sizes[letter] = size
    if not rhs and "->" not in equation:
        # Implicit output: the letters that appear exactly once, in alphabetical order.
        joined = "".join(terms)
        rhs = "".join(sorted(c for c in set(joined) if c.isalpha() and joined.count(c) == 1))
    contracted = {c for c in sizes if c not in rhs}
    reduce = math.prod(sizes[c] for c in contracted)
    if len(terms) == 1 and not contracted:
        return _numel(out), 0
    macs = _numel(out) * reduce
    return 2 * macs, macs


def _attention(node: onnx.NodeProto, shape_of: ShapeOf, out: Shape | None) -> tuple[int, int]:
    """Attention: QK^T and AV cost (elements of Q + elements of Y) * L MACs.

    ``L`` is the key length. The com.microsoft ``Attention`` also projects its input with
    a packed QKV weight (``X @ W``), and softmax costs about 3 FLOP per score.
    """
    if node.op_type in ("Attention", "QAttention") and node.domain == "com.microsoft":
        x, w = shape_of(node.input[0]), shape_of(node.input[1])
        if x is None or w is None or len(x) != 3:
            return _numel(out), 0
        batch, seq = x[0], x[1]
        proj = _numel(x) * w[-1]
        heads = _attr(node, "num_heads", 1)
        scores = batch * heads * seq * seq
        macs = proj + 2 * batch * seq * seq * (_numel(out) // max(1, batch * seq))
        return 2 * macs + 3 * scores, macs
    q, k = shape_of(node.input[0]), shape_of(_input(node, 1)) if _input(node, 1) else None
    if q is None:
        return _numel(out), 0
    if k is None:
        length = q[-2] if len(q) == 4 else q[1]
    else:
        length = k[2] if len(k) == 4 else k[1]
    macs = (_numel(q) + _numel(out)) * length
    heads = _attr(node, "num_heads", 0) or _attr(node, "q_num_heads", 0) or (
        q[1] if len(q) == 4 else 1)
    seq = q[2] if len(q) == 4 else q[1]
    return 2 * macs + 3 * q[0] * heads * seq * length, macs


def node_cost(node: onnx.NodeProto, shape_of: ShapeOf,
              value_of: ValueOf | None = None) -> tuple[int, int]:
    """``(flops, macs)`` of one node; ``macs`` is 0 for cheap ops.

    Args:
        node: the node.
        shape_of: static shape of a tensor by name (None when unknown).
        value_of: the value of a constant tensor by name (None when not constant); a
            ``Loop``'s trip count is read with it.
    """
    op = node.op_type
    if op in CONTROL_FLOW:
        return _control_flow(node, shape_of, value_of)
    out = shape_of(node.output[0]) if node.output and node.output[0] else None
    if op in _CONV:
        # 2*Cout*Hout*Wout*(Cin/groups)*kh*kw per image: output elements times the weight's
        # per-output-channel volume W.shape[1:] = (Cin/groups, kh, kw).
        w = shape_of(node.input[3 if op == "QLinearConv" else 1])
        macs = _numel(out) * math.prod(w[1:]) if w is not None else 0
        return 2 * macs, macs
    if op == "ConvTranspose":
        # Every input element is scattered through a (Cout/groups, kh, kw) kernel slice.
        x, w = shape_of(node.input[0]), shape_of(node.input[1])
        macs = _numel(x) * math.prod(w[1:]) if x is not None and w is not None else 0
        return 2 * macs, macs
    if op in _GEMM:
        a = shape_of(node.input[0])
        if a is None or out is None or len(a) != 2:
            return 0, 0
        k = a[0] if _attr(node, "transA") else a[1]
        macs = _numel(out) * k
        return 2 * macs, macs
    if op in _MATMUL:
        if op == "MatMulNBits":
            k = _attr(node, "K")
        else:
            a = shape_of(node.input[0])
            k = a[-1] if a else 0
        macs = _numel(out) * k  # 2*M*N*K per matrix, times the broadcast batch dims
        return 2 * macs, macs
    if op in ("LSTM", "GRU", "RNN"):
        return _rnn(node, shape_of)
    if op == "Einsum":
        return _einsum(node, shape_of, out)
    if op in _ATTENTION:
        return _attention(node, shape_of, out)
    if op in _FREE:
        return 0, 0
    return sum(_numel(shape_of(o)) for o in node.output if o), 0
