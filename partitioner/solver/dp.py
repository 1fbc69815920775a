"""Exact dynamic programs over runs for the objectives that need no integer program.

Without caps and with memories that hold any placement, the only thing that couples the
choices along the chain is *one frequency per device* (FreDDI). For every frequency
vector ``phi`` (one label per device, ``prod_d F_d`` of them, all handled at once as one
numpy axis) a linear objective is a shortest path over runs:

    V[phi, d, j] = min_i  A[phi, d, i] + run[d, phi_d, i, j]          (run i..j on d)
    A[phi, d, i] = min_{d' != d}  V[phi, d', i - 1] + cut[i - 1, d', d]   (A[., ., 0] = 0)

and the optimum is the least ``V[phi, d, n - 1]`` over ``phi`` and ``d``; a plan consistent
with its ``phi`` always exists, so the minimum over every ``phi`` is the minimum over every
plan. Costs may be lexicographic pairs ``(primary, secondary)`` (the energy objective:
least edge energy, then least latency): the lexicographic order is compatible with
addition, so Bellman's principle holds for it too; primaries within a relative 1e-9 of
the least count as equal, as in the integer program. ``O(n^2 D^2 prod F)`` operations.
:mod:`.bottleneck` solves the min-max objective over the same arrays.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from partitioner.solver.runs import RunArrays

__all__ = ["Costs", "Chosen", "phi_vectors", "linear_dp", "linear_dp_batch", "plan_of_runs",
           "MAX_PHI"]

#: The most frequency vectors the programs enumerate; beyond, the integer program runs.
MAX_PHI = 2048

Costs = tuple[np.ndarray, np.ndarray]  # run costs (D, F, n, n), cut costs (n - 1, D, D)
Chosen = tuple[tuple[str, ...], dict[str, str | None]]
Runs = list[tuple[int, int, int]]  # (first, last, device index)


def phi_vectors(arrays: RunArrays) -> np.ndarray:
    """Every frequency vector: ``(P, D)`` frequency indices."""
    return np.array(list(itertools.product(*(range(len(f)) for f in arrays.freqs))),
                    dtype=int).reshape(-1, len(arrays.devices))


def _tol(v: np.ndarray) -> np.ndarray:
    return 1e-9 * np.abs(v) + 1e-15


def _lexmin(first: np.ndarray, second: np.ndarray | None, axis: int
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Lexicographic minimum along ``axis``: values and the index that reaches them."""
    if second is None:
        idx = np.argmin(first, axis=axis)
        return np.take_along_axis(first, np.expand_dims(idx, axis), axis).squeeze(axis), \
            None, idx
    low = np.min(first, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore"):
        tie = first <= low + _tol(low)
    masked = np.where(tie & np.isfinite(first), second, math.inf)
    idx = np.argmin(masked, axis=axis)
    # No finite candidate at all: fall back to the primary's argmin (an infinite value).
    none = ~np.isfinite(np.take_along_axis(first, np.expand_dims(idx, axis), axis)
                        ).squeeze(axis)
    idx = np.where(none, np.argmin(first, axis=axis), idx)
    take = np.expand_dims(idx, axis)
    return (np.take_along_axis(first, take, axis).squeeze(axis),
            np.take_along_axis(second, take, axis).squeeze(axis), idx)


def linear_dp(arrays: RunArrays, costs: list[Costs]) -> tuple[list[float], Chosen] | None:
    """The least plan for ``costs`` (one or two lexicographic components), or None.

    Returns:
        The objective components of the optimum and its placement and frequencies.
    """
    batched = [(run[None], cut[None]) for run, cut in costs]
    return linear_dp_batch(arrays, batched)[0]


def linear_dp_batch(arrays: RunArrays, costs: list[Costs]
                    ) -> list[tuple[list[float], Chosen] | None]:
    """:func:`linear_dp` for a batch of cost sets at once (one numpy pass).

    Each component is ``(run (K, D, F, n, n), cut (K, n - 1, D, D))``; returns the ``K``
    optima (the weighted objective's four normalising bounds are one such batch).
    """
    n, n_dev = arrays.n, len(arrays.devices)
    phi = phi_vectors(arrays)
    n_phi = len(phi)
    dev = np.arange(n_dev)[None, :]
    n_batch = costs[0][0].shape[0]
    two = len(costs) == 2
    run1, cut1 = costs[0]
    run2, cut2 = costs[1] if two else (None, None)
    shape = (n_batch, n_phi, n_dev, n)
    v1 = np.full(shape, math.inf)
    v2 = np.full(shape, math.inf) if two else None
    a1 = np.full(shape, math.inf)
    a2 = np.full(shape, math.inf) if two else None
    a1[..., 0] = 0.0
    if a2 is not None:
        a2[..., 0] = 0.0
    best_i = np.zeros(shape, dtype=int)
    best_from = np.zeros(shape, dtype=int)
    not_self = np.where(np.eye(n_dev, dtype=bool), math.inf, 0.0)
    for j in range(n):
        if j > 0:
            # A[phi, d, j] = min over d' != d of V[phi, d', j - 1] + cut[j - 1, d', d]
            c1 = v1[..., j - 1, None] + (cut1[:, j - 1] + not_self)[:, None]
            c2 = None
            if two:
                assert v2 is not None and cut2 is not None
                c2 = v2[..., j - 1, None] + cut2[:, j - 1][:, None]
            m1, m2, arg = _lexmin(c1, c2, axis=2)
            a1[..., j] = m1
            if a2 is not None and m2 is not None:
                a2[..., j] = m2
            best_from[..., j] = arg
        r1 = a1[..., :j + 1] + run1[..., j][:, dev, phi, :j + 1]  # (K, P, D, j + 1)
        r2 = None
        if two:
            assert run2 is not None and a2 is not None
            r2 = a2[..., :j + 1] + run2[..., j][:, dev, phi, :j + 1]
        m1, m2, arg = _lexmin(r1, r2, axis=3)
        v1[..., j] = m1
        if v2 is not None and m2 is not None:
            v2[..., j] = m2
        best_i[..., j] = arg
    out: list[tuple[list[float], Chosen] | None] = []
    for k in range(n_batch):
        flat1 = v1[k, :, :, n - 1].reshape(-1)
        flat2 = v2[k, :, :, n - 1].reshape(-1) if v2 is not None else None
        m1, m2, arg = _lexmin(flat1[None], None if flat2 is None else flat2[None], axis=1)
        if not np.isfinite(m1[0]):
            out.append(None)
            continue
        p, d = divmod(int(arg[0]), n_dev)
        runs: Runs = []
        j = n - 1
        while j >= 0:
            i = int(best_i[k, p, d, j])
            runs.append((i, j, d))
            if i == 0:
                break
            d, j = int(best_from[k, p, d, i]), i - 1
        values = [float(m1[0])] + ([float(m2[0])] if m2 is not None else [])
        out.append((values, plan_of_runs(arrays, runs[::-1], phi[p])))
    return out


def plan_of_runs(arrays: RunArrays, runs: Runs, phi: np.ndarray) -> Chosen:
    """Placement and frequencies of a sequence of runs under frequency vector ``phi``."""
    placement: list[str] = []
    freqs: dict[str, str | None] = {}
    for i, j, d in runs:
        name = arrays.devices[d]
        placement.extend([name] * (j - i + 1))
        freqs[name] = arrays.freqs[d][int(phi[d])]
    return tuple(placement), freqs
