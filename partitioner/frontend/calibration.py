"""Calibration data for the int8 variants (QUANT): the ``--calibration FILE.npz`` format
(one array per model input, keyed by input name, with a leading sample axis), seeded
random data for when there is no file, and a digest that keys the variant caches."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from partitioner import ir
from partitioner.errors import fail

if TYPE_CHECKING:
    from partitioner.frontend import PreparedModel

__all__ = ["load_calibration", "random_calibration", "calibration_samples",
           "calibration_digest"]


def _inputs(model: PreparedModel | ir.LayerGraph) -> tuple[ir.TensorInfo, ...]:
    graph = model if isinstance(model, ir.LayerGraph) else model.graph
    return graph.inputs


def load_calibration(path: str | os.PathLike[str], model: PreparedModel | ir.LayerGraph
                     ) -> dict[str, np.ndarray]:
    """The ``--calibration FILE.npz`` arrays (the one loader: int8 variants and early-exit
    probabilities alike): one per model input, keyed by input name, with a leading sample
    axis (``images`` of shape ``(16, 1, 3, 320, 320)``). Other arrays (labels, say) are
    left out; a float array of another float width is converted.

    Raises:
        UserError: not a readable npz file (pickled objects are refused), a model input
            missing, a wrong shape or dtype, non-finite values, inputs with different
            sample counts, no sample.
    """
    file = Path(path)
    where = f"--calibration {file}"
    if not file.is_file():
        fail(f"{where}: no such file")
    try:
        with np.load(file, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                fail(f"{where}: cannot read it as .npz (one array per model input expected)")
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError) as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        fail(f"{where}: cannot read it as .npz: {why}")
    out: dict[str, np.ndarray] = {}
    for t in _inputs(model):
        arr = arrays.get(t.name)
        if arr is None:
            fail(f"{where}: no array for model input {t.name!r}")
        if arr.ndim != len(t.shape) + 1 or tuple(arr.shape[1:]) != tuple(t.shape):
            fail(f"{where}: input {t.name!r} has shape {list(arr.shape)}, expected "
                 f"(samples, {', '.join(str(d) for d in t.shape)})")
        if arr.dtype.name != t.dtype:
            if not (arr.dtype.kind == "f" and np.dtype(t.dtype).kind == "f"):
                fail(f"{where}: input {t.name!r} has dtype {arr.dtype.name}, expected "
                     f"{t.dtype}")
            arr = arr.astype(t.dtype)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            fail(f"{where}: input {t.name!r} holds non-finite values (NaN or inf)")
        out[t.name] = arr
    counts = {int(a.shape[0]) for a in out.values()}
    if len(counts) > 1:
        fail(f"{where}: the inputs have different sample counts {sorted(counts)}")
    if counts == {0}:
        fail(f"{where}: no samples (the leading axis is 0)")
    return out


def random_calibration(prepared: PreparedModel, n: int = 8, seed: int = 0
                       ) -> dict[str, np.ndarray]:
    """``n`` seeded random samples per input in the calibration format (floats N(0, 1),
    small integers for index-like inputs: :func:`partitioner.backend.verify.sample_inputs`).
    The caller warns that noise figures measured on them say little about real inputs."""
    from partitioner.backend.verify import sample_inputs

    if n < 1:
        fail(f"calibration: need at least one sample, got {n}")
    from stagebundle.manifest import TensorSpec

    stacked = [TensorSpec(t.name, (n, *t.shape), t.dtype) for t in _inputs(prepared)]
    return sample_inputs(stacked, seed)


def calibration_samples(arrays: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The calibration arrays as one feed dict per sample."""
    count = min((int(a.shape[0]) for a in arrays.values()), default=0)
    return [{k: np.ascontiguousarray(a[i]) for k, a in arrays.items()} for i in range(count)]


def calibration_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the calibration arrays."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()
