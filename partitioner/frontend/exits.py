"""Early-exit heads (DISS §6.4, BranchyNet): ``--exit`` parsing, branch layers, layer order,
and the exit probability measured on calibration inputs.

An exit head is a model output. ``--exit OUTPUT=P`` declares it with its exit probability
``P`` (the share of the requests reaching the head that leave there); ``--exit OUTPUT@T``
with a confidence threshold ``T`` on the softmax of that output (a request leaves when its
largest class probability is at least ``T``, :func:`stagebundle.exits.confidence`), the
probability then measured on ``--calibration FILE.npz``. Several heads are allowed; their
probabilities are conditional, in layer order (the second head's share counts only the
requests that did not leave at the first).

:func:`resolve_exits` also fixes the layer order so that a stage can end in each head
without computing any of the continuation first: the nodes every head needs (its
ancestors) come first, head by head, then the rest, each group in its previous topological
order (a valid topological order, since an ancestor set is closed under producers). Zoo
models are already built that way (:mod:`models.exits`), so their order is kept.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from partitioner import ir
from partitioner.errors import fail
from partitioner.frontend.calibration import load_calibration
from stagebundle.exits import confidence

if TYPE_CHECKING:
    from partitioner.frontend import PreparedModel

__all__ = ["ExitSpec", "parse_exit", "ResolvedExit", "resolve_exits", "branch_layers",
           "load_calibration", "measure_probabilities"]

log = logging.getLogger("partitioner.exits")


@dataclass(frozen=True)
class ExitSpec:
    """One ``--exit``: an output with a probability, or with a softmax threshold (whose
    probability is measured; both given: the probability is taken as measured)."""

    output: str
    probability: float | None = None
    threshold: float | None = None


def _unit_number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        fail(f"{what}: expected a number in [0, 1], got {text!r}")
    return value


def parse_exit(text: str) -> ExitSpec:
    """``OUTPUT=P`` or ``OUTPUT@T``; a malformed one is a one-line error naming it."""
    if "=" in text:
        name, _, value = text.partition("=")
        spec = ExitSpec(name, probability=_unit_number(value, f"--exit {text}: probability"))
    elif "@" in text:
        name, _, value = text.partition("@")
        spec = ExitSpec(name, threshold=_unit_number(value, f"--exit {text}: threshold"))
    else:
        fail(f"--exit {text!r}: expected OUTPUT=PROBABILITY or OUTPUT@THRESHOLD")
    if not spec.output:
        fail(f"--exit {text!r}: no output name")
    return spec


@dataclass(frozen=True)
class ResolvedExit:
    """A head in the model: its output, the layer producing it, its branch layers."""

    head: ir.ExitHead
    layer: int
    branch: tuple[int, ...]


def _producers(graph: ir.LayerGraph) -> dict[str, int]:
    return {t: layer.index for layer in graph.layers for t in layer.produces}


def _layer_ancestors(graph: ir.LayerGraph, layer: int) -> set[int]:
    made = _producers(graph)
    seen, todo = {layer}, [layer]
    while todo:
        for t in graph.layers[todo.pop()].consumes:
            k = made.get(t)
            if k is not None and k not in seen:
                seen.add(k)
                todo.append(k)
    return seen


def _head_layer(graph: ir.LayerGraph, output: str) -> int:
    layer = _producers(graph).get(output)
    if layer is None:
        fail(f"--exit {output}: no layer produces that model output")
    return layer


def branch_layers(graph: ir.LayerGraph, output: str, exits: Sequence[str] = ()) -> tuple[int, ...]:
    """The layers only exit head ``output`` needs: its ancestors that no other model
    output (except other exit heads in ``exits``) needs."""
    others: set[int] = set()
    for t in graph.outputs:
        if t.name != output and t.name not in exits:
            others |= _layer_ancestors(graph, _head_layer(graph, t.name))
    return tuple(sorted(_layer_ancestors(graph, _head_layer(graph, output)) - others))


def _node_ancestors(model: onnx.ModelProto, output: str) -> set[int]:
    made = {t: i for i, n in enumerate(model.graph.node) for t in n.output}
    start = made[output]
    seen, todo = {start}, [start]
    while todo:
        for t in model.graph.node[todo.pop()].input:
            k = made.get(t)
            if k is not None and k not in seen:
                seen.add(k)
                todo.append(k)
    return seen


def _reordered(prepared: PreparedModel, outputs: Sequence[str]) -> PreparedModel:
    """``prepared`` with each head's ancestors first (see the module docstring)."""
    from partitioner.frontend.layers import build_layer_graph
    from partitioner.frontend.rows import with_rows

    graph = prepared.graph
    heads = sorted(_head_layer(graph, o) for o in outputs)
    done: set[int] = set()
    in_order = True
    for h in heads:
        need = _layer_ancestors(graph, h) | done
        if any(k not in need for k in range(h + 1)):
            in_order = False
        done = need
    if in_order:
        return prepared
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    n = len(model.graph.node)
    first: list[int] = []
    placed: set[int] = set()
    for out in sorted(outputs, key=lambda o: _head_layer(graph, o)):
        group = sorted(_node_ancestors(model, out) - placed)
        first.extend(group)
        placed.update(group)
    order = first + [i for i in range(n) if i not in placed]
    nodes = [model.graph.node[i] for i in order]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    new_graph, stats = build_layer_graph(model, name=graph.name, sha256=graph.sha256,
                                         granularity=graph.granularity)
    new_graph = with_rows(model, new_graph)
    log.info("exit heads: layers reordered so each head's branch follows its fork")
    return dataclasses.replace(prepared, model=model, graph=new_graph, stats=stats)


