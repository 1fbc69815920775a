"""Grouping a prepared model's nodes into layers and computing the cuts between them.

Grouping rule (issue 2), which keeps every cut valid on a DAG: walk the nodes in
topological order; a major node opens layer ``k+1``; a cheap node joins the highest layer
index among the producers of its inputs (layer 0 if none). Cheap nodes before the first
major node form its prologue (layer 0). Nodes that read only weights (constant-only
sub-graphs that were too large or not allowed to fold, e.g. ``DequantizeLinear`` of a
weight) go with their first consumer instead, so they do not drag a weight-sized tensor
across every cut from layer 0; every further layer that reads them gets its own copy of
them (``<output>__layer<k>``), so a shared weight crosses no cut and every layer that needs
it names it in ``Layer.weights``.

Cuts (SPEC §2): the cut after layer ``k`` carries every tensor produced at or before ``k``
and consumed after ``k``; graph inputs are produced "at -1"; graph outputs are consumed
"at L" (the destination needs them). Initialisers are weights, never cut tensors.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from partitioner import ir
from partitioner.errors import fail
from partitioner.frontend.flops import ValueOf, is_major, node_cost
from partitioner.frontend.subgraphs import rename_reads
from partitioner.frontend.tensors import (
    CONTROL_FLOW,
    dtype_name,
    graph_attrs,
    is_external,
    is_weight_dtype,
    node_inputs,
    static_shape,
    tensor_nbytes,
)

__all__ = ["LayerStats", "build_layer_graph", "copy_for_layer"]


@dataclass(frozen=True)
class LayerStats:
    """What the front end knows beyond ``ir.LayerGraph``.

    Attributes:
        macs: multiply-accumulates of each layer's major ops.
        total_weight_count / total_weight_bytes: weights deduplicated over the model (a
            weight shared by two layers counts in each layer but once here).
        notes: one line per control-flow node that holds major ops: they stay together
            in its layer (a sub-graph is never split across devices).
    """

    macs: tuple[int, ...]
    total_weight_count: int
    total_weight_bytes: int
    notes: tuple[str, ...] = ()


def _scope_name(node: onnx.NodeProto) -> str | None:
    """A readable name from the dynamo exporter's module scopes, if the node has them."""
    meta = {p.key: p.value for p in node.metadata_props}
    raw = meta.get("pkg.torch.onnx.name_scopes")
    if not raw:
        return None
    try:
        scopes = [str(s) for s in ast.literal_eval(raw)]
        classes = [str(c) for c in ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy",
                                                             "[]"))]
    except (ValueError, SyntaxError):
        return None
    if not scopes:
        return None
    parts = [s for s in scopes[1:-1] if s]
    # torch 2.x writes cumulative scopes (["blocks.0", "blocks.0.self_attn"]): the last
    # one is the module path; joining them would repeat it ("blocks.0.blocks.0.self_attn").
    nested = all(b.startswith(f"{a}.") for a, b in zip(parts, parts[1:], strict=False))
    module = (parts[-1] if nested else ".".join(parts)) if parts else ""
    # The last scope is the aten call (``linear``, ``matmul_1``). Inside a built-in torch
    # module the module path says it all ("layer1.0.conv1"); inside a user module
    # ("attn") several ops share the path, so the call name is kept ("attn.matmul_1").
    owner = classes[-2] if len(classes) >= 2 else ""
    if module and owner.startswith("torch.nn.modules."):
        return module
    return f"{module}.{scopes[-1]}" if module else scopes[-1]


def _weight_stem(node: onnx.NodeProto) -> str | None:
    """``conv1`` for a major node whose weight is the parameter ``conv1.weight``."""
    k = 3 if node.op_type.startswith("QLinear") else 1
    weight = node.input[k] if len(node.input) > k else ""
    return weight[: -len(".weight")] if weight.endswith(".weight") and is_major(node) else None


def _node_name(node: onnx.NodeProto, index: int) -> str:
    # The dynamo exporter fuses BatchNorm into the preceding Conv and the fused node keeps
    # the BatchNorm's scope ("bn1"), but the weight keeps the conv's parameter name.
    scope = _scope_name(node)
    if scope is not None:
        return _weight_stem(node) or scope
    return node.name or _weight_stem(node) or f"{node.op_type}_{index}"


