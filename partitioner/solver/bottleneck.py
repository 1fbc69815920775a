"""The throughput objective exactly, without an integer program: labels over runs.

Least bottleneck ``B = max_d busy_d`` (DISTREDGE), then least latency among the plans
that reach it. The min-max relaxation of the integer program is weak (its LP spreads one
unit of flow over several paths), so this is a label-setting search over the same runs
as :mod:`.dp`, pruned by bounds:

* a *label* at node ``(j, d)`` (a run ended at position ``j`` on device ``d``) holds the
  busy vector so far, the latency so far and the frequency of every device used so far;
* label ``a`` dominates ``b`` at the same node when ``busy_a <= busy_b`` componentwise,
  ``latency_a <= latency_b`` and every frequency ``a`` has fixed is also ``b``'s (``a``
  is free where ``b`` is not): no completion of ``b`` is better than the same of ``a``;
* an upper bound ``U`` comes from plans that minimise a weighted sum ``lam . busy``
  (exact linear programs of :mod:`.dp`, weights by multiplicative updates); a label is
  dropped when ``max busy > U`` or when ``lam . busy + g_lam(j, d) > U`` for one of those
  weight vectors, ``g_lam`` being the least weighted busy time of any completion (a
  backward shortest path that lets every run pick its frequency freely: a relaxation).
  Since ``lam`` sums to 1, ``lam . busy`` never exceeds ``max busy``: nothing wanted is cut.

Every surviving complete label is a feasible plan; the best one is optimal.
"""

from __future__ import annotations

import math
import time

import numpy as np

from partitioner.solver.dp import Chosen, linear_dp, plan_of_runs
from partitioner.solver.runs import RunArrays

__all__ = ["least_bottleneck", "busy_of_plan", "OutOfTime", "pareto", "fastest_only"]

_TOL = 1e-9
_BEAM = 3  # labels per node of the heuristic search that sets the cap


def busy_of_plan(arrays: RunArrays, chosen: Chosen) -> np.ndarray:
    """Busy time per device of a plan, from the run arrays."""
    placement, freqs = chosen
    dev = {d: k for k, d in enumerate(arrays.devices)}
    busy = np.zeros(len(arrays.devices))
    n = len(placement)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and placement[j + 1] == placement[i]:
            j += 1
        k = dev[placement[i]]
        f = arrays.freqs[k].index(freqs.get(placement[i]))
        busy[k] += arrays.time[k, f, i, j]
        if j + 1 < n:
            busy[k] += arrays.cut_time[j, k, dev[placement[j + 1]]]
        i = j + 1
    return busy


