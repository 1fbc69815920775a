"""Cut a prepared model into stages: the ONNX sub-graph of a range of layers.

A stage is the nodes of layers ``first..last`` (``Layer.nodes`` index the prepared model's
``graph.node``). Its inputs are the live tensors of the cut before ``first`` that the range
consumes (model inputs included); its outputs are the tensors the range produces that are
still needed after ``last`` (by a later layer, or because they are model outputs). A stage
carries only the initialisers and ``Constant`` nodes it uses, so it never holds weights of
another stage (SPEC §2: a device holds the weights of its own layers only).

The sub-graph is built by hand rather than with ``onnx.utils.extract_model``: that helper
serialises the whole model (it breaks above 2 GB) and loads every external weight. A stage
does not copy its weights: :class:`SubModel` holds the source model's own initialiser
messages next to a weight-less ``shell``. :meth:`SubModel.save` streams them one tensor at
a time, into the stage's data file (external weights chunk by chunk from their source
file) or after the graph in the ``.onnx`` file itself (see
:mod:`partitioner.frontend.stagefile`), so saving a stage needs the memory of its largest
tensor, not of the stage.

Why not onnx_ir (issue 10 item 7), measured on vgg16 (553 MB, weights inline), the stage of
its second half of layers (517 MB), one fresh process each, peak RSS by getrusage, on the
loaded 2-core host (script: wrap the prepared model with
``onnx_ir.serde.deserialize_model``, remove the other nodes and initialisers, make the
boundary values graph inputs, ``onnx_ir.save``): onnx_ir peaks at 3301 MB, 2158 MB above
the loaded model, because ``save`` serialises the whole stage proto (in memory: several
copies of the stage); this module writes *both* stages within the 1107 MB that loading
already peaks at (``python benchmarks/compile_memory.py``, mode ``slice-only``: 1107 MB,
was 3782 MB before streaming). With external data the two are level (onnx_ir 92 MB for
the one stage, this module 99 MB for both), as onnx_ir's lazy tensors are what the
references here already are. So onnx_ir buys no memory and costs a second in-memory IR of
the model (the front end, the layer graph and the profiler all read the ``ModelProto``);
the hand-written code stays.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, ValueInfoProto, helper

from partitioner.errors import fail
from partitioner.frontend.stagefile import (
    inline_model,
    is_external,
    load_externals,
    save_model,
    save_split,
    stored_externally,
    uses_external_data,
    write_inline,
)
from partitioner.ir import LayerGraph, TensorInfo
from stagebundle.load import iter_tensors

__all__ = [
    "SubModel",
    "extract_layers",
    "tensor_info",
    "iter_tensors",
    "uses_external_data",
    "save_model",
    "inline_model",
    "value_info",
]

class _Prepared(Protocol):
    """What :func:`extract_layers` needs of ``partitioner.frontend.PreparedModel``."""

    model: ModelProto
    graph: LayerGraph
    base_dir: Path | None


@dataclass(frozen=True)
class SubModel:
    """The ONNX model of layers ``first..last`` of a prepared model.

    The stage's weights are not copied: ``weights`` are the source model's own
    initialiser messages, and ``shell`` is the stage model without them (nodes, inputs,
    outputs, value infos: kilobytes). :meth:`save` and :meth:`to_bytes` stream the weights
    one tensor at a time, so compiling never holds a second copy of a stage.

    Attributes:
        shell: the stage model without its top-level initialisers.
        inputs: live tensors entering the range (graph inputs), in order.
        outputs: tensors leaving the range (graph outputs), in order.
        first / last: the layer range (inclusive).
        base_dir: folder against which external-data locations resolve (None: no external
            data).
        weights: the initialisers the stage reads, shared with the source model; those
            that were external data there are still references relative to ``base_dir``.
    """

    shell: ModelProto
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    first: int
    last: int
    base_dir: Path | None = None
    weights: tuple[TensorProto, ...] = ()

    @property
    def model(self) -> ModelProto:
        """The whole stage model as one proto: a copy, weights included (small stages and
        tests; :meth:`save` and :meth:`to_bytes` do not need it)."""
        out = ModelProto()
        out.CopyFrom(self.shell)
        out.graph.initializer.extend(self.weights)
        return out

    @property
    def has_external_data(self) -> bool:
        return uses_external_data(self.shell) or any(is_external(t) for t in self.weights)

    def save(self, path: str | os.PathLike[str], *, external_data: str | None = None) -> None:
        """Write the stage to ``path`` atomically; see :func:`save_model`."""
        save_split(self.shell, self.weights, path, base_dir=self.base_dir,
              external_data=external_data)

    def to_bytes(self) -> bytes:
        """The serialised stage (for ``onnxruntime.InferenceSession(bytes)``), built one
        weight at a time; external weights are read in. Below protobuf's 2 GB only."""
        if uses_external_data(self.shell) or any(stored_externally(t) for t in self.weights):
            return self.inlined().SerializeToString()
        buf = io.BytesIO()
        write_inline(self.shell, self.weights, buf, base_dir=self.base_dir)
        return buf.getvalue()

    def inlined(self) -> ModelProto:
        """A copy whose external weights are loaded into memory (this stage's only).

        Use it to run the stage from bytes
        (``onnxruntime.InferenceSession(m.SerializeToString())``); for stages above 2 GB
        save them with :meth:`save` instead.
        """
        out = self.model
        load_externals(out, self.base_dir)
        return out