def _unique(names: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 1
        while candidate in seen:
            candidate = f"{name}_{n}"
            n += 1
        seen.add(candidate)
        out.append(candidate)
    return out


def _assign(nodes: list[onnx.NodeProto], inits: set[str], granularity: str,
            name: str = "model") -> tuple[list[int], dict[int, set[int]]]:
    """Layer index of every node (see the module docstring), and the layers that read each
    constant-only node read by more than one layer."""
    const = set(inits)
    const_nodes: set[int] = set()
    for i, node in enumerate(nodes):
        if all(n in const for n in node_inputs(node)):
            const_nodes.add(i)
            const.update(o for o in node.output if o)
    layer_of = [-1] * len(nodes)
    produced_in: dict[str, int] = {}
    count = 0
    prologue_only = False  # layer 0 exists but holds only cheap ops before any major op
    for i, node in enumerate(nodes):
        if i in const_nodes:
            continue
        if granularity == "node":
            layer, count = count, count + 1
        elif is_major(node):
            if prologue_only:
                layer, prologue_only = 0, False
            else:
                layer, count = count, count + 1
        else:
            layer = max((produced_in[n] for n in node_inputs(node) if n in produced_in),
                        default=0)
            if count == 0:
                count, prologue_only = 1, True
        layer_of[i] = layer
        for out in node.output:
            produced_in[out] = layer
    if count == 0:
        fail(f"model {name!r}: computes nothing from its inputs (every node is constant)")
    # Constant-only nodes join their first consumer; visiting in reverse topological order
    # resolves chains of them (a producer's consumers are placed before it is visited).
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for n in node_inputs(node):
            consumers.setdefault(n, []).append(i)
    needs: dict[int, set[int]] = {}
    for i in sorted(const_nodes, reverse=True):
        need: set[int] = set()
        for o in nodes[i].output:
            for u in consumers.get(o, ()):
                need |= needs[u] if u in needs else {layer_of[u]}
        needs[i] = need
        layer_of[i] = min(need) if need else count - 1
    return layer_of, {i: need for i, need in needs.items() if len(need) > 1}


def copy_for_layer(node: onnx.NodeProto, k: int, copy_of: dict[tuple[str, int], str],
                   graph: onnx.GraphProto, types: Mapping[str, onnx.ValueInfoProto]
                   ) -> onnx.NodeProto:
    """A copy of ``node`` for layer ``k``: it reads layer ``k``'s copies of its inputs
    (``copy_of[(name, k)]``), and its outputs are renamed ``<output>__layer<k>`` (recorded
    in ``copy_of``; their value infos added to ``graph``)."""
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    rename_reads(clone, {n: copy_of[(n, k)] for n in node_inputs(clone) if (n, k) in copy_of})
    for j, out in enumerate(clone.output):
        if out:
            copy_of[(out, k)] = clone.output[j] = f"{out}__layer{k}"
            if out in types:
                vi = graph.value_info.add()
                vi.CopyFrom(types[out])
                vi.name = clone.output[j]
    if clone.name:
        clone.name = f"{clone.name}__layer{k}"
    return clone


def _localise_constants(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], layer_of: list[int],
                        needs: Mapping[int, set[int]]) -> tuple[list[onnx.NodeProto], list[int],
                                                                list[float]]:
    """Copy each constant-only node into every further layer that reads it.

    A weight transformed once (``DequantizeLinear``, ``Transpose`` of a shared weight) and
    read by several layers would otherwise cross every cut in between as a weight-sized
    activation, and those layers would not name the weight they depend on. Each copy
    recomputes the value in its layer from the same initialiser, so the weight is shared
    by name (``Layer.weights``), counted once in the totals. Returns the nodes with the
    copies appended, their layers, and sort keys that put a copy just after its original.
    """
    keys = [float(i) for i in range(len(nodes))]
    if not needs:
        return nodes, layer_of, keys
    types = {vi.name: vi for vi in graph.value_info}
    copy_of: dict[tuple[str, int], str] = {}
    nodes, layer_of = list(nodes), list(layer_of)
    for i in sorted(needs):  # producers before the constant nodes that read them
        for k in sorted(needs[i] - {layer_of[i]}):
            nodes.append(copy_for_layer(nodes[i], k, copy_of, graph, types))
            layer_of.append(k)
            keys.append(i + 0.5)
    for idx in range(len(keys)):
        node, k = nodes[idx], layer_of[idx]
        mapping = {n: copy_of[(n, k)] for n in node_inputs(node) if (n, k) in copy_of}
        if mapping and keys[idx] == int(keys[idx]):  # originals; copies were wired above
            rename_reads(node, mapping)
    return nodes, layer_of, keys