def _weighted(arrays: RunArrays, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    run = arrays.time * lam[:, None, None, None]
    cut = arrays.cut_time * lam[None, :, None]
    return run, cut


def _bounds(arrays: RunArrays, rounds: int
            ) -> tuple[float, float, Chosen | None, list[np.ndarray]]:
    """Lower and upper bounds on the least bottleneck, and the weights tried.

    For weights ``lam`` that sum to 1, ``min_x lam . busy(x) <= lam . busy(x*) <= B*``: each
    exact linear program gives a lower bound, and its plan's bottleneck an upper one.
    """
    n_dev = len(arrays.devices)
    lam = np.full(n_dev, 1.0 / n_dev)
    best_b = math.inf
    best: Chosen | None = None
    lower = 0.0
    tried = []
    for r in range(rounds):
        tried.append(lam.copy())
        out = linear_dp(arrays, [_weighted(arrays, lam)])
        if out is None:
            break
        lower = max(lower, out[0][0])
        chosen = out[1]
        busy = busy_of_plan(arrays, chosen)
        b = float(busy.max())
        if b < best_b:
            best, best_b = chosen, b
        if b <= 0:
            break
        lam = lam * np.exp(2.0 / math.sqrt(r + 1) * (busy / b - 1.0))
        lam = lam / lam.sum()
    return lower, best_b, best, tried


def _completion(arrays: RunArrays, lam: np.ndarray) -> np.ndarray:
    """``g[j, d]``: least ``lam``-weighted busy time after a run that ends at ``j`` on d."""
    n, n_dev = arrays.n, len(arrays.devices)
    fastest = np.min(arrays.time, axis=1) * lam[:, None, None]  # (D, n, n), free f
    g = np.full((n, n_dev), math.inf)
    g[n - 1] = 0.0
    h = np.full((n_dev, n), math.inf)  # h[d, i]: least from a run starting at i on d
    for i in range(n - 1, 0, -1):
        h[:, i] = np.min(fastest[:, i, i:] + g[i:].T, axis=1)
        sent = arrays.cut_time[i - 1] * lam[:, None] + h[None, :, i]  # (d, d')
        np.fill_diagonal(sent, math.inf)
        g[i - 1] = np.min(sent, axis=1)
    return g


def pareto(b: np.ndarray, lat: np.ndarray, fc: np.ndarray) -> np.ndarray:
    """Indices of labels that together dominate every label (see the module docstring).

    Labels are taken in order of (total busy, latency): a dominator never comes later,
    up to equal labels, of which the first is kept. Each chunk is compared with the
    front kept so far and with its own earlier rows (a dominated dominator's own
    dominator comes earlier still, so the removal stays sound).
    """
    m = len(lat)
    if m <= 1:
        return np.arange(m)
    order = np.lexsort((lat, b.sum(axis=1)))
    b, lat, fc = b[order], lat[order], fc[order]
    kept: list[np.ndarray] = []
    fb = np.zeros((0, b.shape[1]))
    fl = np.zeros(0)
    ff = np.zeros((0, fc.shape[1]), dtype=fc.dtype)
    step = 128
    for start in range(0, m, step):
        rows = slice(start, min(start + step, m))
        cb, cl, cf = b[rows], lat[rows], fc[rows]
        out = np.zeros(len(cl), dtype=bool)
        if len(fl):
            out = np.any(np.all(fb[None, :, :] <= cb[:, None, :], axis=2)
                         & (fl[None, :] <= cl[:, None])
                         & np.all((ff[None, :, :] == -1) | (ff[None, :, :] == cf[:, None, :]),
                                  axis=2), axis=1)
        inner = (np.all(cb[None, :, :] <= cb[:, None, :], axis=2)
                 & (cl[None, :] <= cl[:, None])
                 & np.all((cf[None, :, :] == -1) | (cf[None, :, :] == cf[:, None, :]), axis=2))
        inner &= np.tri(len(cl), k=-1, dtype=bool)  # only earlier rows dominate
        out |= inner.any(axis=1)
        keep = np.nonzero(~out)[0]
        kept.append(keep + start)
        fb = np.concatenate([fb, cb[keep]])
        fl = np.concatenate([fl, cl[keep]])
        ff = np.concatenate([ff, cf[keep]])
    return order[np.concatenate(kept)]


class _Labels:
    """Accepted labels: busy, latency, frequencies, and how each was reached."""

    def __init__(self, n_dev: int) -> None:
        self.busy = np.zeros((0, n_dev))
        self.lat = np.zeros(0)
        self.fc = np.zeros((0, n_dev), dtype=int)
        self.end = np.zeros(0, dtype=int)
        self.dev = np.zeros(0, dtype=int)
        self.parent = np.zeros(0, dtype=int)
        self.start = np.zeros(0, dtype=int)

    def add(self, busy: np.ndarray, lat: np.ndarray, fc: np.ndarray, end: int, dev: int,
            parent: np.ndarray, start: np.ndarray) -> None:
        k = len(lat)
        self.busy = np.concatenate([self.busy, busy])
        self.lat = np.concatenate([self.lat, lat])
        self.fc = np.concatenate([self.fc, fc])
        self.end = np.concatenate([self.end, np.full(k, end)])
        self.dev = np.concatenate([self.dev, np.full(k, dev)])
        self.parent = np.concatenate([self.parent, parent])
        self.start = np.concatenate([self.start, start])


class OutOfTime(Exception):
    """The deadline passed; ``best`` is the best plan known (not proven optimal)."""

    def __init__(self, best: Chosen | None) -> None:
        super().__init__("time limit")
        self.best = best


def fastest_only(arrays: RunArrays) -> RunArrays:
    """The same arrays without the frequencies another one beats on every run.

    Busy times and latency depend on a device's frequency only through its runs' times
    (transfers do not): if ``f'`` is no slower than ``f`` on every run ``f`` can price,
    moving a plan's device from ``f`` to ``f'`` raises no busy time and no latency, so a
    throughput optimum exists without ``f``. Labels that differ only in such a frequency
    would otherwise all survive the dominance test (incompatible frequencies).
    """
    n_dev, n_f = arrays.time.shape[:2]
    keep: list[list[int]] = []
    for d in range(n_dev):
        mine = []
        for f in range(len(arrays.freqs[d])):
            finite = np.isfinite(arrays.time[d, f])
            beaten = False
            for g in range(len(arrays.freqs[d])):
                if g == f:
                    continue
                le = np.all(arrays.time[d, g][finite] <= arrays.time[d, f][finite])
                # equal everywhere: keep the first of them only
                if le and (g < f or np.any(arrays.time[d, g][finite] < arrays.time[d, f][finite])):
                    beaten = True
                    break
            if not beaten:
                mine.append(f)
        keep.append(mine)
    if all(len(k) == len(arrays.freqs[d]) for d, k in enumerate(keep)):
        return arrays
    width = max(len(k) for k in keep)
    time_ = np.full((n_dev, width) + arrays.time.shape[2:], math.inf)
    energy = np.full_like(time_, math.inf)
    for d, k in enumerate(keep):
        time_[d, :len(k)] = arrays.time[d, k]
        energy[d, :len(k)] = arrays.energy[d, k]
    freqs = tuple(tuple(arrays.freqs[d][f] for f in k) for d, k in enumerate(keep))
    return RunArrays(arrays.devices, freqs, time_, energy, arrays.cut_time, arrays.cut_send,
                     arrays.cut_recv)


def least_bottleneck(arrays: RunArrays, rounds: int = 8, deadline: float | None = None
                     ) -> tuple[float, Chosen] | None:
    """The plan with the least bottleneck, then the least latency; None if none exists.

    Raises:
        OutOfTime: ``deadline`` (a ``time.perf_counter()`` value) passed first.

    A search with a cap ``tau`` on every busy time keeps every plan within the cap (up to
    dominance), so its best plan is optimal once ``tau`` is at least the optimum; the
    larger the cap, the more labels survive. The cap is the bottleneck of a plan found
    by the same search with a beam (a few labels per node, the least bounds): on random
    60-layer tables that plan was optimal in most cases and within 6 % otherwise, where
    climbing from the Lagrangian lower bound (30 % under the optimum there) took ~8
    searches, the last ones as expensive as the final one.
    """
    arrays = fastest_only(arrays)
    _, upper, best, lams = _bounds(arrays, rounds)
    if not math.isfinite(upper):
        return None
    bounds = [(lam, _completion(arrays, lam)) for lam in lams]
    heuristic = _search(arrays, upper * (1 + _TOL) + 1e-15, bounds, deadline, beam=_BEAM)
    if deadline is not None and time.perf_counter() > deadline:
        raise OutOfTime(best)
    if heuristic is not None and heuristic[0] < upper:
        upper, best = heuristic
    found = _search(arrays, upper * (1 + _TOL) + 1e-15, bounds, deadline)
    if found is None and deadline is not None and time.perf_counter() > deadline:
        raise OutOfTime(best)
    return found  # a plan within the cap exists, so the search finds the best


def _search(arrays: RunArrays, limit: float, bounds: list[tuple[np.ndarray, np.ndarray]],
            deadline: float | None = None, beam: int | None = None
            ) -> tuple[float, Chosen] | None:
    """Every plan whose busy times stay within ``limit``, kept up to dominance: the best.

    With ``beam``, only that many labels with the least bounds survive at each node: a
    heuristic (a good plan fast, no proof), used for the upper bound.

    Returns None (no plan) as soon as ``deadline`` passes; the caller checks the clock.
    """
    n, n_dev = arrays.n, len(arrays.devices)
    labels = _Labels(n_dev)
    for j in range(n):
        if deadline is not None and time.perf_counter() > deadline:
            return None
        for d in range(n_dev):
            cand_b, cand_l, cand_f, cand_p, cand_s = [], [], [], [], []
            for f in range(len(arrays.freqs[d])):
                # a first run 0..j on d
                r0 = arrays.time[d, f, 0, j]
                if math.isfinite(r0):
                    b = np.zeros((1, n_dev))
                    b[0, d] = r0
                    fc = np.full((1, n_dev), -1)
                    fc[0, d] = f
                    cand_b.append(b)
                    cand_l.append(np.array([r0]))
                    cand_f.append(fc)
                    cand_p.append(np.array([-1]))
                    cand_s.append(np.array([0]))
            src = np.nonzero((labels.end < j) & (labels.dev != d))[0] if len(labels.lat) \
                else np.zeros(0, dtype=int)
            if len(src):
                k = labels.end[src]
                sender = labels.dev[src]
                cut = arrays.cut_time[k, sender, d]
                for f in range(len(arrays.freqs[d])):
                    run = arrays.time[d, f, k + 1, j]
                    ok = np.isfinite(cut) & np.isfinite(run) & (
                        (labels.fc[src, d] == -1) | (labels.fc[src, d] == f))
                    if not ok.any():
                        continue
                    s = src[ok]
                    b = labels.busy[s].copy()
                    b[np.arange(len(s)), sender[ok]] += cut[ok]
                    b[:, d] += run[ok]
                    fc = labels.fc[s].copy()
                    fc[:, d] = f
                    cand_b.append(b)
                    cand_l.append(labels.lat[s] + cut[ok] + run[ok])
                    cand_f.append(fc)
                    cand_p.append(s)
                    cand_s.append(k[ok] + 1)
            if not cand_b:
                continue
            b = np.concatenate(cand_b)
            bound = b.max(axis=1)
            for lam, g in bounds:
                bound = np.maximum(bound, b @ lam + g[j, d])
            keep = bound <= limit
            if beam is not None and keep.sum() > 4 * beam:
                # heuristic only: the least bounds first, the rest never compared
                keep[np.argsort(np.where(keep, bound, math.inf), kind="stable")[4 * beam:]] = False
            if not keep.any():
                continue
            lat = np.concatenate(cand_l)[keep]
            fc = np.concatenate(cand_f)[keep]
            par = np.concatenate(cand_p)[keep]
            st = np.concatenate(cand_s)[keep]
            b = b[keep]
            front = pareto(b, lat, fc)
            if beam is not None and len(front) > beam:
                front = front[np.argsort(bound[keep][front], kind="stable")[:beam]]
            labels.add(b[front], lat[front], fc[front], j, d, par[front], st[front])
    done = np.nonzero(labels.end == n - 1)[0]
    if not len(done):
        return None
    worst = labels.busy[done].max(axis=1)
    least = worst.min()
    ties = done[worst <= least * (1 + _TOL) + 1e-15]
    pick = int(ties[np.argmin(labels.lat[ties])])
    runs = []
    at = pick
    while at >= 0:
        runs.append((int(labels.start[at]), int(labels.end[at]), int(labels.dev[at])))
        at = int(labels.parent[at])
    fc = labels.fc[pick]
    phi = np.where(fc >= 0, fc, 0)
    placement, freqs = plan_of_runs(arrays, runs[::-1], phi)
    return float(labels.busy[pick].max()), (placement, freqs)
