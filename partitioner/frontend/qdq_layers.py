"""The quantiser's output regrouped into the model's own layers (see
:mod:`partitioner.frontend.quantize` for the rule and why it keeps ORT's node units
whole), so that the one slicer cuts the variant into stages."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import onnx

from partitioner.frontend.inference import infer_types
from partitioner.frontend.layers import build_layer_graph, copy_for_layer
from partitioner.frontend.prepare import topological_order
from partitioner.frontend.tensors import node_inputs

if TYPE_CHECKING:
    from partitioner.frontend import PreparedModel

__all__ = ["regroup"]

Int8Outputs = dict[int, tuple[tuple[str, str], ...]]


def regroup(prepared: PreparedModel, qmodel: onnx.ModelProto, layers: tuple[int, ...]
            ) -> tuple[PreparedModel, Int8Outputs]:
    """Assign the quantised model's nodes to the prepared model's layers (module
    docstring), copy shared new nodes per layer, and build its layer graph."""
    from partitioner.frontend import PreparedModel as Prepared

    graph = prepared.graph
    fmodel = prepared.model
    layer_of_name: dict[str, int] = {}
    for layer in graph.layers:
        for i in layer.nodes:
            name = fmodel.graph.node[i].name
            layer_of_name[name or f"node{i}"] = layer.index
    # the float producer layer of each tensor (model outputs are renamed by the quantiser)
    float_producer: dict[str, int] = {}
    for layer in graph.layers:
        for i in layer.nodes:
            for o in fmodel.graph.node[i].output:
                float_producer[o] = layer.index
    g = qmodel.graph
    _write_types(qmodel, f"quantised model {graph.name!r}")
    order = topological_order(g, f"quantised model {graph.name!r}")
    nodes = [g.node[i] for i in order]
    produced_by: dict[str, int] = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in node_inputs(n):
            consumers.setdefault(name, []).append(i)
    outputs = {o.name for o in g.output}
    original = [n.name in layer_of_name for n in nodes]

    def producing_layer(tensor: str) -> int | None:
        p = produced_by.get(tensor)
        if p is not None and original[p]:
            return layer_of_name[nodes[p].name]
        return None

    needs: dict[int, set[int]] = {}
    int8: dict[int, list[tuple[str, str]]] = {}
    for i in reversed(range(len(nodes))):
        n = nodes[i]
        if original[i]:
            continue
        src = producing_layer(n.input[0]) if n.input else None
        if n.op_type == "QuantizeLinear" and src is not None:
            needs[i] = {src}  # a Q stays with the op it quantises (one ORT node unit)
            continue
        need: set[int] = set()
        for o in n.output:
            for u in consumers.get(o, ()):
                need |= {layer_of_name[nodes[u].name]} if original[u] else needs.get(u, set())
            if o in outputs and o in float_producer:
                need.add(float_producer[o])
        if not need:  # read by nothing: stays with what it reads (or the first layer)
            need = {src if src is not None else 0}
        if n.op_type == "QuantizeLinear":  # of a model input: in its first reader only
            need = {min(need)}
        needs[i] = need
    # 8-bit tensors a layer hands on: its Q's output, where the float tensor it quantises
    # leaves the layer (read by a later layer or the destination)
    for i, need in needs.items():
        n = nodes[i]
        if n.op_type != "QuantizeLinear" or need != {producing_layer(n.input[0])}:
            continue
        (k,) = need
        float_name = _float_name(n.input[0], outputs)
        if float_name in graph.layers[k].produces:
            int8.setdefault(k, []).append((float_name, n.output[0]))
    new_nodes, layer_of = _localise(g, nodes, original, needs, layer_of_name)
    del g.node[:]
    g.node.extend(new_nodes)
    qgraph, stats = build_layer_graph(qmodel, name=graph.name, sha256=graph.sha256,
                                      granularity=graph.granularity, layer_of=layer_of)
    added = {n.name for n in qmodel.graph.node} - set(layer_of_name)
    fixed = []
    for layer, old in zip(qgraph.layers, graph.layers, strict=True):
        # row geometry is kept only for layers the quantiser left alone
        touched = any(qmodel.graph.node[i].name in added for i in layer.nodes)
        fixed.append(dataclasses.replace(layer, name=old.name,
                                         rows=None if touched else old.rows))
    qgraph = dataclasses.replace(qgraph, layers=tuple(fixed))
    variant = Prepared(model=qmodel, graph=qgraph, path=None, base_dir=None, stats=stats,
                       shapes=prepared.shapes, folded=prepared.folded)
    return variant, {k: tuple(v) for k, v in sorted(int8.items())}


def _write_types(model: onnx.ModelProto, label: str) -> None:
    """Inferred types of every node output (the Q/DQ outputs the quantiser adds have
    none), as the layer graph needs a static shape for each cut tensor."""
    types, _ = infer_types(model, label)
    g = model.graph
    outputs = {o.name for o in g.output}
    inits = {t.name for t in g.initializer}
    del g.value_info[:]
    for node in g.node:
        for o in node.output:
            if o and o in types and o not in outputs and o not in inits:
                g.value_info.add(name=o).type.CopyFrom(types[o])


def _float_name(q_input: str, outputs: set[str]) -> str:
    """The model's name of the float tensor a Q reads: a model output the quantiser
    renamed (``X_QuantizeLinear_Input``) is ``X`` again after its DQ."""
    suffix = "_QuantizeLinear_Input"
    if q_input.endswith(suffix) and q_input[: -len(suffix)] in outputs:
        return q_input[: -len(suffix)]
    return q_input


def _localise(g: onnx.GraphProto, nodes: list[onnx.NodeProto], original: list[bool],
              needs: Mapping[int, set[int]], layer_of_name: Mapping[str, int]
              ) -> tuple[list[onnx.NodeProto], list[int]]:
    """The node list with a copy of each new node per further layer that needs it, in a
    topological order grouped by layer; and the layer of each node."""
    types = {vi.name: vi for vi in g.value_info}
    copy_of: dict[tuple[str, int], str] = {}
    out: list[tuple[int, float, onnx.NodeProto]] = []
    for i, n in enumerate(nodes):
        if original[i]:
            k = layer_of_name[n.name]
            _rewire(n, copy_of, k)
            out.append((k, float(i), n))
            continue
        need = sorted(needs[i])
        home = need[0]  # keeps the names (a model output's DQ: its producer's layer)
        for k in need:
            node = n if k == home else copy_for_layer(n, k, copy_of, g, types)
            _rewire(node, copy_of, k)
            out.append((k, i + (0.0 if k == home else 0.5), node))
    out.sort(key=lambda t: (t[0], t[1]))
    return [n for _, _, n in out], [k for k, _, _ in out]


def _rewire(n: onnx.NodeProto, copy_of: Mapping[tuple[str, int], str], k: int) -> None:
    for j, name in enumerate(n.input):
        if (name, k) in copy_of:
            n.input[j] = copy_of[(name, k)]
