"""measure_int8: single-layer fp32 vs int8 times on this host, the additive rule's check."""

from __future__ import annotations

import pytest

from partitioner.analysis.int8_profile import measure_int8
from partitioner.analysis.profiler import ProfileSettings
from partitioner.frontend import load_model
from partitioner.frontend import quantize as Q


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path / "cache"))


def test_measure_int8_times_each_candidate_and_checks_mixed_bundles() -> None:
    import models

    prepared = load_model(models.build_model("tiny_cnn"))
    cands = Q.candidate_layers(prepared.graph, 3)
    cal = Q.random_calibration(prepared, n=2)
    m = measure_int8(prepared, cands, cal, ProfileSettings(runs=3, warmup=1, threads=1),
                     mixed=[(cands[0], cands[-1])])
    assert set(m.fp32) == set(m.int8) == set(cands)
    assert all(t > 0 for t in (*m.fp32.values(), *m.int8.values()))
    assert m.savings == {k: m.fp32[k] - m.int8[k] for k in cands}
    (first, last, inside, t32, t8, additive), = m.mixed
    assert (first, last) == (cands[0], cands[-1]) and inside == cands
    assert t32 > 0 and t8 > 0
    assert additive == pytest.approx(t32 - sum(m.savings.values()))
    assert m.mixed_error == pytest.approx(abs(t8 - additive) / t8)
    assert m.threads == 1
