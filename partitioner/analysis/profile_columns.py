"""A profile's bundles as columns (numpy arrays): read, checked and priced without objects.

A 200-layer profile at MBS = L holds 20,100 bundles per frequency; as one
:class:`~partitioner.analysis.profiles.ProfiledBundle` each, reading four such files and
pricing them cost ~10 µs of CPU per entry and step (issue 16). :class:`BundleColumns` holds
the same entries as arrays and *is* a ``Sequence[ProfiledBundle]`` (an entry becomes an
object only when somebody indexes or iterates it), so ``Profile.bundles`` keeps its meaning
for every caller while :mod:`partitioner.analysis.costs` reads the arrays.

``None`` (no energy, no spread) is stored as NaN: a profile's numbers are finite, so NaN
never stands for a measured value.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

__all__ = ["BundleColumns", "columns_from_entries", "columns_of"]

_OPTIONAL = ("energy", "std", "min", "max", "p50")
_NONE = type(None)


@dataclass(frozen=True, eq=False)
class BundleColumns(Sequence[Any]):
    """Bundles ``first..last`` at ``labels[freq]`` with their figures, one row each.

    Attributes:
        first / last: model layer indices (int64).
        freq: index into ``labels`` (int64).
        labels: the frequency labels, in first-seen order.
        latency: seconds (float64).
        energy / std / min / max / p50: float64, NaN where the entry has none.
    """

    first: np.ndarray
    last: np.ndarray
    freq: np.ndarray
    labels: tuple[str | None, ...]
    latency: np.ndarray
    energy: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    p50: np.ndarray

    def __len__(self) -> int:
        return int(self.first.shape[0])

    def _entry(self, k: int) -> Any:
        from partitioner.analysis.profiles import ProfiledBundle

        def opt(col: np.ndarray) -> float | None:
            v = float(col[k])
            return None if math.isnan(v) else v

        return ProfiledBundle(int(self.first[k]), int(self.last[k]),
                              self.labels[int(self.freq[k])], float(self.latency[k]),
                              opt(self.energy), opt(self.std), opt(self.min), opt(self.max),
                              opt(self.p50))

    @overload
    def __getitem__(self, k: int) -> Any: ...
    @overload
    def __getitem__(self, k: slice) -> tuple[Any, ...]: ...

    def __getitem__(self, k: int | slice) -> Any:
        if isinstance(k, slice):
            return tuple(self._entry(i) for i in range(len(self))[k])
        n = len(self)
        if not -n <= k < n:
            raise IndexError(k)
        return self._entry(k % n)

    def __iter__(self) -> Iterator[Any]:
        return (self._entry(k) for k in range(len(self)))

    def __eq__(self, other: object) -> bool:
        # Equal to any sequence of the same bundles, a tuple included (Profile compares
        # its fields; a profile read from a file equals the one that was written).
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(other) == len(self) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def present_labels(self) -> tuple[str | None, ...]:
        """The frequency labels that occur, in first-seen order."""
        if len(self) == 0:
            return ()
        codes, first_seen = np.unique(self.freq, return_index=True)
        return tuple(self.labels[int(c)] for c in codes[np.argsort(first_seen)])

    def keys(self, n_layers: int) -> np.ndarray:
        """One int64 per entry, equal for the same (first, last, label):
        ``(label * n + first) * n + last``."""
        return (self.freq * n_layers + self.first) * n_layers + self.last

    def first_repeat(self, n_layers: int) -> int | None:
        """The first entry whose (first, last, label) an earlier entry has, or None."""
        keys = self.keys(n_layers)
        _, first_seen = np.unique(keys, return_index=True)
        if len(first_seen) == len(keys):
            return None
        again = np.ones(len(keys), dtype=bool)
        again[first_seen] = False
        return int(np.argmax(again))

    def relabelled(self, labels: Sequence[str | None]) -> np.ndarray:
        """``freq`` as indices into ``labels`` (-1 where a label is not among them)."""
        where = {f: q for q, f in enumerate(labels)}
        table = np.array([where.get(f, -1) for f in self.labels] or [-1], dtype=np.int64)
        return table[self.freq]


def _columns(entries: list[dict[str, Any]]) -> dict[str, Sequence[Any]]:
    """Each key's values over ``entries``; a key no entry has is left out, one that only
    some entries have reads None where missing."""
    keys = tuple(entries[0])
    if keys and set(map(len, entries)) == {len(keys)}:
        # the common case, one writer: every entry has the keys of the first (same count
        # and each one present) and C-level loops read them
        try:
            return {k: list(map(operator.itemgetter(k), entries)) for k in keys}
        except KeyError:
            pass
    wanted = ("first", "last", "frequency", "latency", *_OPTIONAL)
    return {k: [e.get(k) for e in entries] for k in wanted}


def _typed(cols: dict[str, Sequence[Any]], key: str, types: set[type]
           ) -> Sequence[Any] | None:
    """The values of ``key`` if all are of ``types``, () for a key no entry has and that
    may be None (``types`` holds NoneType), else None."""
    values = cols.get(key)
    if values is None:
        return () if _NONE in types else None
    return values if set(map(type, values)) <= types else None


def columns_from_entries(entries: list[Any], n_layers: int) -> BundleColumns | None:
    """The columns of well-formed profile entries; None when any entry is not (then the
    caller checks entry by entry, for a message naming the entry and the key).

    Well-formed: an object whose ``first``/``last`` are integers with
    ``0 <= first <= last < n_layers``, ``frequency`` a string or null, ``latency`` a
    finite positive number, and ``energy``/``std``/``min``/``max``/``p50`` absent, null or
    finite non-negative numbers (booleans are not numbers).
    """
    if set(map(type, entries)) - {dict}:
        return None
    if not entries:
        cols: dict[str, Sequence[Any]] = {k: () for k in ("first", "last", "frequency",
                                                          "latency", *_OPTIONAL)}
    else:
        cols = _columns(entries)
    n = len(entries)
    first = _typed(cols, "first", {int})
    last = _typed(cols, "last", {int})
    freqs = _typed(cols, "frequency", {str, _NONE})
    latency = _typed(cols, "latency", {int, float})
    maybe = [_typed(cols, k, {int, float, _NONE}) for k in _OPTIONAL]
    optional = [o for o in maybe if o is not None]
    if first is None or last is None or freqs is None or latency is None \
            or len(optional) != len(maybe):
        return None
    try:
        a_first = np.array(first, dtype=np.int64)
        a_last = np.array(last, dtype=np.int64)
        a_lat = np.array(latency, dtype=np.float64)
        a_opt = [np.array(o, dtype=np.float64) if len(o) == n else np.full(n, math.nan)
                 for o in optional]  # (a key no entry has: all None)
    except (OverflowError, ValueError):
        return None
    if not (np.all(a_first >= 0) and np.all(a_first <= a_last) and np.all(a_last < n_layers)
            and np.all(a_lat > 0) and np.all(a_lat < math.inf)):
        return None
    for values, col in zip(optional, a_opt, strict=True):
        # NaN stands for the entry's None; a NaN in the file (JSON allows it), a negative
        # or an infinite figure is refused
        if len(values) == n and (np.any(col < 0) or np.any(col == math.inf)
                                 or int(np.count_nonzero(np.isnan(col))) != values.count(None)):
            return None
    if len(freqs) != n:  # no entry names a frequency
        freqs = (None,) * n
    labels = tuple(dict.fromkeys(freqs))
    code = {f: q for q, f in enumerate(labels)}
    a_freq = (np.zeros(n, dtype=np.int64) if len(labels) <= 1
              else np.array(list(map(code.__getitem__, freqs)), dtype=np.int64))
    return BundleColumns(a_first, a_last, a_freq, labels, a_lat, *a_opt)


def columns_of(bundles: Sequence[Any]) -> BundleColumns:
    """``bundles`` (``ProfiledBundle``s or columns already) as columns."""
    if isinstance(bundles, BundleColumns):
        return bundles
    labels = tuple(dict.fromkeys(b.frequency for b in bundles))
    code = {f: q for q, f in enumerate(labels)}

    def col(attr: str) -> np.ndarray:
        return np.array([math.nan if (v := getattr(b, attr)) is None else v
                         for b in bundles], dtype=np.float64)

    return BundleColumns(
        np.array([b.first for b in bundles], dtype=np.int64),
        np.array([b.last for b in bundles], dtype=np.int64),
        np.array([code[b.frequency] for b in bundles], dtype=np.int64),
        labels, col("latency"), *(col(k) for k in _OPTIONAL))
