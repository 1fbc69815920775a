"""The min-max row split of one split arc, exactly (see :mod:`.spatial`'s docstring).

``costs[q][a, b]`` is what part ``[a, b]`` costs on device ``q`` (non-decreasing in ``b``,
non-increasing in ``a``); :func:`min_max_split` finds the least ``T`` such that at most
``max_parts`` parts, in the given device order, cover every row each within ``T``: the
frontier recursion decides a ``T`` exactly and bisection on ``T`` converges to a relative
1e-7.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["min_max_split"]

_REL = 1e-7


def min_max_split(costs: Sequence[np.ndarray], max_parts: int, floor: float = 0.0,
                  min_parts: int = 1) -> tuple[float, list[tuple[int, int, int]]] | None:
    """The least ``T`` and the parts ``(device index, a, b)`` (in the given order) that
    cover every row with at most ``max_parts`` parts, each costing at most ``T``.

    ``costs[q][a, b]`` is the cost of part ``[a, b]`` on device ``q``, non-decreasing in
    ``b`` and non-increasing in ``a`` (see the module docstring for why this is exact);
    ``floor`` is a known lower bound on ``T`` (it only saves bisection steps); at least
    ``min_parts`` parts are used (a split stage has two or more).
    """
    if not costs:
        return None
    h = costs[0].shape[0]
    n_parts = max(1, min(max_parts, len(costs)))
    if n_parts < min_parts:
        return None
    hi = min(float(c[0, h - 1]) for c in costs)
    found = _feasible(costs, n_parts, hi, min_parts) if math.isfinite(hi) else None
    if found is None:
        found = _feasible(costs, n_parts, math.inf, min_parts)
        if found is None:
            return None
    hi = max(float(costs[q][a, b]) for q, a, b in found)
    if not math.isfinite(hi):
        return None
    lo = min(max(floor, 0.0), hi)
    for _ in range(200):
        if hi - lo <= _REL * hi:
            break
        mid = 0.5 * (lo + hi)
        got = _feasible(costs, n_parts, mid, min_parts)
        if got is None:
            lo = mid
        else:
            found = got
            hi = max(float(costs[q][a, b]) for q, a, b in got)
    return hi, found


def _greedy(costs: Sequence[np.ndarray], limit: float) -> list[tuple[int, int, int]] | None:
    """:func:`_feasible` when every device may take a part: each takes the most rows it
    finishes within ``limit``, top to bottom."""
    h = costs[0].shape[0]
    a = 0
    parts = []
    for q, c in enumerate(costs):
        r = int(c[a, a:].searchsorted(limit, side="right"))
        if r:
            parts.append((q, a, a + r - 1))
            a += r
            if a == h:
                return parts
    return None


def _feasible(costs: Sequence[np.ndarray], n_parts: int, limit: float, min_parts: int = 1
              ) -> list[tuple[int, int, int]] | None:
    """Parts (at least ``min_parts``) covering every row within ``limit``, or None (the
    frontier recursion; ``F[k][m]`` is the furthest row exactly ``m`` parts reach)."""
    if n_parts >= len(costs):
        got = _greedy(costs, limit)
        if got is None or len(got) >= min_parts:
            return got
        # the greedy used fewer parts than required: the exact recursion decides
    h = costs[0].shape[0]
    frontier = [-1] * (n_parts + 1)
    frontier[0] = 0
    history: list[list[int]] = []
    for c in costs:
        nxt = list(frontier)
        for m in range(1, n_parts + 1):
            a = frontier[m - 1]
            if a < 0 or a >= h:
                continue
            r = int(c[a, a:].searchsorted(limit, side="right"))
            # leave a row for every further part that min_parts still requires
            end = min(a + r, h - max(0, min_parts - m))
            if end > a and end > nxt[m]:
                nxt[m] = end
        history.append(frontier)
        frontier = nxt
    best_m = next((m for m in range(max(1, min_parts), n_parts + 1) if frontier[m] == h),
                  None)
    if best_m is None:
        return None
    parts: list[tuple[int, int, int]] = []
    m, end = best_m, h
    for q in range(len(costs) - 1, -1, -1):
        before = history[q]
        if before[m] == end:
            continue  # device q is not used for this prefix
        a = before[m - 1]
        parts.append((q, a, end - 1))
        m, end = m - 1, a
        if end == 0:
            break
    parts.reverse()
    return parts
