"""The stage graph of a routed plan as manifest entries: every unit's ``sends``, the
bundle's ``input_sends``, and the routing fields of each stage's tensors.

Routing itself is :mod:`partitioner.analysis.routing` (computed once); this module only
writes its messages down in the bundle schema (:mod:`stagebundle.manifest`):

* each message of :func:`~partitioner.analysis.routing.messages` becomes one ``Send``
  of its sender (the source's go to ``input_sends``);
* a stage's (or part's) inputs name ``from`` (the producing stage, or ``"input"``) and
  ``transfer`` (the route's rule); its outputs list ``to``;
* a tensor a whole stage sends without reading or producing it is listed in its
  ``forward`` (a forwarded route relaying through it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from partitioner.analysis.routing import Message
from partitioner.backend.manifest import INPUT, Piece, Send, TensorSpec
from partitioner.errors import InternalError
from partitioner.ir import Route, TensorInfo

__all__ = ["UnitFiles", "spec", "sends_of", "input_sends", "tensor_specs", "forwarded_specs",
           "transfer_kind", "check_reads"]

Rows = tuple[int, int]


@dataclass(frozen=True)
class UnitFiles:
    """What a unit's ONNX file reads and makes: full tensors, each with the rows of it
    the unit holds (None: whole)."""

    inputs: tuple[tuple[TensorInfo, Rows | None], ...]
    outputs: tuple[tuple[TensorInfo, Rows | None], ...]


def spec(t: TensorInfo, rows: Rows | None = None, **kw: object) -> TensorSpec:
    """A manifest tensor; with ``rows``, its shape is the sliced one (height axis 2)."""
    shape = list(t.shape)
    if rows is not None:
        shape[2] = rows[1] - rows[0] + 1
    return TensorSpec(t.name, tuple(shape), t.dtype, rows=rows, **kw)  # type: ignore[arg-type]


def sends_of(msgs: Sequence[Message], key: str) -> tuple[Send, ...]:
    """The sends of unit ``key`` (``"input"``: the source)."""
    return tuple(Send(m.receiver, tuple(Piece(n, r) for n, r in m.pieces))
                 for m in msgs if m.sender == key)


def input_sends(msgs: Sequence[Message]) -> tuple[Send, ...]:
    return sends_of(msgs, INPUT)


def tensor_specs(files: UnitFiles, routes: Mapping[str, Route]
                 ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """A unit's inputs (with ``from`` and ``transfer``) and outputs (with ``to``)."""
    ins = []
    for t, rows in files.inputs:
        r = routes.get(t.name)
        if r is None:
            raise InternalError(f"tensor {t.name!r} enters a stage but has no route")
        ins.append(spec(t, rows, source=r.source, transfer=r.transfer))
    outs = []
    for t, rows in files.outputs:
        r = routes.get(t.name)
        outs.append(spec(t, rows, targets=r.targets if r is not None else ()))
    return tuple(ins), tuple(outs)


def forwarded_specs(msgs: Sequence[Message], key: str, files: UnitFiles,
                    routes: Mapping[str, Route], infos: Mapping[str, TensorInfo]
                    ) -> tuple[TensorSpec, ...]:
    """Tensors unit ``key`` sends that its file neither reads nor makes (it relays them)."""
    own = {t.name for t, _ in (*files.inputs, *files.outputs)}
    names: dict[str, None] = {}
    for m in msgs:
        if m.sender == key:
            names.update((n, None) for n, _ in m.pieces if n not in own)
    return tuple(spec(infos[n], source=routes[n].source, targets=routes[n].targets,
                      transfer=routes[n].transfer) for n in names)


def transfer_kind(routes: Sequence[Route]) -> str:
    """The bundle's top-level ``transfer``: direct, forwarded, or mixed."""
    kinds = {r.transfer for r in routes}
    if len(kinds) == 2:
        return "mixed"
    return kinds.pop() if kinds else "direct"


def check_reads(stage: int, files: UnitFiles, reads: set[str]) -> None:
    """The stage file reads exactly what the routes deliver to the stage."""
    got = {t.name for t, _ in files.inputs}
    if got != reads:
        raise InternalError(f"stage {stage}: its file reads {sorted(got)} but the layer "
                            f"graph routes {sorted(reads)} to it")