# --------------------------------------------------------------------------- tensors


def tensor_info(vi: ValueInfoProto) -> TensorInfo:
    """A :class:`TensorInfo` from a value info with a static tensor shape.

    Raises:
        UserError: the value is not a tensor or a dimension is not a fixed integer.
    """
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.elem_type:
        fail(f"tensor {vi.name!r}: not a tensor with a known element type")
    dims: list[int] = []
    for i, d in enumerate(t.shape.dim):
        if not d.HasField("dim_value"):
            fail(f"tensor {vi.name!r}: dimension {i} is not static "
                 f"({d.dim_param or 'unknown'}); fix it with --shape")
        dims.append(int(d.dim_value))
    if not t.HasField("shape"):
        fail(f"tensor {vi.name!r}: shape unknown")
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type))
    size = int(np.prod(dims, dtype=np.int64)) if dims else 1
    return TensorInfo(vi.name, tuple(dims), dtype.name, size * dtype.itemsize)


def value_info(info: TensorInfo) -> ValueInfoProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype))
    return helper.make_tensor_value_info(info.name, elem, list(info.shape))


def _subgraph_free_names(graph: GraphProto) -> set[str]:
    """Names a control-flow body reads from the enclosing scope."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    free: set[str] = set()
    for node in graph.node:
        for name in _node_reads(node):
            if name and name not in defined:
                free.add(name)
        defined.update(node.output)
    return free


def _node_reads(node: onnx.NodeProto) -> Iterator[str]:
    """Every value a node reads, including outer-scope names used by its sub-graphs."""
    yield from node.input
    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield from _subgraph_free_names(attr.g)
        elif attr.type == AttributeProto.GRAPHS:
            for g in attr.graphs:
                yield from _subgraph_free_names(g)


def _is_constant(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.input


# --------------------------------------------------------------------------- slicing


def extract_layers(prepared: _Prepared, first: int, last: int) -> SubModel:
    """The stage model of layers ``first..last`` (inclusive) of ``prepared``.

    Args:
        prepared: a ``PreparedModel`` (``.model`` with static shapes, ``.graph`` whose
            ``layers[k].nodes`` index ``.model.graph.node``, ``.base_dir`` for external data).
        first: first layer of the range.
        last: last layer of the range.

    Returns:
        The sub-model with its live inputs and outputs.

    Raises:
        UserError: the range is empty or out of bounds, or a boundary tensor has no static
            shape.
    """
    model, graph = prepared.model, prepared.graph
    n_layers = len(graph.layers)
    if not 0 <= first <= last < n_layers:
        fail(f"model {graph.name!r}: layer range {first}..{last} is outside 0..{n_layers - 1}")
    nodes_all = model.graph.node
    in_range = sorted({i for k in range(first, last + 1) for i in graph.layers[k].nodes})
    chosen = set(in_range)

    producer: dict[str, int] = {}
    for i, node in enumerate(nodes_all):
        for out in node.output:
            if out:
                producer[out] = i
    inits = {t.name: t for t in model.graph.initializer}
    model_inputs = [vi.name for vi in model.graph.input if vi.name not in inits]
    model_outputs = {vi.name for vi in model.graph.output}

    produced = {o for i in in_range for o in nodes_all[i].output if o}
    reads: list[str] = []  # first-read order, deterministic
    seen: set[str] = set()
    for i in in_range:
        for name in _node_reads(nodes_all[i]):
            if name and name not in seen:
                seen.add(name)
                reads.append(name)

    # A Constant produced by another layer's node is copied in, not received over the
    # network: it is a weight of this stage too (SPEC §2 counts Constant nodes as weights).
    borrowed: list[int] = []
    used_inits: list[str] = []
    boundary: list[str] = []
    for name in reads:
        if name in produced:
            continue
        p = producer.get(name)
        if p is not None and _is_constant(nodes_all[p]):
            borrowed.append(p)
        elif name in inits:
            used_inits.append(name)
        else:
            boundary.append(name)
    order = {name: k for k, name in enumerate(model_inputs)}
    boundary.sort(key=lambda n: (0, order[n]) if n in order else (1, producer.get(n, -1)))

    # Outputs: produced here and read by a node outside the range, or a model output.
    read_outside: set[str] = set()
    for i, node in enumerate(nodes_all):
        if i not in chosen:
            read_outside.update(_node_reads(node))
    # A Constant's value is not sent: the stages that read it copy the node (see above).
    outputs = [o for i in in_range for o in nodes_all[i].output
               if o and (o in model_outputs or (o in read_outside and not _is_constant(
                   nodes_all[i])))]
    if not outputs:
        fail(f"model {graph.name!r}: layers {first}..{last} produce nothing used later")

    known: dict[str, ValueInfoProto] = {}
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        known[vi.name] = vi

    def info(name: str) -> TensorInfo:
        if name in known:
            return tensor_info(known[name])
        if name in graph.tensors:
            return graph.tensors[name]
        fail(f"model {graph.name!r}: tensor {name!r} at the boundary of layers "
             f"{first}..{last} has no shape (run shape inference first)")

    in_infos = tuple(info(n) for n in boundary)
    out_infos = tuple(info(n) for n in outputs)

    sub_nodes = [nodes_all[i] for i in sorted(set(borrowed))] + [nodes_all[i] for i in in_range]
    internal = (produced | {o for i in borrowed for o in nodes_all[i].output}) - set(outputs)
    inner_infos = [known[n] for n in sorted(internal) if n in known]
    sub_graph = helper.make_graph(
        sub_nodes,
        f"{model.graph.name or graph.name}_layers_{first}_{last}",
        [value_info(t) for t in in_infos],
        [value_info(t) for t in out_infos],
        value_info=inner_infos,
    )
    sub = helper.make_model(
        sub_graph,
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
        producer_name=model.producer_name or "partitioner",
        producer_version=model.producer_version,
        functions=list(model.functions),
    )
    raw_dir = getattr(prepared, "base_dir", None)
    base_dir = Path(raw_dir) if raw_dir is not None else None
    return SubModel(sub, in_infos, out_infos, first, last, base_dir,
                    tuple(inits[n] for n in used_inits))
