"""Compiler stage: front end. Loads a model and turns it into major layers and cuts.

``load_model`` accepts an ``.onnx`` path or a PyTorch module (exported with the dynamo
exporter) and returns a :class:`PreparedModel`: the prepared ONNX model (static shapes,
inferred ``value_info``, shape sub-graphs folded, ``If`` nodes with a constant condition
inlined, nodes ordered layer by layer) and its
:class:`partitioner.ir.LayerGraph`. Weights are never loaded for this.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from partitioner.errors import fail
from partitioner.frontend.layers import LayerStats, build_layer_graph
from partitioner.frontend.loading import check_proto, export_torch, read_onnx
from partitioner.frontend.prepare import prepare_model
from partitioner.frontend.rows import with_rows
from partitioner.ir import LayerGraph

__all__ = ["PreparedModel", "load_model", "GRANULARITIES"]

GRANULARITIES = ("major", "node")


@dataclass(frozen=True)
class PreparedModel:
    """A model ready for partitioning.

    Attributes:
        model: the prepared ONNX model: dynamic dims fixed, shapes inferred (in
            ``graph.value_info``), shape sub-graphs and ``Constant`` nodes folded into
            initialisers, nodes ordered layer by layer. External initialisers are *not*
            loaded (resolve them against ``base_dir``), nor, when loaded with
            ``lazy_weights``, big inline ones (inline references into the model file).
        graph: its layers and cuts; ``graph.layers[k].nodes`` index ``model.graph.node``.
        path: the original ``.onnx`` file, or None for a PyTorch module.
        base_dir: folder for resolving external data, or None.
        stats: MACs per layer and deduplicated weight totals.
        shapes: the input shapes that were fixed (``--shape``).
        folded: how many nodes were folded into constants or aliased to an existing
            initialiser (an ``If`` replaced by its taken branch counts as one).
    """

    model: onnx.ModelProto
    graph: LayerGraph
    path: Path | None
    base_dir: Path | None
    stats: LayerStats
    shapes: Mapping[str, tuple[int, ...]]
    folded: int = 0


def _is_torch_module(source: Any) -> bool:
    # Checked by duck typing so that torch is only imported when a module is given.
    return hasattr(source, "forward") and hasattr(source, "named_modules")


def load_model(source: str | Path | Any, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
               granularity: str = "major", example_inputs: Any = None,
               lazy_weights: bool = False) -> PreparedModel:
    """Load and prepare a model.

    Args:
        source: path of an ``.onnx`` file, an ``onnx.ModelProto`` (copied, not changed;
            its external data, if any, is not resolved), or a ``torch.nn.Module``.
        shapes: static dims for dynamic inputs, by input name (``--shape``).
        granularity: ``"major"`` (partition points between major layers) or ``"node"``.
        example_inputs: for a PyTorch module, the ``forward`` arguments (a tensor or a
            tuple) used to export it.
        lazy_weights: for an ``.onnx`` path, leave its big inline weights in the file
            (inline references, :mod:`partitioner.frontend.inline_weights`): the model
            proto then holds none of them (``partitioner compile`` loads so, issue 16);
            every reader of weights resolves them against ``base_dir`` like external data,
            and the stage files written are byte for byte the same.

    Returns:
        The prepared model and its layer graph.

    Raises:
        UserError: missing/corrupt file, failed export, unknown ``--shape`` input or rank,
            unfixed dynamic dimension, a tensor whose shape cannot be inferred.
    """
    if granularity not in GRANULARITIES:
        fail(f"granularity {granularity!r}: expected one of {', '.join(GRANULARITIES)}")
    shapes = {k: tuple(int(d) for d in v) for k, v in (shapes or {}).items()}
    if isinstance(source, (str, Path)):
        file = Path(source)
        model, sha = read_onnx(file, lazy_weights=lazy_weights)
        path: Path | None = file
        base_dir: Path | None = file.resolve().parent
        name, label = file.stem, str(file)
    elif isinstance(source, onnx.ModelProto):
        # Prepared in place below: work on a copy so the caller's proto is left alone.
        model = onnx.ModelProto()
        model.CopyFrom(source)
        sha = hashlib.sha256(source.SerializeToString()).hexdigest()
        path = base_dir = None
        name = source.graph.name or "model"
        label = f"ONNX model {name!r}"
        check_proto(model, label)
    elif _is_torch_module(source):
        model, sha = export_torch(source, example_inputs)
        path = base_dir = None
        name = type(source).__name__
        label = f"PyTorch module {name}"
    else:
        fail(f"cannot load a model from a {type(source).__name__}: "
             f"expected an .onnx path, an onnx.ModelProto or a torch.nn.Module")
    folded = prepare_model(model, shapes=shapes, base_dir=base_dir, label=label)
    graph, stats = build_layer_graph(model, name=name, sha256=sha, granularity=granularity)
    graph = with_rows(model, graph)  # Layer.rows: which layers can be split by output rows
    return PreparedModel(model=model, graph=graph, path=path, base_dir=base_dir, stats=stats,
                         shapes=shapes, folded=folded)
