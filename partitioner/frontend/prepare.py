"""Preparing a model for partitioning: static input shapes, inferred shapes, folded shape code.

The steps (issue 2):

1. put the nodes in a topological order (the graph's own when it already is one);
2. fix every dynamic input dimension from ``--shape`` (symbolic names, ``?``, ``-1`` and
   unset dims all count as dynamic); an unfixed one is an error naming input and axis;
3. run ONNX shape inference with data propagation on a *skeleton* of the model whose large
   initialisers are plain inputs (so no weight is read, and a model over 2 GB infers as a
   small proto; :mod:`partitioner.frontend.inference`);
4. inline every ``If`` whose condition is now a constant (its taken branch replaces it,
   :mod:`partitioner.frontend.subgraphs`);
5. fold shape-computation sub-graphs (``Shape -> Gather -> Concat -> Reshape`` and
   friends) and ``Constant`` nodes into initialisers, so that the prepared model has no
   node that merely computes shapes: such nodes are not partition points and must not
   count towards cut bytes. A folded value equal to an existing initialiser, and an
   ``Identity`` of an initialiser, reuse that initialiser instead of copying it, so a
   weight shared by several consumers stays one weight;
6. repeat 3-5 until nothing more folds, then require a static shape for every tensor.

Sub-graphs that stay (control flow that depends on data) have their initialisers and
``Constant`` nodes hoisted into the main graph first, so their weights count.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

from partitioner.errors import fail
from partitioner.frontend.inference import infer_types
from partitioner.frontend.inline_weights import is_inline_ref
from partitioner.frontend.inputs import fix_input_shapes, model_inputs
from partitioner.frontend.stagefile import loaded, location_problem
from partitioner.frontend.subgraphs import (
    describe_control_flow,
    hoist_subgraph_constants,
    inline_constant_ifs,
    rename_in_graph,
)
from partitioner.frontend.tensors import (
    CONTROL_FLOW,
    constant_value_proto,
    is_external,
    node_inputs,
    static_shape,
)
from stagebundle.load import iter_tensors

__all__ = ["prepare_model", "topological_order", "model_inputs", "MAX_ROUNDS"]

MAX_ROUNDS = 8
# External initialisers up to this size are read (they are shape vectors, not weights).
_LOAD_EXTERNAL_MAX_BYTES = 4 << 10
# Folded results may not exceed these sizes: integer/bool results are shape arithmetic
# or masks; float results are scalars such as 1/sqrt(d_head). Larger ones stay as nodes.
_FOLD_MAX_INT = 1 << 20
_FOLD_MAX_FLOAT = 4096
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
            "Multinomial", "Bernoulli", "QuantizeLinear", "DequantizeLinear",
            "DynamicQuantizeLinear", "If", "Loop", "Scan", "SequenceConstruct",
            "SequenceEmpty", "Optional"}


def topological_order(graph: onnx.GraphProto, label: str) -> list[int]:
    """A topological order of ``graph.node``: the graph's own when it is one, else Kahn's.

    Raises:
        UserError: a node reads a tensor nothing defines (a truncated or broken file), two
            nodes write one tensor, a model output is never computed, or the graph has a
            cycle.
    """
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if not out:
                continue
            if out in producer or out in defined:
                other = graph.node[producer[out]] if out in producer else None
                first = ("a model input or initialiser" if other is None
                         else f"node {other.name or other.op_type!r}")
                fail(f"{label}: tensor {out!r} is written by node "
                     f"{node.name or node.op_type!r} and by {first} (an ONNX graph defines "
                     f"each tensor once)")
            producer[out] = i
    for out in graph.output:
        if out.name not in defined and out.name not in producer:
            fail(f"{label}: model output {out.name!r} is never computed (no node writes it)")
    for node in graph.node:
        for name in node_inputs(node):
            if name not in defined and name not in producer:
                what = node.name or node.op_type
                fail(f"{label}: tensor {name!r} read by node {what!r} is never defined "
                     f"(truncated or broken model)")
    in_order = True
    seen = set(defined)
    for node in graph.node:
        if any(n not in seen for n in node_inputs(node)):
            in_order = False
            break
        seen.update(o for o in node.output if o)
    if in_order:
        return list(range(len(graph.node)))
    # Kahn's algorithm, always taking the lowest original index that is ready: stable.
    deps = [{producer[n] for n in node_inputs(nd) if n in producer} for nd in graph.node]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for p in d:
            users.setdefault(p, []).append(i)
    missing = [len(d) for d in deps]
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, ()):
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(graph.node):
        stuck = next(graph.node[i] for i, m in enumerate(missing) if m > 0)
        fail(f"{label}: the graph has a cycle through node {stuck.name or stuck.op_type!r}")
    return order


def check_external_locations(model: onnx.ModelProto, label: str) -> None:
    """Refuse an external-data location outside the model's folder (absolute, ``..``),
    wherever the tensor is (sub-graphs and functions too): the file is never opened."""
    for tensor in iter_tensors(model):
        if not is_external(tensor) or is_inline_ref(tensor):
            continue
        location = {e.key: e.value for e in tensor.external_data}.get("location", "")
        problem = location_problem(location)
        if problem is not None:
            fail(f"{label}: tensor {tensor.name!r}: external data location {location!r} "
                 f"{problem}")


def _load_small_external(graph: onnx.GraphProto, base_dir: Path | None) -> None:
    """Read external initialisers that are tiny (shape vectors) when their file exists."""
    if base_dir is None:
        return
    for tensor in graph.initializer:
        if not is_external(tensor) or is_inline_ref(tensor):  # inline ones: read on demand
            continue
        info = {e.key: e.value for e in tensor.external_data}
        try:
            length = int(info.get("length", "-1"))
        except ValueError:
            continue
        if 0 <= length <= _LOAD_EXTERNAL_MAX_BYTES and (base_dir / info.get("location", "")
                                                        ).is_file():
            try:
                load_external_data_for_tensor(tensor, str(base_dir))
            except (OSError, ValueError):
                continue
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]


def _constant_values(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    """In-memory initialisers, and inline ones the loader left in the model file (inline
    references: folded exactly as if loaded), by name; their values are read on demand."""
    return {t.name: t for t in graph.initializer if not is_external(t) or is_inline_ref(t)}


def _shape_value(node: onnx.NodeProto, shape: tuple[int, ...]) -> np.ndarray:
    """Evaluate ``Shape`` (with its ``start``/``end`` attributes) or ``Size``."""
    if node.op_type == "Size":
        return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    rank = len(shape)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
    return np.array(shape[start:end], dtype=np.int64)


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray | None],
              opset: int) -> list[np.ndarray] | None:
    """Run one node with the ONNX reference implementation; None if it cannot."""
    from onnx.reference import ReferenceEvaluator

    names = [f"i{k}" if n else "" for k, n in enumerate(node.input)]
    single = onnx.NodeProto()
    single.CopyFrom(node)
    del single.input[:]
    single.input.extend(names)
    del single.output[:]
    single.output.extend(f"o{k}" if o else "" for k, o in enumerate(node.output))
    graph = onnx.helper.make_graph(
        [single], "fold",
        [onnx.helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None)
         for n in names if n],
        [onnx.helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None)
         for o in single.output if o])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    feeds = {n: v for n, v in zip(names, inputs, strict=True) if n}
    try:
        results = ReferenceEvaluator(model).run(None, feeds)
    except Exception:  # noqa: BLE001 - an op the reference cannot run simply is not folded
        return None
    return [np.asarray(r) for r in results]


def _foldable_size(values: list[np.ndarray]) -> bool:
    for v in values:
        limit = _FOLD_MAX_INT if (v.dtype.kind in "iub") else _FOLD_MAX_FLOAT
        if v.size > limit or v.dtype.kind not in "iubf":
            return False
    return True


class _SameConstant:
    """Finds an initialiser (or an earlier fold) holding exactly the bytes of a new value.

    Candidates of one dtype and shape are read (and indexed by their bytes) only when a
    folded value of that dtype and shape asks; folded values are small, so no weight is
    ever loaded to compare.
    """

    def __init__(self, graph: onnx.GraphProto, base_dir: Path | None = None) -> None:
        overridable = {v.name for v in graph.input}
        self.base_dir = base_dir  # inline references are read from their model file
        self._pending: dict[tuple[int, tuple[int, ...]], list[TensorProto]] = {}
        for t in graph.initializer:
            if (not is_external(t) or is_inline_ref(t)) and t.name not in overridable:
                self._pending.setdefault((t.data_type, tuple(t.dims)), []).append(t)
        self._by_bytes: dict[tuple[int, tuple[int, ...]], dict[bytes, str]] = {}

    def _index(self, key: tuple[int, tuple[int, ...]]) -> dict[bytes, str]:
        index = self._by_bytes.setdefault(key, {})
        for t in self._pending.pop(key, ()):
            index.setdefault(numpy_helper.to_array(loaded(t, self.base_dir)).tobytes(),
                             t.name)
        return index

    def find(self, tensor: TensorProto, array: np.ndarray) -> str | None:
        # Bit equality: -0.0 and 0.0, or two NaN payloads, are different constants.
        return self._index((tensor.data_type, tuple(tensor.dims))).get(
            np.asarray(array).tobytes())

    def add(self, tensor: TensorProto, array: np.ndarray) -> None:
        self._index((tensor.data_type, tuple(tensor.dims))).setdefault(
            np.asarray(array).tobytes(), tensor.name)


def _fold_round(model: onnx.ModelProto, types: Mapping[str, onnx.TypeProto],
                base_dir: Path | None = None) -> int:
    """Fold every node computable from constants and static shapes; returns how many."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    protos = _constant_values(graph)
    constants = {t.name for t in graph.initializer}
    values: dict[str, np.ndarray] = {}
    outputs = {o.name for o in graph.output}
    same = _SameConstant(graph, base_dir)
    # A folded name that reuses an existing constant: consumers read that one instead.
    alias: dict[str, str] = {}

    def value(name: str) -> np.ndarray | None:
        if name in values:
            return values[name]
        if name in protos:
            values[name] = numpy_helper.to_array(loaded(protos[name], base_dir))
            return values[name]
        return None

    keep: list[onnx.NodeProto] = []
    folded: list[TensorProto] = []
    for node in graph.node:
        result: list[np.ndarray] | None = None
        if node.domain not in ("", "ai.onnx") or any(o in outputs for o in node.output):
            keep.append(node)
            continue
        if node.op_type == "Identity" and node.input and node.input[0] in constants:
            # An exporter's copy of a shared weight (torch writes one per re-use): read the
            # weight itself, whatever its size, without loading it.
            alias[node.output[0]] = alias.get(node.input[0], node.input[0])
            constants.add(node.output[0])
            if node.input[0] in values or node.input[0] in protos:
                values[node.output[0]] = value(node.input[0])  # type: ignore[assignment]
            continue
        if node.op_type == "Constant":
            proto = constant_value_proto(node)
            result = None if proto is None else [numpy_helper.to_array(proto)]
        elif node.op_type in ("Shape", "Size"):
            shape = static_shape(types[node.input[0]]) if node.input[0] in types else None
            result = None if shape is None else [_shape_value(node, shape)]
        elif node.op_type not in _NO_FOLD and all(
                not n or n in protos or n in values for n in node.input):
            expected = [types.get(o) for o in node.output if o]
            sizes = [static_shape(t) if t is not None else None for t in expected]
            too_big = any(s is not None and int(np.prod(s)) > _FOLD_MAX_INT for s in sizes)
            if not too_big:
                args = [value(n) if n else None for n in node.input]
                result = _evaluate(node, args, opset)
        if result is None or (node.op_type != "Constant" and not _foldable_size(result)):
            keep.append(node)
            continue
        for name, array in zip([o for o in node.output if o], result, strict=False):
            values[name] = array
            constants.add(name)
            # (np.ascontiguousarray would turn a 0-d scalar into shape (1,))
            tensor = numpy_helper.from_array(np.array(array, order="C"), name)
            existing = same.find(tensor, array)
            if existing is not None:
                alias[name] = existing
                continue
            same.add(tensor, array)
            folded.append(tensor)
    if len(keep) == len(graph.node):
        return 0
    count = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(folded)
    rename_in_graph(graph, alias)
    _drop_unused_initializers(graph)
    return count


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {n for node in graph.node for n in node_inputs(node)} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        dropped = {t.name for t in graph.initializer} - {t.name for t in keep}
        del graph.initializer[:]
        graph.initializer.extend(keep)
        kept_inputs = [v for v in graph.input if v.name not in dropped]
        del graph.input[:]
        graph.input.extend(kept_inputs)


