"""The carbon objective exactly, without an integer program: Dinkelbach over run DPs.

CADI over N devices (SPEC §4, :func:`partitioner.analysis.estimate.evaluate`): with
``B`` the bottleneck, ``I = U / B`` inferences and hold time ``B - busy_d``,

    carbon / U = sum_{d used} C_d (E_d + P_d (B - busy_d)) / B = N(x) / B(x) + K(S(x)),

``N = sum_d C_d (E_d - P_d busy_d)`` (additive over runs and cuts, any sign),
``K(S) = sum_{d in S} C_d P_d`` over the set ``S`` of used devices. A *frequency vector*
``phi`` here gives every device a frequency or "unused" (which forbids it), so it fixes
``K_phi``; a plan under ``phi`` that leaves a device idle is charged at least its true
carbon, and the plan under its own exact ``phi`` is charged exactly, so
``min_phi min_{x ~ phi} (N + K_phi B) / B`` is the optimum.

Dinkelbach with the best known ratio ``q`` (a real plan's carbon / U):
``F_phi(q) = min_{x ~ phi} N(x) + (K_phi - q) B(x)``; ``F_phi(q) >= 0`` proves that no
plan under ``phi`` beats ``q``, and since ``F_phi`` only grows as ``q`` falls, ``phi`` is
dropped for good. With ``c = K_phi - q``:

* ``c <= 0``: ``c max_e busy_e = min_e c busy_e``, so ``F_phi`` is the least of ``D``
  linear programs (one per bottleneck device ``e``), solved exactly by one batched DP;
* ``c > 0``: ``c B >= c lam . busy`` for every ``lam`` in the simplex, so each linear
  program with such a ``lam`` gives a lower bound (``lam`` is adapted per ``phi``, as a
  Lagrangian dual ascent); if the bounds cannot decide, :func:`least_carbon` gives up and
  the caller runs the integer program (still exact, just slow).

Every plan the programs return is priced exactly; the best one's ratio is the next ``q``.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from partitioner import ir
from partitioner.solver.bottleneck import pareto
from partitioner.solver.dp import Chosen, linear_dp, plan_of_runs
from partitioner.solver.runs import RunArrays

__all__ = ["least_carbon", "carbon_applies", "MAX_PHI_CARBON"]

#: The most (frequency or unused)-vectors enumerated; beyond, the integer program runs.
MAX_PHI_CARBON = 2048
_ROUNDS = 60  # Dinkelbach steps plus dual-ascent steps, at most
_ASCENT = 4  # dual-ascent rounds without a new plan before the label searches
_LABEL_MAX = 16  # the most undecided vectors settled by label searches


def carbon_applies(table: ir.CostTable) -> bool:
    """Whether the vectors are few enough and the model's constants have the usual sign."""
    n_phi = math.prod(len(table.frequencies.get(d, (None,))) + 1 for d in table.device_names)
    if n_phi > MAX_PHI_CARBON:
        return False
    return all((d.carbon_intensity or 0.0) >= 0 and (d.idle_power or 0.0) >= 0
               for d in table.system.devices)


