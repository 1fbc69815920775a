"""Control flow in the front end: inlining ``If`` nodes whose condition is a constant,
hoisting the constants of the sub-graphs that stay, and naming those that block the analysis.

Exported speech and detection models test static shapes with ``If`` (``Shape -> Gather ->
Equal -> If``). Once the condition folds to a constant, only one branch can run: it is
inlined (its nodes and initialisers move into the enclosing graph, its outputs take the
``If``'s output names), so shape inference sees one shape per tensor and the layers see
the branch's convolutions. Sub-graphs whose control depends on data stay; their
initialisers and ``Constant`` nodes move to the main graph (ONNX sub-graphs may read
outer-scope names), so weights inside them are counted like any other weight and are not
embedded in the inference skeleton.

ONNX scoping (IR spec, "Names Within a Graph"): a sub-graph reads the names of enclosing
graphs unless it defines the same name itself. Every rename here follows that rule.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, MutableSequence

import numpy as np
import onnx

from partitioner.errors import fail
from partitioner.frontend.tensors import constant_value_proto, graph_attrs, static_shape

__all__ = ["inline_constant_ifs", "hoist_subgraph_constants", "loop_output_types",
           "rename_in_graph", "rename_reads", "describe_control_flow"]


def _local_names(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself (inputs, initialisers, node outputs)."""
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    names.update(o for node in graph.node for o in node.output if o)
    return names


def _definitions(graph: onnx.GraphProto) -> Counter[str]:
    """How often each name is defined in ``graph`` and all its nested sub-graphs."""
    count: Counter[str] = Counter(_local_names(graph))
    for node in graph.node:
        for sub in graph_attrs(node):
            count.update(_definitions(sub))
    return count


