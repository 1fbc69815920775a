"""Cut a prepared model into stages: the ONNX sub-graph of a range of layers.

A stage is the nodes of layers ``first..last`` (``Layer.nodes`` index the prepared model's
``graph.node``). Its inputs are the live tensors of the cut before ``first`` that the range
consumes (model inputs included); its outputs are the tensors the range produces that are
still needed after ``last`` (by a later layer, or because they are model outputs). A stage
carries only the initialisers and ``Constant`` nodes it uses, so it never holds weights of
another stage (SPEC §2: a device holds the weights of its own layers only).

The sub-graph is built by hand rather than with ``onnx.utils.extract_model``: that helper
serialises the whole model (it breaks above 2 GB) and loads every external weight. Here an
initialiser stored as external data stays a reference to its file until the stage is saved;
:meth:`SubModel.save` then streams only the bytes of the tensors the stage uses into the
stage's own data file, one tensor at a time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, ValueInfoProto, helper

from partitioner.errors import InternalError, fail
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
]

# Tensors at least this big go to the external data file when a stage is saved with one;
# smaller ones stay in the protobuf (the same default as onnx.save's size_threshold).
_EXTERNAL_THRESHOLD = 1024
# Copy external bytes in chunks so a multi-GB tensor never sits in memory whole.
_CHUNK = 16 << 20
# Stay clear of protobuf's 2 GiB hard limit when deciding that weights must go external.
_PROTO_LIMIT = 1_800_000_000


class _Prepared(Protocol):
    """What :func:`extract_layers` needs of ``partitioner.frontend.PreparedModel``."""

    model: ModelProto
    graph: LayerGraph
    base_dir: Path | None


@dataclass(frozen=True)
class SubModel:
    """The ONNX model of layers ``first..last`` of a prepared model.

    Attributes:
        model: the stage model. Initialisers that were external data in the source model
            are still external references, relative to ``base_dir``.
        inputs: live tensors entering the range (graph inputs of ``model``), in order.
        outputs: tensors leaving the range (graph outputs of ``model``), in order.
        first / last: the layer range (inclusive).
        base_dir: folder against which external-data locations resolve (None: no external
            data).
    """

    model: ModelProto
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    first: int
    last: int
    base_dir: Path | None = None

    @property
    def has_external_data(self) -> bool:
        return uses_external_data(self.model)

    def save(self, path: str | os.PathLike[str], *, external_data: str | None = None) -> None:
        """Write the stage to ``path`` atomically; see :func:`save_model`."""
        save_model(self.model, path, base_dir=self.base_dir, external_data=external_data)

    def inlined(self) -> ModelProto:
        """A copy whose external weights are loaded into memory (this stage's only).

        Use it to run the stage from bytes
        (``onnxruntime.InferenceSession(m.SerializeToString())``); for stages above 2 GB
        save them with :meth:`save` instead.
        """
        return inline_model(self.model, self.base_dir)


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


def _value_info(info: TensorInfo) -> ValueInfoProto:
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


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def uses_external_data(model: ModelProto) -> bool:
    """Whether any tensor of ``model`` is stored as external data."""
    return any(_is_external(t) for t in iter_tensors(model))


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
    value_info = [known[n] for n in sorted(internal) if n in known]
    sub_graph = helper.make_graph(
        sub_nodes,
        f"{model.graph.name or graph.name}_layers_{first}_{last}",
        [_value_info(t) for t in in_infos],
        [_value_info(t) for t in out_infos],
        initializer=[inits[n] for n in used_inits],
        value_info=value_info,
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
    return SubModel(sub, in_infos, out_infos, first, last, base_dir)


# --------------------------------------------------------------------------- saving


def _external_fields(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _resolve(base_dir: Path | None, location: str, tensor: str) -> Path:
    if base_dir is None:
        fail(f"tensor {tensor!r}: stored as external data ({location!r}) but the model's "
             f"folder is unknown")
    path = (base_dir / location)
    if not path.is_file():
        fail(f"tensor {tensor!r}: external data file {str(path)!r} not found")
    return path


def _copy_range(src: Path, offset: int, length: int | None, dst: Any) -> int:
    """Append ``length`` bytes of ``src`` from ``offset`` to the open file ``dst``."""
    copied = 0
    with open(src, "rb") as f:
        f.seek(offset)
        while length is None or copied < length:
            want = _CHUNK if length is None else min(_CHUNK, length - copied)
            chunk = f.read(want)
            if not chunk:
                break
            dst.write(chunk)
            copied += len(chunk)
    if length is not None and copied != length:
        fail(f"external data file {str(src)!r}: expected {length} bytes at offset {offset}, "
             f"found {copied}")
    return copied


def _inline_size(model: ModelProto) -> int:
    return sum(len(t.raw_data) for t in iter_tensors(model) if not _is_external(t))


def save_model(model: ModelProto, path: str | os.PathLike[str], *, base_dir: Path | None = None,
               external_data: str | None = None) -> None:
    """Save a (stage) model atomically, streaming its external weights.

    Args:
        model: the model; tensors stored as external data resolve against ``base_dir``.
        path: the ``.onnx`` file to write.
        base_dir: folder of the source model's external data files.
        external_data: file name (next to ``path``) for the weights. When None, weights are
            embedded unless the model already uses external data or would exceed protobuf's
            2 GB limit, in which case ``<file>.data`` is used.

    The model passed in is not modified. Each external tensor is copied chunk by chunk from
    its source file, so memory use is bounded by the chunk size, not the model size.
    """
    path = Path(path)
    if external_data is None and (uses_external_data(model) or _inline_size(model) > _PROTO_LIMIT):
        external_data = path.name + ".data"
    out = ModelProto()
    out.CopyFrom(model)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        if external_data is not None:
            if Path(external_data).name != external_data:
                raise InternalError(f"external data name {external_data!r} must be a file name")
            with open(tmp_dir / external_data, "wb") as data:
                _write_external(out, data, base_dir, external_data)
        onnx.save_model(out, str(tmp_dir / path.name))
        if external_data is not None:
            os.replace(tmp_dir / external_data, path.parent / external_data)
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _write_external(model: ModelProto, data: Any, base_dir: Path | None, name: str) -> None:
    for t in iter_tensors(model):
        if _is_external(t):
            fields = _external_fields(t)
            src = _resolve(base_dir, fields["location"], t.name)
            offset = int(fields.get("offset", 0))
            length = int(fields["length"]) if "length" in fields else None
            start = data.tell()
            n = _copy_range(src, offset, length, data)
        elif t.HasField("raw_data") and len(t.raw_data) >= _EXTERNAL_THRESHOLD:
            start = data.tell()
            data.write(t.raw_data)
            n = len(t.raw_data)
            t.ClearField("raw_data")
        else:
            continue
        del t.external_data[:]
        for key, value in (("location", name), ("offset", str(start)), ("length", str(n))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        t.data_location = TensorProto.EXTERNAL
        # Keep offsets page-aligned like onnx's own writer (mmap-friendly loaders).
        pad = (-data.tell()) % 4096
        if pad:
            data.write(b"\0" * pad)


def inline_model(model: ModelProto, base_dir: Path | None) -> ModelProto:
    """A copy of ``model`` with every external tensor loaded from ``base_dir``."""
    out = ModelProto()
    out.CopyFrom(model)
    for t in _externals(iter_tensors(out)):
        fields = _external_fields(t)
        src = _resolve(base_dir, fields["location"], t.name)
        with open(src, "rb") as f:
            f.seek(int(fields.get("offset", 0)))
            length = int(fields["length"]) if "length" in fields else -1
            t.raw_data = f.read(length)
        del t.external_data[:]
        t.data_location = TensorProto.DEFAULT
    return out


def _externals(tensors: Iterable[TensorProto]) -> list[TensorProto]:
    return [t for t in tensors if _is_external(t)]