def measure_probabilities(prepared: PreparedModel, heads: Sequence[ir.ExitHead],
                          samples: Mapping[str, np.ndarray]) -> list[float]:
    """Conditional exit probability of each head (in layer order) on ``samples``: of the
    samples that reach a head (left at no earlier one), the share whose softmax confidence
    is at least its threshold; a head with a probability already keeps it."""
    from partitioner.analysis.sessions import open_session

    sess = open_session(prepared.model, None, prepared.base_dir)
    names = [h.output for h in heads]
    count = next(iter(samples.values())).shape[0]
    reached = [0] * len(heads)
    left = [0] * len(heads)
    for s in range(count):
        outs = sess.run(names, {k: v[s] for k, v in samples.items()})
        for k, (head, out) in enumerate(zip(heads, outs, strict=True)):
            reached[k] += 1
            rule = head.threshold
            taken = (confidence(out) >= rule) if rule is not None else False
            if taken:
                left[k] += 1
                break
    probs = []
    for k, head in enumerate(heads):
        if head.threshold is None:
            probs.append(head.probability)
        elif reached[k] == 0:
            log.warning("exit %s: no calibration sample reaches it; probability 0",
                        head.output)
            probs.append(0.0)
        else:
            probs.append(left[k] / reached[k])
    return probs


def resolve_exits(prepared: PreparedModel, specs: Sequence[ExitSpec | str],
                  calibration: str | Path | None = None
                  ) -> tuple[PreparedModel, tuple[ResolvedExit, ...]]:
    """Check the ``--exit`` heads against the model, order its layers, measure ``@T``.

    Returns:
        The model (its layers reordered when a head's branch did not follow its fork) and
        the heads in layer order, each with its probability.

    Raises:
        UserError: unknown output, a head that is the only main output, the same output
            twice, ``@T`` without ``--calibration``, a bad calibration file.
    """
    parsed = [parse_exit(s) if isinstance(s, str) else s for s in specs]
    if not parsed:
        return prepared, ()
    outputs = [t.name for t in prepared.graph.outputs]
    seen: set[str] = set()
    for spec in parsed:
        if spec.output not in outputs:
            fail(f"--exit {spec.output}: not a model output (outputs: {', '.join(outputs)})")
        if spec.output in seen:
            fail(f"--exit {spec.output}: given twice")
        seen.add(spec.output)
        if spec.threshold is not None and spec.probability is None and calibration is None:
            fail(f"--exit {spec.output}@{spec.threshold:g}: a threshold needs --calibration "
                 "FILE.npz to measure its exit probability")
    if len(seen) == len(outputs):
        fail("--exit: every model output is an exit head; the main output must stay one")
    prepared = _reordered(prepared, [s.output for s in parsed])
    graph = prepared.graph
    parsed.sort(key=lambda s: _head_layer(graph, s.output))
    heads = [ir.ExitHead(s.output, s.probability if s.probability is not None else 0.0,
                         s.threshold) for s in parsed]
    if any(s.probability is None for s in parsed):
        assert calibration is not None
        probs = measure_probabilities(prepared, heads, load_calibration(calibration, graph))
        probs = [p if s.probability is None else s.probability
                 for p, s in zip(probs, parsed, strict=True)]
        heads = [dataclasses.replace(h, probability=p) for h, p in zip(heads, probs,
                                                                         strict=True)]
    names = [s.output for s in parsed]
    resolved = []
    for head in heads:
        layer = _head_layer(graph, head.output)
        resolved.append(ResolvedExit(head, layer, branch_layers(graph, head.output, names)))
    return prepared, tuple(resolved)