def rename_in_graph(graph: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    """Rename names of ``graph`` (definitions and reads) and the reads of outer names in its
    nested sub-graphs, except inside a sub-graph that defines the name itself (shadowing)."""
    if not mapping:
        return

    def renamed(values: MutableSequence[str]) -> None:  # a protobuf repeated string field
        for k, name in enumerate(values):
            if name in mapping:
                values[k] = mapping[name]

    for node in graph.node:
        renamed(node.input)
        renamed(node.output)
        for sub in graph_attrs(node):
            local = _local_names(sub)
            rename_in_graph(sub, {k: v for k, v in mapping.items() if k not in local})
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        vi.name = mapping.get(vi.name, vi.name)
    for tensor in graph.initializer:
        tensor.name = mapping.get(tensor.name, tensor.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = mapping.get(sparse.values.name, sparse.values.name)


def rename_reads(node: onnx.NodeProto, mapping: Mapping[str, str]) -> None:
    """Rename what ``node`` reads: its inputs and the outer names its sub-graphs read."""
    for k, name in enumerate(node.input):
        if name in mapping:
            node.input[k] = mapping[name]
    for sub in graph_attrs(node):
        local = _local_names(sub)
        rename_in_graph(sub, {a: b for a, b in mapping.items() if a not in local})


class _Fresh:
    """Unused names: ``base``, else ``base__1``, ``base__2``..."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = taken

    def __call__(self, base: str) -> str:
        n, name = 1, f"{base}__1"
        while name in self.taken:
            n += 1
            name = f"{base}__{n}"
        self.taken.add(name)
        return name


def _node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name!r}" if node.name else \
        f"{node.op_type} node producing {node.output[0]!r}" if node.output else \
        f"a {node.op_type} node"


def _branch(node: onnx.NodeProto, taken: bool) -> onnx.GraphProto | None:
    want = "then_branch" if taken else "else_branch"
    return next((a.g for a in node.attribute if a.name == want), None)


def _inline(graph: onnx.GraphProto, node: onnx.NodeProto, branch: onnx.GraphProto,
            label: str) -> list[onnx.NodeProto]:
    """The nodes that replace ``node`` (an ``If``) by ``branch``; hoists its initialisers."""
    if len(branch.output) != len(node.output):
        fail(f"{label}: {_node_label(node)} has {len(node.output)} outputs but its branch "
             f"{branch.name!r} returns {len(branch.output)}")
    mine = _local_names(branch)
    outside = _definitions(graph) - _definitions(branch)
    fresh = _Fresh(set(_definitions(graph)))
    mapping = {n: fresh(n) for n in mine if outside[n] > 0}
    produced = {o for n in branch.node for o in n.output if o}
    returned = Counter(o.name for o in branch.output)
    copies: list[tuple[str, str]] = []
    for out, target in zip([o.name for o in branch.output], node.output, strict=True):
        if not target:
            continue
        if out in produced and returned[out] == 1:
            mapping[out] = target  # the producer writes the If's output directly
        else:
            copies.append((out, target))  # an outer name, an initialiser or a repeat
    rename_in_graph(branch, mapping)
    graph.initializer.extend(branch.initializer)
    graph.sparse_initializer.extend(branch.sparse_initializer)
    nodes = list(branch.node)
    for out, target in copies:
        source = mapping.get(out, out) if out in mine else out
        nodes.append(onnx.helper.make_node("Identity", [source], [target],
                                           name=f"{node.name or 'If'}/{target}"))
    return nodes


def inline_constant_ifs(graph: onnx.GraphProto, value: Callable[[str], np.ndarray | None],
                        label: str) -> int:
    """Replace every ``If`` of ``graph`` whose condition is a constant by its taken branch.

    Args:
        graph: the main graph, changed in place (its node order stays topological: the
            branch's nodes read only names defined before the ``If``).
        value: the value of a constant tensor by name, None if it is not constant.
        label: how errors name the model.

    Returns:
        How many ``If`` nodes were inlined (nested ones surface and go in the next call).
    """
    count = 0
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        cond = value(node.input[0]) if node.op_type == "If" and node.input else None
        if cond is None:
            nodes.append(node)
            continue
        if cond.size != 1:
            fail(f"{label}: {_node_label(node)}: condition {node.input[0]!r} has "
                 f"{cond.size} elements, expected one")
        branch = _branch(node, bool(cond.reshape(-1)[0]))
        if branch is None:
            fail(f"{label}: {_node_label(node)} has no "
                 f"{'then' if bool(cond.reshape(-1)[0]) else 'else'}_branch")
        taken = onnx.GraphProto()
        taken.CopyFrom(branch)
        nodes.extend(_inline(graph, node, taken, label))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def hoist_subgraph_constants(graph: onnx.GraphProto) -> int:
    """Move the initialisers and ``Constant`` nodes of every sub-graph into ``graph``.

    A hoisted name that is defined elsewhere in the model too is renamed (in its own
    scope) first. Constants a sub-graph returns directly stay (a graph output must be
    computed in that graph by some runtimes). Returns how many tensors moved.
    """
    taken = _definitions(graph)
    fresh = _Fresh(set(taken))
    moved: list[onnx.TensorProto] = []

    def visit(sub: onnx.GraphProto) -> None:
        for node in sub.node:
            for inner in graph_attrs(node):
                visit(inner)
        returned = {o.name for o in sub.output}
        inputs = {v.name for v in sub.input}
        keep: list[onnx.NodeProto] = []
        found: list[onnx.TensorProto] = []
        for node in sub.node:
            proto = constant_value_proto(node) if node.op_type == "Constant" and \
                node.domain in ("", "ai.onnx") and len(node.output) == 1 else None
            if proto is None or node.output[0] in returned or \
                    any(a.ref_attr_name for a in node.attribute):
                keep.append(node)
                continue
            tensor = onnx.TensorProto()
            tensor.CopyFrom(proto)
            tensor.name = node.output[0]
            found.append(tensor)
        stay = [t for t in sub.initializer if t.name in inputs or t.name in returned]
        found.extend(t for t in sub.initializer if t.name not in inputs
                     and t.name not in returned)
        if not found:
            return
        mapping = {t.name: fresh(t.name) for t in found if taken[t.name] > 1}
        del sub.node[:]
        sub.node.extend(keep)
        del sub.initializer[:]
        sub.initializer.extend(stay)
        rename_in_graph(sub, mapping)
        for t in found:
            t.name = mapping.get(t.name, t.name)
        moved.extend(found)

    for node in graph.node:
        for sub in graph_attrs(node):
            visit(sub)
    graph.initializer.extend(moved)
    return len(moved)


def _static_type(graph: onnx.GraphProto, name: str) -> onnx.TypeProto | None:
    for vi in list(graph.output) + list(graph.value_info):
        if vi.name == name and static_shape(vi.type) is not None and \
                vi.type.tensor_type.elem_type:
            return vi.type
    return None


def loop_output_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """Static types of ``Loop`` outputs that ONNX shape inference leaves open.

    ONNX infers only the element type of a loop's outputs, as a carried value may change
    shape between iterations. When the body returns a carried value with the static shape
    it came in with, that is its final shape too; a scan output (stacked per iteration) is
    ``[M] + body shape`` when the trip count ``M`` is a constant. ``graph`` must carry the
    body's inferred shapes (the result of ONNX inference).
    """
    consts = {t.name: t for t in graph.initializer}
    known = {vi.name: vi.type for vi in list(graph.input) + list(graph.value_info)}
    found: dict[str, onnx.TypeProto] = {}
    for node in graph.node:
        body = next((a.g for a in node.attribute if a.name == "body"), None)
        if node.op_type != "Loop" or body is None or len(body.output) < 1:
            continue
        carried = len(node.input) - 2
        for k, out in enumerate(node.output):
            if not out or (out in known and static_shape(known[out]) is not None):
                continue
            if k + 1 >= len(body.output):
                break
            inner = _static_type(body, body.output[k + 1].name)
            if inner is None:
                continue
            if k < carried:
                start = known.get(node.input[k + 2]) if node.input[k + 2] in known else (
                    onnx.helper.make_tensor_type_proto(consts[node.input[k + 2]].data_type,
                                                       list(consts[node.input[k + 2]].dims))
                    if node.input[k + 2] in consts else None)
                if start is not None and static_shape(start) == static_shape(inner):
                    found[out] = inner
                continue
            trip = consts.get(node.input[0]) if node.input and node.input[0] else None
            if trip is None or trip.data_location == onnx.TensorProto.EXTERNAL:
                continue
            steps = onnx.numpy_helper.to_array(trip).reshape(-1)
            shape = static_shape(inner)
            if steps.size == 1 and shape is not None:
                found[out] = onnx.helper.make_tensor_type_proto(
                    inner.tensor_type.elem_type, [max(0, int(steps[0])), *shape])
    return found


def describe_control_flow(node: onnx.NodeProto) -> str:
    """Why a control-flow node's output shapes are unknown, as a clause naming the node."""
    what = _node_label(node)
    if node.op_type == "If":
        return (f"{what} chooses its branch from the input data (condition "
                f"{node.input[0]!r} is not a constant for these input shapes) and its "
                f"branches give different shapes; the partitioner needs one static shape "
                f"per tensor (export with static shapes, or fix --shape so the condition "
                f"folds)")
    if node.op_type == "Loop":
        return (f"{what} runs a data-dependent number of iterations (trip count "
                f"{node.input[0] if node.input and node.input[0] else 'unset'!r}) or changes "
                f"the shape of a loop-carried value, so its outputs have no static shape")
    return f"{what}: the shapes of its outputs depend on the data"
