"""Weight memory of a set of positions on one device, shared initialisers held once.

A position's ``weight_bytes`` counts every initialiser it reads; an initialiser read by
several positions (tied embeddings, unrolled recurrent cells, re-used convolutions) is
held once by a device that runs any of them (SPEC §4 memory, issue 15). So the memory
of positions ``K`` on a device is ``sum_{k in K} own_k + sum_{s in S(K)} size_s``, where
``S(K)`` are the shared initialisers ``K`` reads and ``own_k`` is what position ``k``
holds besides them (``weight_bytes`` minus its shared initialisers' sizes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from partitioner import ir

__all__ = ["shared_weights", "own_bytes", "memory_of", "placement_memory"]


def shared_weights(table: ir.CostTable) -> dict[str, list[int]]:
    """Initialisers of known size read by two or more positions -> those positions."""
    readers: dict[str, list[int]] = {}
    for k, p in enumerate(table.positions):
        for s in dict.fromkeys(p.weights):
            if s in table.weight_sizes:
                readers.setdefault(s, []).append(k)
    return {s: ks for s, ks in readers.items() if len(ks) > 1}


def own_bytes(table: ir.CostTable, shared: Iterable[str] | None = None) -> list[float]:
    """Per position, the bytes it holds besides the shared initialisers."""
    names = set(shared_weights(table) if shared is None else shared)
    out = []
    for p in table.positions:
        mine = sum(table.weight_sizes[s] for s in dict.fromkeys(p.weights) if s in names)
        out.append(float(max(p.weight_bytes - mine, 0)))
    return out


def memory_of(table: ir.CostTable, positions: Iterable[int]) -> float:
    """Bytes a device holds when it runs ``positions``."""
    shared = shared_weights(table)
    own = own_bytes(table, shared)
    ks = list(positions)
    held = {s for k in ks for s in table.positions[k].weights if s in shared}
    return sum(own[k] for k in ks) + sum(float(table.weight_sizes[s]) for s in held)


def placement_memory(table: ir.CostTable, placement: Sequence[str]) -> dict[str, float]:
    """Bytes each used device holds under ``placement``."""
    by_dev: dict[str, list[int]] = {}
    for k, d in enumerate(placement):
        by_dev.setdefault(d, []).append(k)
    return {d: memory_of(table, ks) for d, ks in by_dev.items()}