def _check_static(model: onnx.ModelProto, types: Mapping[str, onnx.TypeProto],
                  label: str) -> None:
    """Every tensor that something reads (or the model returns) needs a static shape."""
    graph = model.graph
    read = {n for node in graph.node for n in node_inputs(node)} | {o.name for o in graph.output}
    inits = {t.name for t in graph.initializer}
    for node in graph.node:
        for out in node.output:
            if not out or out not in read or out in inits:
                continue
            t = types.get(out)
            where = f"(output of {node.op_type} node {node.name!r})" if node.name else \
                f"(output of a {node.op_type} node)"
            if t is not None and t.WhichOneof("value") not in (None, "tensor_type"):
                fail(f"{label}: tensor {out!r} {where} is a {t.WhichOneof('value')}, "
                     f"only tensors are supported")
            if t is None or static_shape(t) is None or t.tensor_type.elem_type == 0:
                if node.op_type in CONTROL_FLOW:
                    fail(f"{label}: the shape of tensor {out!r} cannot be inferred: "
                         f"{describe_control_flow(node)}")
                fail(f"{label}: the shape of tensor {out!r} {where} cannot be inferred")


def _write_types(model: onnx.ModelProto, types: Mapping[str, onnx.TypeProto],
                 control: Mapping[str, onnx.NodeProto]) -> None:
    graph = model.graph
    for node in graph.node:
        inferred = control.get(node.output[0]) if node.output else None
        if inferred is None or inferred.op_type != node.op_type:
            continue
        # The sub-graphs with the shapes inference found inside them (FLOPs of a branch).
        by_name = {a.name: a for a in inferred.attribute}
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) \
                    and attr.name in by_name:
                attr.CopyFrom(by_name[attr.name])
    inputs = {v.name for v in graph.input}
    inits = {t.name for t in graph.initializer}
    del graph.value_info[:]
    for node in graph.node:
        for out in node.output:
            if out and out in types and out not in inits:
                graph.value_info.add(name=out).type.CopyFrom(types[out])
    outputs = {o.name for o in graph.output}
    for out in graph.output:
        if out.name in types and out.name not in inputs:
            out.type.CopyFrom(types[out.name])
    kept = [v for v in graph.value_info if v.name not in outputs]
    del graph.value_info[:]
    graph.value_info.extend(kept)