class _Model:
    """``N`` and busy contributions of every run and cut, and the ``phi`` vectors."""

    def __init__(self, table: ir.CostTable, arrays: RunArrays) -> None:
        devs = {d.name: d for d in table.system.devices}
        c = np.array([devs[n].carbon_intensity or 0.0 for n in arrays.devices])
        p = np.array([devs[n].idle_power or 0.0 for n in arrays.devices])
        self.weight = c * p  # w_d = C_d P_d: K(S) = sum_{d in S} w_d
        n_dev, n_f, n, _ = arrays.time.shape
        self.n, self.n_dev = n, n_dev
        unused = np.array([len(f) for f in arrays.freqs])
        # One more frequency slot per device: "unused" (never finite).
        time = np.full((n_dev, n_f + 1, n, n), math.inf)
        time[:, :n_f] = arrays.time
        energy = np.full_like(time, math.inf)
        energy[:, :n_f] = arrays.energy
        fin = np.isfinite(time) & np.isfinite(energy)
        self.run_t = np.where(fin, time, 0.0)
        self.run_n = np.where(fin, c[:, None, None, None] * (energy - p[:, None, None, None]
                                                             * np.where(fin, time, 0.0)),
                              math.inf)
        cfin = np.isfinite(arrays.cut_time)
        self.cut_t = np.where(cfin, arrays.cut_time, 0.0)
        cut_n = (c[None, :, None] * (arrays.cut_send - p[None, :, None] * self.cut_t)
                 + c[None, None, :] * arrays.cut_recv)
        eye = np.eye(n_dev, dtype=bool)[None]
        self.cut_n = np.where(cfin & ~eye, cut_n, math.inf)
        self.phi = np.array(list(itertools.product(*(range(u + 1) for u in unused))),
                            dtype=int).reshape(-1, n_dev)
        self.uses = self.phi != unused[None, :]  # (P, D)
        self.k_phi = self.uses.astype(float) @ self.weight

    def dp(self, lam: np.ndarray, phis: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                      np.ndarray]:
        """``min_x N(x) + lam[k, p] . busy(x)`` for every batch ``k`` and vector ``p``.

        Returns the values ``(K, P)``, each optimum's ``N`` ``(K, P)`` and busy vector
        ``(K, P, D)``, and the pointers ``(best_i, best_from, end)`` to rebuild its runs.
        """
        n, n_dev = self.n, self.n_dev
        phi = self.phi[phis]
        n_k, n_p = lam.shape[0], len(phis)
        dev = np.arange(n_dev)[None, :]
        shape = (n_k, n_p, n_dev, n)
        v = np.full(shape, math.inf)
        a = np.full(shape, math.inf)
        a[..., 0] = 0.0
        best_i = np.zeros(shape, dtype=np.int32)
        best_from = np.zeros(shape, dtype=np.int32)
        for j in range(n):
            if j > 0:
                cost = (self.cut_n[j - 1][None, None] + lam[..., :, None]
                        * self.cut_t[j - 1][None, None])  # (K, P, s, r)
                cand = v[..., j - 1][..., None] + cost
                arg = np.argmin(cand, axis=2)
                a[..., j] = np.take_along_axis(cand, arg[:, :, None, :], 2)[:, :, 0, :]
                best_from[..., j] = arg
            rn = self.run_n[dev, phi, :j + 1, j]  # (P, D, j + 1)
            rt = self.run_t[dev, phi, :j + 1, j]
            cand = a[..., :j + 1] + rn[None] + lam[..., None] * rt[None]
            arg = np.argmin(cand, axis=3)
            v[..., j] = np.take_along_axis(cand, arg[..., None], 3)[..., 0]
            best_i[..., j] = arg
        end = np.argmin(v[..., n - 1], axis=2)  # (K, P)
        value = np.take_along_axis(v[..., n - 1], end[..., None], 2)[..., 0]
        num, busy = self._walk(phi, best_i, best_from, end, np.isfinite(value))
        return value, num, busy, best_i, best_from, end

    def _walk(self, phi: np.ndarray, best_i: np.ndarray, best_from: np.ndarray,
              end: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``N`` and busy vector of every optimum, walking all pointers at once."""
        n_k, n_p = end.shape
        kk, pp = np.meshgrid(np.arange(n_k), np.arange(n_p), indexing="ij")
        num = np.zeros((n_k, n_p))
        busy = np.zeros((n_k, n_p, self.n_dev))
        d = end.copy()
        j = np.full((n_k, n_p), self.n - 1)
        live = ok.copy()
        while live.any():
            k, p, dd, jj = kk[live], pp[live], d[live], j[live]
            i = best_i[k, p, dd, jj]
            f = phi[p, dd]
            num[k, p] += self.run_n[dd, f, i, jj]
            busy[k, p, dd] += self.run_t[dd, f, i, jj]
            more = i > 0
            k, p, dd, i = k[more], p[more], dd[more], i[more]
            s = best_from[k, p, dd, i]
            num[k, p] += self.cut_n[i - 1, s, dd]
            busy[k, p, s] += self.cut_t[i - 1, s, dd]
            nxt = np.zeros_like(live)
            nxt[k, p] = True
            d[k, p] = s
            j[k, p] = i - 1
            live = nxt
        return num, busy

    def runs(self, best_i: np.ndarray, best_from: np.ndarray, end: int, k: int, p: int
             ) -> list[tuple[int, int, int]]:
        out = []
        d, j = end, self.n - 1
        while True:
            i = int(best_i[k, p, d, j])
            out.append((i, j, d))
            if i == 0:
                return out[::-1]
            d, j = int(best_from[k, p, d, i]), i - 1


def _ratio(model: _Model, num: np.ndarray, busy: np.ndarray) -> np.ndarray:
    """carbon / U of plans from their ``N`` and busy vectors (inf: no plan)."""
    b = busy.max(axis=-1)
    used = busy > 0
    k = used.astype(float) @ model.weight
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(np.isfinite(num) & (b > 0), num / b + k, math.inf)
    return r


def least_carbon(table: ir.CostTable, arrays: RunArrays, deadline: float | None = None
                 ) -> tuple[str, Chosen | None]:
    """``("optimal", plan)``, ``("optimal", None)`` when no plan exists,
    ``("feasible", plan)`` when ``deadline`` (``time.perf_counter()``) passed first, or
    ``("undecided", None)`` when the lower bounds could not close (run the MIP)."""
    model = _Model(table, arrays)
    n_dev = model.n_dev
    start = linear_dp(arrays, [(arrays.time, arrays.cut_time)])  # any plan starts q
    if start is None:
        return "optimal", None
    best: Chosen = start[1]
    q = _plan_ratio(table, best)
    active = np.arange(len(model.phi))
    lam_dual = np.full((len(model.phi), n_dev), 1.0 / n_dev)
    uniform = np.full(n_dev, 1.0 / n_dev)
    # Cheap passes (one weight vector per phi) before the exact ones: each gives every
    # vector a lower bound on F (c B >= c sum_d busy_d where c <= 0, >= c mean busy
    # where c > 0), which drops it for good when >= 0, and a plan that may lower q.
    for _ in range(2):
        c0 = model.k_phi[active] - q
        w0 = np.where(c0 <= 0, c0, c0 / n_dev)[None, :, None] * np.ones((1, 1, n_dev))
        value, num, busy, best_i, best_from, end = model.dp(w0, active)
        ratios = _ratio(model, num, busy)
        p0 = int(np.argmin(ratios[0]))
        if ratios[0, p0] < q:
            runs = model.runs(best_i, best_from, int(end[0, p0]), 0, p0)
            cand = plan_of_runs(arrays, runs, model.phi[active[p0]])
            cand_q = _plan_ratio(table, cand)
            if cand_q < q:
                best, q = cand, cand_q
                continue  # the bounds were for the old q: the next pass prunes
        scale = 1e-9 * (abs(q) * np.maximum(busy.max(axis=-1), 1e-300) + np.abs(num))
        active = active[~(value[0] >= -scale[0])]
        break
    stalls = 0
    onehot = np.eye(n_dev)
    for _ in range(_ROUNDS):
        if deadline is not None and time.perf_counter() > deadline:
            return "feasible", best
        if not len(active):
            return "optimal", best
        c = model.k_phi[active] - q  # (P,)
        easy = c <= 0
        lam = np.empty((n_dev, len(active), n_dev))
        lam[:, easy] = c[easy][None, :, None] * onehot[:, None, :]
        hard = ~easy
        if hard.any():
            mix = [lam_dual[active[hard]], np.broadcast_to(uniform, (int(hard.sum()), n_dev))]
            for k in range(n_dev):
                lam[k, hard] = c[hard][:, None] * mix[min(k, 1)]
        value, num, busy, best_i, best_from, end = model.dp(lam, active)
        ratios = _ratio(model, num, busy)
        k_best, p_best = np.unravel_index(np.argmin(ratios), ratios.shape)
        improved = bool(ratios[k_best, p_best] < q - 1e-12 * abs(q))
        if improved:
            runs = model.runs(best_i, best_from, int(end[k_best, p_best]), int(k_best),
                              int(p_best))
            cand = plan_of_runs(arrays, runs, model.phi[active[p_best]])
            cand_q = _plan_ratio(table, cand)
            if cand_q < q:
                best, q = cand, cand_q
            else:
                improved = False
        scale = 1e-9 * (abs(q) * np.maximum(busy.max(axis=-1), 1e-300) + np.abs(num))
        decided = np.where(easy, value.min(axis=0) >= -scale.min(axis=0),
                           value.max(axis=0) >= -scale.min(axis=0))
        active = active[~decided]
        if improved:
            stalls = 0
            continue
        if not len(active):
            return "optimal", best
        if np.all(model.k_phi[active] - q <= 0):
            continue  # only exact vectors left: the next step decides or improves
        stalls += 1
        if stalls > _ASCENT:
            # The dual bounds approach 0 slowly on the vectors left (the optimum's own
            # among them): settle each exactly by a label search under its bounds.
            if len(active) > _LABEL_MAX:
                return "undecided", None
            found = None
            for p in active:
                lams = [lam_dual[p], uniform]
                if deadline is not None and time.perf_counter() > deadline:
                    return "feasible", best
                out = _label_min(model, int(p), float(model.k_phi[p] - q), q, lams)
                if out is not None and (found is None or out[0] < found[0]):
                    found = (out[0], out[1], int(p))
            if found is None:
                return "optimal", best
            cand = plan_of_runs(arrays, found[1], model.phi[found[2]])
            cand_q = _plan_ratio(table, cand)
            if not cand_q < q:
                return "undecided", None  # rounding disagrees: let the MIP decide
            best, q, stalls = cand, cand_q, 0
            continue
        # Dual ascent on lam for the undecided vectors (supergradient: busy of the optimum)
        left = ~decided
        grow = busy[0][left]
        b = np.maximum(grow.max(axis=1, keepdims=True), 1e-300)
        upd = lam_dual[active] * np.exp(1.0 / math.sqrt(stalls) * (grow / b - 1.0))
        lam_dual[active] = upd / upd.sum(axis=1, keepdims=True)
    return "undecided", None


def _plan_ratio(table: ir.CostTable, plan: Chosen) -> float:
    from partitioner.analysis.estimate import evaluate

    est = evaluate(table, plan[0], plan[1], duration=1.0)
    return float(est.carbon or 0.0)


def _label_min(model: _Model, p: int, c: float, q: float, lams: list[np.ndarray]
               ) -> tuple[float, list[tuple[int, int, int]]] | None:
    """The least ``N(x) + c B(x)`` under vector ``p`` if it is below 0 (else None).

    ``c > 0``: a label (busy vector, ``N`` so far) at a run's end is dropped when a lower
    bound on every completion, ``N + c lam . busy + g_lam`` (``g_lam`` a backward DP of
    the same linear objective) or ``N + c max busy + g_0``, is not below 0, and when
    another label there has no more busy time anywhere and no more ``N``.
    """
    n, n_dev = model.n, model.n_dev
    phi = model.phi[p]
    dev = np.arange(n_dev)
    rn = model.run_n[dev, phi]  # (D, n, n)
    rt = model.run_t[dev, phi]
    gs = [_completion(model, rn, rt, c * lam) for lam in lams]
    g0 = _completion(model, rn, rt, np.zeros(n_dev))
    limit = -1e-9 * abs(q) * float(rt.max(initial=0.0)) - 1e-300
    busy = np.zeros((0, n_dev))
    num = np.zeros(0)
    end = np.zeros(0, dtype=int)
    at = np.zeros(0, dtype=int)
    parent = np.zeros(0, dtype=int)
    first = np.zeros(0, dtype=int)
    for j in range(n):
        for d in range(n_dev):
            cb, cn, cp, cs = [], [], [], []
            if math.isfinite(rn[d, 0, j]):
                b0 = np.zeros((1, n_dev))
                b0[0, d] = rt[d, 0, j]
                cb.append(b0)
                cn.append(np.array([rn[d, 0, j]]))
                cp.append(np.array([-1]))
                cs.append(np.array([0]))
            src = np.nonzero((end < j) & (at != d))[0]
            if len(src):
                k = end[src]
                snd = at[src]
                step_n = model.cut_n[k, snd, d] + rn[d, k + 1, j]
                ok = np.isfinite(step_n)
                if ok.any():
                    s = src[ok]
                    b = busy[s].copy()
                    b[np.arange(len(s)), snd[ok]] += model.cut_t[k[ok], snd[ok], d]
                    b[:, d] += rt[d, k[ok] + 1, j]
                    cb.append(b)
                    cn.append(num[s] + step_n[ok])
                    cp.append(s)
                    cs.append(k[ok] + 1)
            if not cb:
                continue
            b = np.concatenate(cb)
            v = np.concatenate(cn)
            bound = v + c * b.max(axis=1) + g0[j, d]
            for lam, g in zip(lams, gs, strict=True):
                bound = np.maximum(bound, v + c * (b @ lam) + g[j, d])
            keep = bound < limit
            if not keep.any():
                continue
            b, v = b[keep], v[keep]
            front = pareto(b, v, np.zeros((len(v), 1), dtype=int))
            busy = np.concatenate([busy, b[front]])
            num = np.concatenate([num, v[front]])
            end = np.concatenate([end, np.full(len(front), j)])
            at = np.concatenate([at, np.full(len(front), d)])
            parent = np.concatenate([parent, np.concatenate(cp)[keep][front]])
            first = np.concatenate([first, np.concatenate(cs)[keep][front]])
    done = np.nonzero(end == n - 1)[0]
    if not len(done):
        return None
    total = num[done] + c * busy[done].max(axis=1)
    pick = int(done[np.argmin(total)])
    if not total.min() < limit:
        return None
    runs = []
    while pick >= 0:
        runs.append((int(first[pick]), int(end[pick]), int(at[pick])))
        pick = int(parent[pick])
    return float(total.min()), runs[::-1]


def _completion(model: _Model, rn: np.ndarray, rt: np.ndarray, lam: np.ndarray
                ) -> np.ndarray:
    """``g[j, d]``: least ``N + lam . busy`` of a completion after a run ends at j on d."""
    n, n_dev = model.n, model.n_dev
    run = rn + lam[:, None, None] * rt  # (D, n, n), inf where no run
    g = np.full((n, n_dev), math.inf)
    g[n - 1] = 0.0
    for i in range(n - 1, 0, -1):
        h = np.min(run[:, i, i:] + g[i:].T, axis=1)  # (D,): from a run starting at i
        sent = model.cut_n[i - 1] + lam[:, None] * model.cut_t[i - 1] + h[None, :]
        g[i - 1] = np.min(sent, axis=1)
    return g
