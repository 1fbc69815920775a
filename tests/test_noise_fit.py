"""The noise polynomial: design, least-squares fit, held-out error, cache."""

from __future__ import annotations

import itertools
import json

import pytest

from partitioner.analysis import noise
from partitioner.errors import UserError

CANDS = (1, 4, 6, 9, 11)


def quadratic(conf: tuple[int, ...]) -> float:
    """A known multilinear polynomial of degree 2 (singles plus pair interactions)."""
    single = {1: 0.01, 4: 0.03, 6: 0.002, 9: 0.05, 11: 0.02}
    total = sum(single[k] for k in conf)
    total += sum(0.004 * (a + b) / 20 for a, b in itertools.combinations(conf, 2))
    return total


def with_triples(conf: tuple[int, ...]) -> float:
    return quadratic(conf) + 0.01 * sum(1 for _ in itertools.combinations(conf, 3))


def test_design_measures_every_single_and_pair_plus_larger_and_heldout_sets() -> None:
    train, held = noise.design(CANDS, 2, seed=3)
    assert set(itertools.combinations(CANDS, 1)) <= set(train)
    assert set(itertools.combinations(CANDS, 2)) <= set(train)
    assert any(len(c) >= 3 for c in train)
    assert held and not set(held) & set(train)


def test_degree_two_fit_recovers_a_quadratic_exactly() -> None:
    fit = noise.fit_noise(quadratic, CANDS, degree=2, seed=1)
    assert fit.heldout_error is not None and fit.heldout_error < 1e-12
    for conf in [(), (1,), (4, 9), (1, 4, 6, 9, 11)]:
        assert fit.predict(conf) == pytest.approx(quadratic(conf), abs=1e-12)
    assert fit.predict(()) == 0.0  # no constant: nothing int8, no noise


def test_held_out_error_reports_what_the_fit_misses() -> None:
    two = noise.fit_noise(with_triples, CANDS, degree=2, seed=1)
    three = noise.fit_noise(with_triples, CANDS, degree=3, seed=1)
    assert two.heldout_error is not None and two.heldout_error > 1e-4
    assert two.heldout_relative_error is not None and two.heldout_relative_error > 0
    assert three.heldout_error is not None and three.heldout_error < 1e-12


def test_bad_degree_is_one_line() -> None:
    with pytest.raises(UserError, match="degree 4"):
        noise.fit_noise(quadratic, CANDS, degree=4)


def test_fit_round_trips_through_json() -> None:
    fit = noise.fit_noise(quadratic, CANDS, degree=2)
    again = noise.NoiseFit.from_json(json.loads(json.dumps(fit.to_json())))
    assert again == fit


def test_cache_measures_once_per_key(tmp_path) -> None:
    calls = []

    def measure(conf: tuple[int, ...]) -> float:
        calls.append(conf)
        return quadratic(conf)

    key = {"sha256": "abc", "calibration": "def", "candidates": list(CANDS), "degree": 2}
    first, hit1 = noise.cached_fit(key, lambda: noise.fit_noise(measure, CANDS), tmp_path)
    n = len(calls)
    second, hit2 = noise.cached_fit(key, lambda: noise.fit_noise(measure, CANDS), tmp_path)
    assert (hit1, hit2) == (False, True) and len(calls) == n and first == second
    other, hit3 = noise.cached_fit({**key, "calibration": "xyz"},
                                   lambda: noise.fit_noise(measure, CANDS), tmp_path)
    assert not hit3 and len(calls) == 2 * n
    # a corrupt cache file is measured again, not trusted
    for path in tmp_path.iterdir():
        path.write_text("{not json")
    _, hit4 = noise.cached_fit(key, lambda: noise.fit_noise(measure, CANDS), tmp_path)
    assert not hit4