def prepare_model(model: onnx.ModelProto, *, shapes: Mapping[str, tuple[int, ...]] | None,
            base_dir: Path | None, label: str) -> int:
    """Prepare ``model`` in place (see the module docstring).

    Returns the nodes folded into constants (an inlined ``If`` counts as one).

    Args:
        model: the model; external initialisers stay references.
        shapes: static dims for inputs, by input name.
        base_dir: folder of the model file (tiny external shape vectors are read from it).
        label: how error messages name the model (its path).

    Raises:
        UserError: unknown ``--shape`` input or rank, an unfixed dynamic dim, a tensor
            whose shape cannot be inferred, a broken graph.
    """
    if model.functions:
        # Local functions hide their nodes from shape inference and from the layer grouping.
        from onnx.inliner import inline_local_functions

        try:
            inlined = inline_local_functions(model)
        except Exception as err:  # noqa: BLE001 - the inliner raises several types
            fail(f"{label}: cannot inline its local functions "
                 f"({', '.join(f.name for f in model.functions)}): "
                 f"{(str(err).splitlines() or [type(err).__name__])[0]}")
        model.CopyFrom(inlined)
    graph = model.graph
    hoist_subgraph_constants(graph)
    order = topological_order(graph, label)
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        del graph.node[:]
        graph.node.extend(nodes)
    fix_input_shapes(graph, shapes or {}, label)
    check_external_locations(model, label)
    _load_small_external(graph, base_dir)
    folded = 0
    types: dict[str, onnx.TypeProto] = {}
    control: dict[str, onnx.NodeProto] = {}

    def constant(name: str) -> np.ndarray | None:
        tensor = next((t for t in graph.initializer if t.name == name), None)
        return None if tensor is None or is_external(tensor) else numpy_helper.to_array(tensor)

    for _ in range(MAX_ROUNDS):
        types, control = infer_types(model, label)
        count = inline_constant_ifs(graph, constant, label)
        count += _fold_round(model, types, base_dir)
        folded += count
        if count == 0:
            break
    _check_static(model, types, label)
    _write_types(model, types, control)
    return folded
