"""``CostTable.bundles`` as columns: every priced bundle one row of numpy arrays.

Part of the IR (:mod:`partitioner.ir`): :class:`BundlePrices` *is* a
``Mapping[(first, last, device, frequency), BundleCost]`` — a caller that looks up or walks
the table gets the same ``BundleCost`` objects as from a dict — but it stores the prices
as arrays, so that :func:`partitioner.analysis.costs.build_cost_table` fills it with numpy
and :func:`partitioner.solver.runs.run_arrays` reads it without one Python step per bundle
(issue 16: 241,200 bundles at 200 layers × 4 devices × 3 frequencies).

Rows are ordered by device, then frequency, then ``first``, then ``last`` (the order in
which the table's dict was filled before), and ``energy`` is NaN where a bundle has none.
"""

from __future__ import annotations

import math
from collections.abc import ItemsView, Iterator, Mapping, Sequence, ValuesView
from dataclasses import dataclass

import numpy as np

from partitioner.ir.costs import BundleCost

__all__ = ["BundleKey", "BundlePrices"]

BundleKey = tuple[int, int, str, str | None]

_LIMIT = 1 << 20  # layer positions per chain a key can hold (and 2^13 device-frequencies)


def _pack(device: np.ndarray | int, freq: np.ndarray | int, first: np.ndarray | int,
          last: np.ndarray | int) -> np.ndarray:
    """One int64 per key, ordered as (device, frequency, first, last)."""
    return ((np.asarray(device, dtype=np.int64) * 1024 + freq) * _LIMIT + first) * _LIMIT + last


class _Items(ItemsView[BundleKey, BundleCost]):
    _mapping: BundlePrices

    def __iter__(self) -> Iterator[tuple[BundleKey, BundleCost]]:
        m = self._mapping
        return ((m._key(r), m._cost(r)) for r in range(len(m)))


class _Values(ValuesView[BundleCost]):
    _mapping: BundlePrices

    def __iter__(self) -> Iterator[BundleCost]:
        m = self._mapping
        return (m._cost(r) for r in range(len(m)))


@dataclass(frozen=True, eq=False)
class BundlePrices(Mapping[BundleKey, BundleCost]):
    """Bundle prices by row (see the module docstring).

    Attributes:
        devices: device names; ``device`` indexes them.
        freqs: per device, its frequency labels; ``freq`` indexes them.
        first / last / device / freq: the key of each row (int64).
        compute / weight_loading / internal / hidden / energy: the ``BundleCost`` fields
            (float64; ``energy`` NaN for None).
    """

    devices: tuple[str, ...]
    freqs: tuple[tuple[str | None, ...], ...]
    first: np.ndarray
    last: np.ndarray
    device: np.ndarray
    freq: np.ndarray
    compute: np.ndarray
    weight_loading: np.ndarray
    internal: np.ndarray
    hidden: np.ndarray
    energy: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.first)
        for name in ("last", "device", "freq", "compute", "weight_loading", "internal",
                     "hidden", "energy"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"BundlePrices.{name}: {len(getattr(self, name))} rows, "
                                 f"first has {n}")
        packed = _pack(self.device, self.freq, self.first, self.last)
        if n > 1 and not bool(np.all(np.diff(packed) > 0)):
            raise ValueError("BundlePrices: rows must be sorted by device, frequency, first, "
                             "last, each key once")
        object.__setattr__(self, "_packed", packed)

    @classmethod
    def concatenate(cls, devices: Sequence[str], freqs: Sequence[Sequence[str | None]],
                    blocks: Sequence[Mapping[str, np.ndarray]]) -> BundlePrices:
        """One table of row blocks (each a mapping of the column names to arrays)."""
        names = ("first", "last", "device", "freq", "compute", "weight_loading", "internal",
                 "hidden", "energy")
        ints = {"first", "last", "device", "freq"}
        cols = {k: (np.concatenate([np.asarray(b[k]) for b in blocks]) if blocks
                    else np.zeros(0)).astype(np.int64 if k in ints else np.float64)
                for k in names}
        return cls(tuple(devices), tuple(tuple(f) for f in freqs), **cols)

    # --- the Mapping protocol ---------------------------------------------------------

    def __len__(self) -> int:
        return int(self.first.shape[0])

    def _key(self, r: int) -> BundleKey:
        d = int(self.device[r])
        return (int(self.first[r]), int(self.last[r]), self.devices[d],
                self.freqs[d][int(self.freq[r])])

    def _cost(self, r: int) -> BundleCost:
        e = float(self.energy[r])
        return BundleCost(compute=float(self.compute[r]),
                          weight_loading=float(self.weight_loading[r]),
                          internal=float(self.internal[r]), hidden=float(self.hidden[r]),
                          energy=None if math.isnan(e) else e)

    def _row(self, key: object) -> int | None:
        if not isinstance(key, tuple) or len(key) != 4:
            return None
        first, last, device, freq = key
        if device not in self.devices or type(first) is not int or type(last) is not int \
                or not 0 <= first < _LIMIT or not 0 <= last < _LIMIT:
            return None
        d = self.devices.index(device)
        if freq not in self.freqs[d]:
            return None
        want = int(_pack(d, self.freqs[d].index(freq), first, last))
        packed: np.ndarray = self._packed  # type: ignore[attr-defined]
        k = int(np.searchsorted(packed, want))
        return k if k < len(packed) and int(packed[k]) == want else None

    def __getitem__(self, key: BundleKey) -> BundleCost:
        r = self._row(key)
        if r is None:
            raise KeyError(key)
        return self._cost(r)

    def __contains__(self, key: object) -> bool:
        return self._row(key) is not None

    def __iter__(self) -> Iterator[BundleKey]:
        return (self._key(r) for r in range(len(self)))

    def items(self) -> ItemsView[BundleKey, BundleCost]:
        return _Items(self)

    def values(self) -> ValuesView[BundleCost]:
        return _Values(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return len(self) == len(other) and dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    # --- arrays for the solver --------------------------------------------------------

    def time(self) -> np.ndarray:
        """``BundleCost.time`` of every row: compute + weight loading + internal."""
        return self.compute + self.weight_loading + self.internal
