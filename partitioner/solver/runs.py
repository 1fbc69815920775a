"""The cost table as arrays over *runs*: what every run and every cut costs (numpy).

A plan is a sequence of runs (maximal stretches of positions on one device, SPEC §3);
canonical pricing splits a run greedily into bundles (a pseudo position alone, model
layers in chunks of ``mbs``), so the price of run ``i..j`` on ``d`` at ``f`` follows from
the recurrence ``run(i, j) = bundle(i, e_i) + internal(e_i) + run(e_i + 1, j)`` for
``j > e_i`` (``e_i`` the end of the first bundle), ``bundle(i, j)`` otherwise. The arrays
here hold, per device ``d`` and frequency index ``f``:

* ``time[d, f, i, j]``: the run's latency, and its busy time on ``d``; for ``i > 0`` the
  run follows another device, so preloading hides its first bundle's ``hidden`` time
  (ODIWeP); ``inf`` where the run has no price (pins, a missing bundle or internal cut);
* ``energy[d, f, i, j]``: the joules ``d`` spends on the run (bundles and internal cuts);
* ``cut_time[k, s, r]`` / ``cut_send[k, s, r]`` / ``cut_recv[k, s, r]``: the transfer of
  the cut after position ``k`` from ``s`` to ``r != s`` (``inf`` time: not connected).

Every figure is the one :func:`partitioner.analysis.estimate.evaluate` adds for the same
run, so a path over these arrays is priced exactly as the canonical model prices it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from partitioner import ir
from partitioner.ir.prices import BundlePrices

__all__ = ["RunArrays", "run_arrays"]


@dataclass(frozen=True)
class RunArrays:
    """Per-run and per-cut prices of a cost table (see the module docstring)."""

    devices: tuple[str, ...]
    freqs: tuple[tuple[str | None, ...], ...]  # labels per device, index f
    time: np.ndarray  # (D, F, n, n)
    energy: np.ndarray  # (D, F, n, n)
    cut_time: np.ndarray  # (n - 1, D, D)
    cut_send: np.ndarray  # (n - 1, D, D)
    cut_recv: np.ndarray  # (n - 1, D, D)

    @property
    def n(self) -> int:
        return int(self.time.shape[2])


def _first_bundle_ends(table: ir.CostTable) -> list[int]:
    """``e_i``: the last position of the first bundle of a run starting at ``i``."""
    pos = table.positions
    n = len(pos)
    ends = []
    for i, p in enumerate(pos):
        e = i
        if p.kind == "layer":
            while e + 1 < n and e + 1 - i < table.mbs and pos[e + 1].kind == "layer":
                e += 1
        ends.append(e)
    return ends


def _flat(table: ir.CostTable, devices: tuple[str, ...], f_index: list[dict[str | None, int]],
          preload: bool) -> tuple[np.ndarray, ...]:
    """A table whose bundles are a plain dict, walked once into flat arrays (a Python
    pass over its entries is the floor; numpy does the checks and the scatter)."""
    count = len(table.bundles)
    slot = {(d, f): (k, q) for k, fs in enumerate(f_index) for f, q in fs.items()
            for d in (devices[k],)}
    keys = table.bundles.keys()
    dk = np.fromiter((slot.get((key[2], key[3]), (-1, -1))[0] for key in keys), int, count)
    fq = np.fromiter((slot.get((key[2], key[3]), (-1, -1))[1] for key in keys), int, count)
    bi = np.fromiter((key[0] for key in keys), int, count)
    bj = np.fromiter((key[1] for key in keys), int, count)
    costs = table.bundles.values()
    bt = np.fromiter((c.compute + c.weight_loading + c.internal for c in costs), float, count)
    bh = np.fromiter((c.hidden for c in costs), float, count) if preload else np.zeros(count)
    be = np.fromiter((c.energy or 0.0 for c in costs), float, count)
    return dk, fq, bi, bj, bt, bh, be


def _from_columns(prices: BundlePrices, devices: tuple[str, ...],
                  f_index: list[dict[str | None, int]], preload: bool
                  ) -> tuple[np.ndarray, ...]:
    """The same flat arrays from a table already held as columns (``build_cost_table``):
    only its device and frequency indices are mapped to the run arrays' (-1: none)."""
    slot = np.full((len(prices.devices) + 1, max(map(len, prices.freqs), default=0) + 1), -1)
    for k, d in enumerate(prices.devices):
        if d in devices:
            for q, f in enumerate(prices.freqs[k]):
                slot[k, q] = f_index[devices.index(d)].get(f, -1)
    fq = slot[prices.device, prices.freq]
    dk = np.where(fq >= 0, np.array([devices.index(d) if d in devices else -1
                                     for d in prices.devices] or [-1])[prices.device], -1)
    bh = prices.hidden if preload else np.zeros(len(prices))
    return (dk, fq, prices.first, prices.last, prices.time(), bh,
            np.nan_to_num(prices.energy, nan=0.0))


