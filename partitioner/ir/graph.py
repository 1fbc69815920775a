"""The model: tensors, major layers, the cuts between them (the front end's output).

Part of :mod:`partitioner.ir`; import the names from there."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorInfo:
    """A tensor with a fully static shape.

    Attributes:
        name: ONNX value name.
        shape: static dimensions (all ints >= 0).
        dtype: numpy dtype name, e.g. ``"float32"``, ``"int64"``.
        nbytes: product of ``shape`` times the element size.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Layer:
    """One major layer (or one node with ``--granularity node``).

    Attributes:
        index: 0-based position in the linearised (topological) order.
        name: readable, unique name (module scope for PyTorch exports, else the node name).
        ops: ONNX op types of the nodes it carries, in order (e.g. ``("Conv", "Relu")``).
        nodes: indices into ``graph.node`` of the prepared model that belong to this layer.
        flops: floating point operations (a multiply-accumulate counts 2; cheap ops 1 per
            output element).
        weight_count: number of weight parameters (initialisers and ``Constant`` nodes).
        weight_bytes: bytes of those weights.
        output_bytes: bytes of the tensors this layer produces that something else uses.
        cut_bytes: bytes of every tensor live across the cut after this layer.
        consumes: non-weight tensors it reads that another layer (or the model input)
            produces, in first-use order: the edges of the tensor DAG (stage graph routing).
        produces: tensors it produces that a later layer or the model output reads.
        weights: names of the initialisers it reads (a shared one appears in several
            layers; ``LayerGraph.initializer_bytes`` gives each one's size once).
        rows: the row geometry of its ops along the height axis when the layer can be split
            by output rows (DISTREDGE), in execution order; None when it cannot.
    """

    index: int
    name: str
    ops: tuple[str, ...]
    nodes: tuple[int, ...]
    flops: int
    weight_count: int
    weight_bytes: int
    output_bytes: int
    cut_bytes: int
    consumes: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    rows: tuple[RowOp, ...] | None = None


@dataclass(frozen=True)
class RowOp:
    """How one op maps output rows to input rows along the height axis (DISTREDGE).

    Output rows ``[a, b]`` need input rows ``[a*stride - pad_top,
    b*stride - pad_top + dilation*(kernel - 1)]``, clipped to ``[0, in_height - 1]``; the
    clipped rows become that part's padding. Element-wise ops have kernel 1, stride 1,
    no padding.
    """

    op: str
    kernel: int
    stride: int
    pad_top: int
    pad_bottom: int
    dilation: int
    in_height: int
    out_height: int


@dataclass(frozen=True)
class Cut:
    """The tensors live across the cut after layer ``after`` (``-1``: before layer 0).

    ``tensors`` are names in ``LayerGraph.tensors``; graph outputs produced early count as
    live until the end, graph inputs count as live until their last consumer.
    """

    after: int
    tensors: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class LayerGraph:
    """A model as the compiler sees it: major layers in topological order and their cuts.

    Attributes:
        name: model name (file stem).
        sha256: SHA-256 of the ONNX file's bytes (the profile fingerprint).
        granularity: ``"major"`` or ``"node"``.
        layers: the layers, ``layers[k].index == k``.
        cuts: ``len(layers) + 1`` cuts; ``cuts[0]`` is before layer 0 (``after=-1``: the
            model inputs), ``cuts[k + 1]`` is after layer ``k``; the last is the outputs.
        inputs: model inputs (static shapes).
        outputs: model outputs.
        tensors: every tensor named in a cut, by name.
        initializer_bytes: bytes of every weight initialiser by name (shared weights counted
            once; ``Layer.weights`` names them).
    """

    name: str
    sha256: str
    granularity: str
    layers: tuple[Layer, ...]
    cuts: tuple[Cut, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    tensors: Mapping[str, TensorInfo] = field(default_factory=dict)
    initializer_bytes: Mapping[str, int] = field(default_factory=dict)

    @property
    def input_bytes(self) -> int:
        return sum(t.nbytes for t in self.inputs)

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    def cut_after(self, k: int) -> Cut:
        """The cut after layer ``k`` (``k = -1`` is the cut before layer 0)."""
        return self.cuts[k + 1]