def build_layer_graph(model: onnx.ModelProto, *, name: str, sha256: str,
                      granularity: str, layer_of: Sequence[int] | None = None
                      ) -> tuple[ir.LayerGraph, LayerStats]:
    """Group ``model``'s nodes into layers and compute cuts; reorders ``model`` in place.

    The model's nodes are rewritten layer by layer (each layer's nodes in their previous
    topological order), so ``Layer.nodes`` of layer ``k`` is a contiguous index range and
    the node list is still topological (a producer's layer is never after a consumer's).

    Args:
        model: a prepared model (static shapes in ``value_info``, nothing left to fold).
        name / sha256: the model's name and file fingerprint.
        granularity: ``"major"`` or ``"node"``.
        layer_of: the layer of every node of ``model`` when the caller groups them itself
            (a variant of an already grouped model, e.g. its quantised form,
            :mod:`partitioner.frontend.quantize`); the grouping rule above is then not
            applied and no constant node is copied.
    """
    if granularity not in ("major", "node"):
        fail(f"--granularity {granularity!r}: expected 'major' or 'node'")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = [o.name for o in graph.output]
    if layer_of is None:
        assigned, needs = _assign(list(graph.node), set(inits), granularity, name)
        nodes, assigned, keys = _localise_constants(graph, list(graph.node), assigned, needs)
    else:
        nodes, assigned, keys = list(graph.node), list(layer_of), [
            float(i) for i in range(len(graph.node))]
    count = max(assigned) + 1
    order = sorted(range(len(nodes)), key=lambda i: (assigned[i], keys[i]))
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    nodes = list(graph.node)
    layer_of = [assigned[i] for i in order]

    types: dict[str, onnx.TypeProto] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        types[vi.name] = vi.type

    def shape_of(tensor: str) -> tuple[int, ...] | None:
        if tensor in inits:
            return tuple(int(d) for d in inits[tensor].dims)
        t = types.get(tensor)
        return static_shape(t) if t is not None else None

    def value_of(tensor: str) -> np.ndarray | None:
        # Only small in-memory constants are read (a Loop's trip count), never weights.
        t = inits.get(tensor)
        if t is None or is_external(t) or len(t.dims) > 1 or (t.dims and t.dims[0] > 1):
            return None
        return onnx.numpy_helper.to_array(t)

    def info(tensor: str) -> ir.TensorInfo:
        shape = shape_of(tensor)
        t = types.get(tensor)
        if shape is None or t is None:
            fail(f"tensor {tensor!r}: no static shape (internal: prepare() should have caught "
                 f"this)")
        elem = t.tensor_type.elem_type
        return ir.TensorInfo(tensor, shape, dtype_name(elem), tensor_nbytes(shape, elem))

    # Producer and last consumer layer of every non-weight tensor.
    produced: dict[str, int] = {}
    sequence: list[str] = []  # production order, for deterministic cut listings
    input_names = [v.name for v in graph.input if v.name not in inits]
    for n in input_names:
        produced[n] = -1
        sequence.append(n)
    for node, layer in zip(nodes, layer_of, strict=True):
        for out in node.output:
            if out:
                produced[out] = layer
                sequence.append(out)
    last_use: dict[str, int] = {}
    for node, layer in zip(nodes, layer_of, strict=True):
        for n in node_inputs(node):
            if n in produced:
                last_use[n] = max(last_use.get(n, -1), layer)
    for n in outputs:
        if n in produced:
            last_use[n] = count  # the destination consumes the outputs after the last layer

    cut_members: list[list[str]] = [[] for _ in range(count + 1)]
    tensors: dict[str, ir.TensorInfo] = {}
    for n in sequence:
        first, last = produced[n], last_use.get(n, -1)
        if last <= first:
            continue
        tensors[n] = info(n)
        for k in range(first, min(last, count)):
            cut_members[k + 1].append(n)
    cuts = tuple(ir.Cut(after=k - 1, tensors=tuple(m), nbytes=sum(tensors[t].nbytes for t in m))
                 for k, m in enumerate(cut_members))

    members: list[list[int]] = [[] for _ in range(count)]
    for i, layer in enumerate(layer_of):
        members[layer].append(i)
    names = _unique([_layer_name(nodes, m, granularity) for m in members])
    layers = []
    macs_all = []
    all_weights: set[str] = set()
    for k, idx in enumerate(members):
        flops = macs = 0
        weights: set[str] = set()
        out_bytes = 0
        consumes: dict[str, None] = {}  # ordered sets
        produces: dict[str, None] = {}
        for i in idx:
            f, m = node_cost(nodes[i], shape_of, value_of)
            flops, macs = flops + f, macs + m
            reads = node_inputs(nodes[i])
            weights.update(n for n in reads
                           if n in inits and is_weight_dtype(inits[n].data_type))
            consumes.update((n, None) for n in reads
                            if n in tensors and produced.get(n) != k)
            produces.update((o, None) for o in nodes[i].output
                            if o in tensors and produced.get(o) == k)
            out_bytes += sum(tensors[o].nbytes for o in nodes[i].output
                             if o in tensors and produced.get(o) == k)
        all_weights |= weights
        layers.append(ir.Layer(
            index=k, name=names[k], ops=tuple(nodes[i].op_type for i in idx), nodes=tuple(idx),
            flops=flops, weight_count=_count(weights, inits), weight_bytes=_bytes(weights, inits),
            output_bytes=out_bytes, cut_bytes=cuts[k + 1].nbytes,
            consumes=tuple(consumes), produces=tuple(produces), weights=tuple(sorted(weights))))
        macs_all.append(macs)
    layer_graph = ir.LayerGraph(
        name=name, sha256=sha256, granularity=granularity, layers=tuple(layers), cuts=cuts,
        inputs=tuple(info(n) for n in input_names),
        outputs=tuple(info(n) for n in outputs if n in produced), tensors=tensors,
        initializer_bytes={n: _bytes({n}, inits) for n in sorted(all_weights)})
    notes = tuple(_control_flow_note(nodes[i], layer_of[i], value_of) for i in range(len(nodes))
                  if nodes[i].op_type in CONTROL_FLOW and is_major(nodes[i]))
    stats = LayerStats(macs=tuple(macs_all), total_weight_count=_count(all_weights, inits),
                       total_weight_bytes=_bytes(all_weights, inits), notes=notes)
    return layer_graph, stats


