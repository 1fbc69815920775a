"""Time int8 variants of candidate layers on this host (QUANT, per-layer quantisation).

Per candidate layer, the single-layer bundle is timed in the fp32 model and in the
variant with only that layer quantised (ORT's QDQ graph,
:mod:`partitioner.frontend.quantize`), with the profiler's timer
(:class:`partitioner.analysis.profiler.BundleTimer`); their ratio is the layer's int8
speed-up. The planner prices a bundle as its fp32 price minus the savings of its int8
layers (additive); to measure the error of that assumption, mixed bundles (several
candidates, some other layers) are timed in the variant with every candidate quantised
and compared with the additive prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from partitioner.analysis.profiler import (
    BundleTimer,
    ProfileSettings,
    capture_intermediates,
    sample_inputs,
)

__all__ = ["Int8Measurement", "measure_int8"]


@dataclass(frozen=True)
class Int8Measurement:
    """Single-layer fp32 and int8 times of candidate layers on this host, and the check
    of the additive rule on mixed bundles.

    Attributes:
        threads: ORT intra-op threads of the measurement (the device it stands for).
        fp32 / int8: per candidate, the single-layer latency, s.
        mixed: ``(first, last, int8 layers, fp32 measured, int8 measured, additive)``:
            the bundle timed fp32 and with its candidates int8, and the additive
            prediction ``fp32 - sum of their single-layer savings``.
    """

    threads: int | None
    fp32: Mapping[int, float]
    int8: Mapping[int, float]
    mixed: tuple[tuple[int, int, tuple[int, ...], float, float, float], ...] = ()

    @property
    def savings(self) -> dict[int, float]:
        """Seconds saved per candidate (negative: its int8 variant is slower here)."""
        return {k: self.fp32[k] - self.int8[k] for k in self.fp32}

    @property
    def speedups(self) -> dict[int, float]:
        """fp32 / int8 time per candidate (below 1: its int8 variant is slower here)."""
        return {k: self.fp32[k] / self.int8[k] for k in self.fp32}

    @property
    def mixed_error(self) -> float | None:
        """Mean |measured - additive| / measured over the mixed bundles."""
        if not self.mixed:
            return None
        return float(np.mean([abs(m - p) / m for *_, m, p in self.mixed if m > 0]))


def measure_int8(prepared: Any, candidates: Sequence[int],
                 calibration: Mapping[str, np.ndarray], settings: ProfileSettings, *,
                 inputs: Mapping[str, np.ndarray] | None = None,
                 mixed: Sequence[tuple[int, int]] = ()) -> Int8Measurement:
    """Time each candidate fp32 and int8 (alone), and ``mixed`` bundles (see the class).

    Args:
        prepared: the front end's model.
        candidates: the candidate layers.
        calibration: the quantiser's calibration arrays (the same the planner uses).
        settings: runs, warm-up, trim, threads.
        inputs: model inputs to feed (default: seeded random, :func:`sample_inputs`).
        mixed: ``(first, last)`` bundles to check the additive rule on.
    """
    from partitioner.frontend import quantize as quant

    settings.check()
    feeds = dict(inputs) if inputs is not None else sample_inputs(prepared.graph)
    cands = tuple(sorted(set(candidates)))

    def timed(model: Any, spans: Sequence[tuple[int, int]]) -> list[float]:
        captured = capture_intermediates(model, feeds, settings.threads)
        with BundleTimer(model, captured, settings) as timer:
            return [timer.measure(a, b).latency for a, b in spans]

    spans = [(k, k) for k in cands] + list(mixed)
    base = timed(prepared, spans)
    fp32 = dict(zip(cands, base[:len(cands)], strict=True))
    int8 = {k: timed(quant.quantize_model(prepared, [k], calibration).prepared, [(k, k)])[0]
            for k in cands}
    rows = []
    if mixed:
        whole = quant.quantize_model(prepared, cands, calibration).prepared
        for (a, b), t32, t8 in zip(mixed, base[len(cands):], timed(whole, mixed),
                                   strict=True):
            inside = tuple(k for k in cands if a <= k <= b)
            additive = t32 - sum(fp32[k] - int8[k] for k in inside)
            rows.append((a, b, inside, t32, t8, additive))
    return Int8Measurement(settings.threads, fp32, int8, tuple(rows))
