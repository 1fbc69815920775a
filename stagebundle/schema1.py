"""Schema-1 manifests (a chain of stages) read as the stage graph they imply.

Part of the bundle schema: :meth:`stagebundle.manifest.Bundle.from_json` calls
:func:`upgrade_chain` for a manifest of schema version 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from stagebundle.manifest import OUTPUT, Bundle, Piece, Send, StageSpec, unit_key

__all__ = ["upgrade_chain"]


def upgrade_chain(bundle: Bundle) -> Bundle:
    """A schema-1 bundle with the sends its chain semantics imply.

    Schema 1: the source sends the model inputs to stage 0; stage ``i`` sends every tensor
    it has (received or produced) that a later stage reads or that is a model output to
    stage ``i + 1``; the last stage sends the model outputs to the destination.
    """
    stages = bundle.stages
    needed_after: list[set[str]] = []
    need = {t.name for t in bundle.outputs}
    for s in reversed(stages):
        needed_after.append(set(need))
        need |= {t.name for t in s.inputs}
    needed_after.reverse()
    have = {t.name for t in bundle.inputs}
    input_sends = (Send(unit_key(0), tuple(Piece(t.name) for t in bundle.inputs
                                           if t.name in need)),)
    out: list[StageSpec] = []
    for i, s in enumerate(stages):
        have |= {t.name for t in s.outputs}
        target = unit_key(i + 1) if i + 1 < len(stages) else OUTPUT
        carry = [n for n in _ordered(bundle, s) if n in have and n in needed_after[i]]
        out.append(replace(s, sends=(Send(target, tuple(Piece(n) for n in carry)),)))
    return replace(bundle, stages=tuple(out), input_sends=input_sends)


def _ordered(bundle: Bundle, stage: StageSpec) -> Sequence[str]:
    """Names a stage may hold, in a deterministic order (inputs, received, produced)."""
    names = [t.name for t in bundle.inputs] + [t.name for t in stage.inputs]
    names += [t.name for t in stage.forward] + [t.name for t in stage.outputs]
    return list(dict.fromkeys(names))
