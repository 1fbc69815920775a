"""The output-noise model of per-layer int8 variants (QUANT): measure, fit, cache.

QUANT's noise of a configuration ``q`` (the set of int8 layers) is
``rho(q) = (1/n) sum_i mean |o_i - o_q,i|`` over ``n`` inputs, all model outputs taken
together (:func:`partitioner.frontend.quantize.measure_noise` measures it with ONNX
Runtime). The planner needs ``eta(q)`` for every one of the ``2^K`` configurations, so it
measures a design and fits a polynomial over the binary ``q``:

* measured: every single candidate, every pair, and random larger sets (sizes 3..K),
  plus held-out random configurations that the fit never sees;
* fitted: multilinear monomials up to ``degree`` (2, or 3 for few candidates), by least
  squares (numpy) and **without a constant** (nothing int8, no noise: ``eta(0) = 0``);
* reported: the fit's mean absolute error on the held-out configurations, absolute and
  relative to their mean measured noise;
* checked: the solver seeks the configurations the fit underestimates, so the set a
  solve picks is measured too (:func:`partitioner.analysis.variants.check_noise`), added
  to the fit (:meth:`NoiseFit.with_point`) and, when above the cap, cut off; the solve
  repeats until it picks a measured set;
* used: a plan's ``estimate.noise`` is the measured rho of its int8 set when that set is
  one of the measured configurations (least squares does not interpolate its design
  points), the fit ``eta`` otherwise (:func:`partitioner.analysis.variants.plan_noise`).

The measurements and the fit are cached in a JSON file keyed by the model's fingerprint
(SHA-256 of the ONNX bytes), the calibration digest, the candidates, degree and design
seed (like profiles, a second plan/compile of the same model reads them back). The cache
directory is :func:`cache_dir`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from partitioner import ir
from partitioner.errors import fail

__all__ = ["NoiseFit", "design", "monomials", "fit_terms", "fit_noise", "cache_dir",
           "cached_fit", "store_fit", "FORMAT"]

log = logging.getLogger("partitioner.noise")

FORMAT = 1  # bump when the cached document changes meaning
Config = tuple[int, ...]


@dataclass(frozen=True)
class NoiseFit:
    """A fitted noise polynomial and how well it predicts held-out configurations.

    Attributes:
        candidates: the candidate layers, ascending.
        degree: the largest monomial degree.
        terms: the polynomial (no constant term).
        train: ``(configuration, measured rho)`` the fit used.
        heldout: ``(configuration, measured rho, predicted eta)`` it never saw.
    """

    candidates: tuple[int, ...]
    degree: int
    terms: tuple[ir.NoiseTerm, ...]
    train: tuple[tuple[Config, float], ...]
    heldout: tuple[tuple[Config, float, float], ...]

    @property
    def heldout_error(self) -> float | None:
        """Mean |eta - rho| over the held-out configurations."""
        if not self.heldout:
            return None
        return float(np.mean([abs(p - m) for _, m, p in self.heldout]))

    @property
    def heldout_relative_error(self) -> float | None:
        """The held-out error over the mean held-out measured noise."""
        if not self.heldout:
            return None
        mean = float(np.mean([m for _, m, _ in self.heldout]))
        err = self.heldout_error
        return None if err is None or mean <= 0 else err / mean

    @property
    def measured(self) -> dict[Config, float]:
        """Every configuration measured (training and held-out) and its rho."""
        out = dict(self.train)
        out.update({c: r for c, r, _ in self.heldout})
        return out

    def with_point(self, conf: Config, rho: float) -> NoiseFit:
        """The fit refitted with one more measured configuration (a solve's choice)."""
        train = (*self.train, (tuple(sorted(conf)), float(rho)))
        terms = fit_terms([c for c, _ in train], [r for _, r in train], self.candidates,
                          self.degree)
        fit = NoiseFit(self.candidates, self.degree, terms, train, ())
        return NoiseFit(self.candidates, self.degree, terms, train,
                        tuple((c, r, fit.predict(c)) for c, r, _ in self.heldout))

    def predict(self, quantized: Iterable[int]) -> float:
        q = set(quantized)
        return float(sum(t.coef for t in self.terms if set(t.layers) <= q))

    def to_json(self) -> dict[str, Any]:
        return {"candidates": list(self.candidates), "degree": self.degree,
                "terms": [[list(t.layers), t.coef] for t in self.terms],
                "train": [[list(c), r] for c, r in self.train],
                "heldout": [[list(c), r, p] for c, r, p in self.heldout],
                "heldout_error": self.heldout_error,
                "heldout_relative_error": self.heldout_relative_error}

    @staticmethod
    def from_json(doc: Mapping[str, Any]) -> NoiseFit:
        return NoiseFit(
            candidates=tuple(int(k) for k in doc["candidates"]), degree=int(doc["degree"]),
            terms=tuple(ir.NoiseTerm(tuple(int(k) for k in ks), float(c))
                        for ks, c in doc["terms"]),
            train=tuple((tuple(int(k) for k in c), float(r)) for c, r in doc["train"]),
            heldout=tuple((tuple(int(k) for k in c), float(r), float(p))
                          for c, r, p in doc["heldout"]))


def monomials(candidates: Sequence[int], degree: int) -> list[Config]:
    """Every multilinear monomial of degree 1..``degree`` over ``candidates``."""
    out: list[Config] = []
    for d in range(1, degree + 1):
        out.extend(itertools.combinations(sorted(candidates), d))
    return out


def design(candidates: Sequence[int], degree: int, *, seed: int = 0,
           extra: int | None = None, heldout: int | None = None
           ) -> tuple[list[Config], list[Config]]:
    """The configurations to measure: (training, held-out).

    Training: every monomial of the fit as a configuration (singles, pairs, triples for
    degree 3) plus ``extra`` random larger sets (default ``max(4, K)``); held-out:
    ``heldout`` random configurations of random size 2..K (default ``max(4, K // 2)``),
    disjoint from the training set where possible.
    """
    cands = sorted(candidates)
    k = len(cands)
    rnd = random.Random(seed)
    train = monomials(cands, degree)
    seen = set(train)
    extra = max(4, k) if extra is None else extra
    heldout = max(4, k // 2) if heldout is None else heldout

    def draw(n: int, low: int) -> list[Config]:
        got: list[Config] = []
        tries = 0
        while len(got) < n and tries < 50 * (n + 1) and k >= low:
            tries += 1
            size = rnd.randint(low, k)
            conf = tuple(sorted(rnd.sample(cands, size)))
            if conf not in seen:
                seen.add(conf)
                got.append(conf)
        return got

    train += draw(extra, min(degree + 1, k))
    return train, draw(heldout, min(2, k))


def fit_terms(configs: Sequence[Config], rhos: Sequence[float], candidates: Sequence[int],
              degree: int) -> tuple[ir.NoiseTerm, ...]:
    """Least-squares multilinear polynomial without constant through the measurements."""
    basis = monomials(candidates, degree)
    if not configs:
        return ()
    a = np.array([[1.0 if set(m) <= set(c) else 0.0 for m in basis] for c in configs])
    coef, *_ = np.linalg.lstsq(a, np.asarray(rhos, dtype=float), rcond=None)
    return tuple(ir.NoiseTerm(m, float(c)) for m, c in zip(basis, coef, strict=True)
                 if abs(c) > 1e-15)


def fit_noise(measure: Callable[[Config], float], candidates: Sequence[int], *,
              degree: int = 2, seed: int = 0, extra: int | None = None,
              heldout: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> NoiseFit:
    """Measure the design (:func:`design`) with ``measure`` and fit the polynomial.

    Raises:
        UserError: a degree other than 1..3.
    """
    if degree not in (1, 2, 3):
        fail(f"noise polynomial degree {degree}: expected 1, 2 or 3")
    cands = tuple(sorted(set(candidates)))
    train, held = design(cands, degree, seed=seed, extra=extra, heldout=heldout)
    total = len(train) + len(held)
    rhos: list[float] = []
    for n, conf in enumerate(train + held):
        rhos.append(float(measure(conf)))
        if progress is not None:
            progress(n + 1, total)
    terms = fit_terms(train, rhos[:len(train)], cands, degree)
    fit = NoiseFit(cands, degree, terms, tuple(zip(train, rhos[:len(train)], strict=True)),
                   ())
    return NoiseFit(cands, degree, terms, fit.train,
                    tuple((c, r, fit.predict(c))
                          for c, r in zip(held, rhos[len(train):], strict=True)))


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path | None:
    """``$PARTITIONER_CACHE/noise`` (unset: ``~/.cache/partitioner/noise``; the empty
    string: no disk cache), next to the quantised variants of
    :mod:`partitioner.frontend.quantize`."""
    root = os.environ.get("PARTITIONER_CACHE")
    if root == "":
        return None
    return (Path(root) if root else Path.home() / ".cache" / "partitioner") / "noise"


def _cache_file(key: Mapping[str, Any], directory: Path | None
                ) -> tuple[Path | None, Any]:
    ident = json.loads(json.dumps({"format": FORMAT, **key}, sort_keys=True))
    name = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    where = directory if directory is not None else cache_dir()
    return (None if where is None else where / f"{name}.json"), ident


def store_fit(key: Mapping[str, Any], fit: NoiseFit, directory: Path | None = None) -> None:
    """Write ``fit`` under ``key`` (atomically; a read-only cache is only logged)."""
    path, ident = _cache_file(key, directory)
    if path is None:
        return
    try:
        from partitioner.analysis.profiles import write_json_atomic

        write_json_atomic(path, {"key": ident, "fit": fit.to_json()})
    except OSError as err:  # a read-only cache only costs a re-measurement next time
        log.warning("noise cache %s not written: %s", path, err)


def cached_fit(key: Mapping[str, Any], compute: Callable[[], NoiseFit],
               directory: Path | None = None) -> tuple[NoiseFit, bool]:
    """The fit stored under ``key`` or ``compute()`` it and store it.

    Returns:
        ``(fit, from_cache)``. An unreadable or mismatching cache file is measured again
        (and replaced), never trusted.
    """
    path, ident = _cache_file(key, directory)
    if path is None:
        return compute(), False
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("key") == ident:
            return NoiseFit.from_json(doc["fit"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    fit = compute()
    store_fit(key, fit, directory)
    return fit, False