def _major_count(node: onnx.NodeProto) -> int:
    return sum(_major_count(n) if n.op_type in CONTROL_FLOW else int(is_major(n))
               for g in graph_attrs(node) for n in g.node)


def _control_flow_note(node: onnx.NodeProto, layer: int, value_of: ValueOf) -> str:
    """Why a control-flow node's major ops share one layer, and how its FLOPs count."""
    what = f"{node.op_type} node {node.name!r}" if node.name else f"a {node.op_type} node"
    if node.op_type == "If":
        how = "branch chosen by the data; FLOPs count the heavier branch"
    elif node.op_type == "Loop":
        trip = value_of(node.input[0]) if node.input and node.input[0] else None
        how = (f"FLOPs count its body x {int(trip.reshape(-1)[0])} iterations" if trip is not None
               else "trip count not constant; FLOPs count its body once")
    else:
        how = "FLOPs count its body once per scanned slice"
    count = _major_count(node)
    return (f"layer {layer}: {what} keeps its {count} major op{'s' if count != 1 else ''} "
            f"in one layer (a sub-graph is not split across devices); {how}")


def _layer_name(nodes: list[onnx.NodeProto], idx: list[int], granularity: str) -> str:
    if granularity == "node":
        # Constant-only helpers precede their consumer: a node layer is named by its last.
        lead = idx[-1]
    else:
        lead = next((i for i in idx if is_major(nodes[i])), idx[0])
    return _node_name(nodes[lead], lead)


def _count(names: set[str], inits: Mapping[str, onnx.TensorProto]) -> int:
    total = 0
    for n in names:
        dims = inits[n].dims
        size = 1
        for d in dims:
            size *= int(d)
        total += size
    return total


def _bytes(names: set[str], inits: Mapping[str, onnx.TensorProto]) -> int:
    return sum(tensor_nbytes(tuple(int(d) for d in inits[n].dims), inits[n].data_type)
               for n in names)