def run_arrays(table: ir.CostTable) -> RunArrays:
    """Price every run and every cut of ``table`` as arrays (O(n^2 D F) numbers)."""
    pos = table.positions
    n = len(pos)
    devices = table.device_names
    dev_index = {d: k for k, d in enumerate(devices)}
    freqs = tuple(tuple(table.frequencies.get(d, (None,))) for d in devices)
    n_f = max(len(f) for f in freqs)
    f_index = [{f: q for q, f in enumerate(fs)} for fs in freqs]
    shape = (len(devices), n_f, n, n)
    b_time = np.full(shape, math.inf)
    b_hidden = np.zeros(shape)
    b_energy = np.zeros(shape)
    allowed = np.array([[p.allowed is None or d in p.allowed for p in pos] for d in devices],
                       dtype=bool)
    n_allowed = np.concatenate([np.zeros((len(devices), 1), dtype=int),
                                np.cumsum(allowed, axis=1)], axis=1)
    ends = _first_bundle_ends(table)
    preload = table.preload
    if isinstance(table.bundles, BundlePrices):
        dk, fq, bi, bj, bt, bh, be = _from_columns(table.bundles, devices, f_index, preload)
    else:
        dk, fq, bi, bj, bt, bh, be = _flat(table, devices, f_index, preload)
    ok = (dk >= 0) & (bi >= 0) & (bi <= bj) & (bj < n)
    dk, fq, bi, bj, bt, bh, be = (x[ok] for x in (dk, fq, bi, bj, bt, bh, be))
    # Only the bundles canonical pricing can use: a first bundle of a run, i.e. one
    # that ends at or before e_i, and one every position of which may run on d.
    ok = (bj <= np.asarray(ends, dtype=int)[bi]) & (
        n_allowed[dk, bj + 1] - n_allowed[dk, bi] == bj - bi + 1)
    dk, fq, bi, bj = dk[ok], fq[ok], bi[ok], bj[ok]
    b_time[dk, fq, bi, bj] = bt[ok]
    b_hidden[dk, fq, bi, bj] = bh[ok]
    b_energy[dk, fq, bi, bj] = be[ok]
    int_time = np.full((len(devices), n), math.inf)
    int_energy = np.zeros((len(devices), n))
    cut_time = np.full((max(n - 1, 0), len(devices), len(devices)), math.inf)
    cut_send = np.zeros_like(cut_time)
    cut_recv = np.zeros_like(cut_time)
    for (k, s, r), tr in table.transfers.items():
        a, b = dev_index.get(s), dev_index.get(r)
        if a is None or b is None or not 0 <= k < n - 1:
            continue
        if a == b:
            int_time[a, k] = tr.time
            int_energy[a, k] = (tr.sender_energy or 0.0) + (tr.receiver_energy or 0.0)
        else:
            cut_time[k, a, b] = tr.time
            cut_send[k, a, b] = tr.sender_energy or 0.0
            cut_recv[k, a, b] = tr.receiver_energy or 0.0
    time = np.full(shape, math.inf)
    hidden = np.zeros(shape)
    energy = np.zeros(shape)
    with np.errstate(invalid="ignore"):
        for i in range(n - 1, -1, -1):
            e = ends[i]
            time[:, :, i, i:e + 1] = b_time[:, :, i, i:e + 1]
            hidden[:, :, i, i:e + 1] = b_hidden[:, :, i, i:e + 1]
            energy[:, :, i, i:e + 1] = b_energy[:, :, i, i:e + 1]
            if e + 1 < n:
                head = b_time[:, :, i, e] + int_time[:, None, e]
                time[:, :, i, e + 1:] = head[:, :, None] + time[:, :, e + 1, e + 1:]
                hidden[:, :, i, e + 1:] = b_hidden[:, :, i, e, None]
                energy[:, :, i, e + 1:] = (b_energy[:, :, i, e] + int_energy[:, None, e]
                                           )[:, :, None] + energy[:, :, e + 1, e + 1:]
        time[:, :, 1:, :] -= hidden[:, :, 1:, :]
    time[~np.isfinite(time)] = math.inf
    energy[~np.isfinite(time)] = math.inf
    # Only upper-triangular runs exist.
    lower = np.tril(np.ones((n, n), dtype=bool), -1)
    time[:, :, lower] = math.inf
    energy[:, :, lower] = math.inf
    for k, fs in enumerate(freqs):
        time[k, len(fs):] = math.inf
        energy[k, len(fs):] = math.inf
    return RunArrays(devices, freqs, time, energy, cut_time, cut_send, cut_recv)
