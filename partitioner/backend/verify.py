"""Run a bundle's stages in a chain on this host and compare them with the whole model.

The chain is run exactly as the manifest says the devices will run it: stage ``i`` gets
only what stage ``i - 1`` sends (its ``outputs`` and ``forward`` lists), runs its ONNX file
on its ``inputs``, and sends its own lists on. So a wrong ``forward`` list fails here, not
on the devices.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from partitioner.backend.manifest import StageSpec, TensorSpec
from partitioner.errors import fail

__all__ = ["sample_inputs", "session", "run_chain", "compare", "TOLERANCE"]

# Largest accepted |chain - full| relative to the output's scale (max(1, max|full|)): the
# stages run the same kernels, only fusions across a cut may round differently.
TOLERANCE = 1e-4


def sample_inputs(specs: Sequence[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs: N(0, 1) floats; zeros/ones for integers (valid indices)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for t in specs:
        dt = np.dtype(t.dtype)
        if dt.kind == "f":
            feeds[t.name] = rng.standard_normal(t.shape).astype(dt)
        elif dt.kind == "b":
            feeds[t.name] = rng.integers(0, 2, t.shape).astype(bool)
        else:
            # Index-like integer inputs (token ids, positions) are only safe when small.
            feeds[t.name] = rng.integers(0, 2, t.shape).astype(dt)
    return feeds


def session(path: str | os.PathLike[str] | bytes, what: str, *, threads: int | None = None
            ) -> Any:
    """An ONNX Runtime CPU session; a model ORT rejects is a user error naming ``what``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        src = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types
        msg = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        fail(f"{what}: ONNX Runtime cannot load it: {msg}")


def run_chain(root: Path, stages: Sequence[StageSpec], feeds: Mapping[str, np.ndarray]
              ) -> dict[str, np.ndarray]:
    """Run ``stages`` hop by hop; returns what the last stage sends (the model outputs).

    One session is alive at a time, so verifying a large model needs the memory of its
    largest stage, not of all of them.
    """
    carried: dict[str, np.ndarray] = dict(feeds)
    for s in stages:
        sess = session(root / s.file, f"stage {s.id} ({s.file})")
        names = [o.name for o in sess.get_outputs()]
        missing = [t.name for t in s.inputs if t.name not in carried]
        if missing:
            fail(f"stage {s.id}: input {missing[0]!r} is not sent by the previous stage")
        produced = dict(zip(names, sess.run(names, {t.name: carried[t.name] for t in s.inputs}),
                            strict=True))
        del sess
        sent: dict[str, np.ndarray] = {}
        for t in s.outputs:
            sent[t.name] = produced[t.name]
        for t in s.forward:
            if t.name not in carried:
                fail(f"stage {s.id}: forwarded tensor {t.name!r} never reached it")
            sent[t.name] = carried[t.name]
        carried = sent
    return carried


def compare(full: Mapping[str, np.ndarray], chained: Mapping[str, np.ndarray]
            ) -> tuple[float, float, str | None]:
    """Max abs difference over the outputs, the worst relative one, and its output name."""
    worst_abs, worst_rel, worst_name = 0.0, 0.0, None
    for name, ref in full.items():
        if name not in chained:
            fail(f"model output {name!r} is not delivered by the last stage")
        got = chained[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            fail(f"model output {name!r}: chained stages give {got.dtype}{list(got.shape)}, "
                 f"the model {ref.dtype}{list(ref.shape)}")
        if ref.size == 0:
            continue
        if ref.dtype.kind in "fc":
            diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
            scale = max(1.0, float(np.max(np.abs(ref.astype(np.float64)))))
        else:
            diff = float(np.max(got != ref))
            scale = 1.0
        if not np.isfinite(diff):  # NaN in both is a match; NaN in one is a mismatch
            same = np.array_equal(got, ref, equal_nan=True)
            diff = 0.0 if same else float("inf")
        worst_abs = max(worst_abs, diff)
        if diff / scale >= worst_rel:
            worst_rel, worst_name = diff / scale, name
    return worst_abs, worst_rel, worst_name
