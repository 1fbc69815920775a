"""Run a bundle's units on this host and compare them with the whole model.

The bundle is run exactly as the manifest says the devices will run it
(:func:`stagebundle.graph.run_graph`): each unit gets only what its senders' ``sends``
carry, runs its ONNX file, and sends its own. So a wrong send fails here, not on the
devices.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from partitioner.backend.manifest import Bundle, StageSpec, TensorSpec, Unit, load_bundle
from partitioner.errors import fail
from stagebundle.graph import run_graph

__all__ = ["sample_inputs", "session", "run_bundle", "check_units_load", "run_chain",
           "compare", "TOLERANCE", "release_freed_memory"]

_T = TypeVar("_T")

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
    # Pre-packing stays on although it costs memory (+335 MB verifying vgg16,
    # benchmarks/compile_memory.py): without it ORT picks other GEMM kernels, and the
    # verification would no longer compute bit for bit what the runtime's sessions compute.
    if threads:
        opts.intra_op_num_threads = threads
    try:
        src = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types
        msg = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        fail(f"{what}: ONNX Runtime cannot load it: {msg}")


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """Hand the heap memory a closed session freed back to the OS (glibc only).

    glibc keeps freed heap pages for reuse (ONNX Runtime's buffers of up to 32 MiB come
    from the heap once its mmap threshold has grown), and the next session's peak would
    stack on them: +110 MiB verifying vgg16 (benchmarks/compile_memory.py). A no-op where
    the C library has no ``malloc_trim``.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def run_bundle(bundle: Bundle, feeds: Mapping[str, np.ndarray], *,
               scratch: Path | None = None) -> dict[str, np.ndarray]:
    """Run every unit of ``bundle`` in this process with the stage graph's message rules
    (:func:`stagebundle.graph.run_graph`, what the runtime obeys); the model outputs.

    One session is alive at a time, so verifying a large model needs the memory of its
    largest unit, not of all of them. With ``scratch`` (a folder), a unit whose file holds
    big inline weights is opened through an external-data view of that file (see
    :func:`_unit_source`).
    """
    def run(unit: Unit, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        def outputs(sess: Any) -> dict[str, np.ndarray]:
            names = [o.name for o in sess.get_outputs()]
            return dict(zip(names, sess.run(names, dict(inputs)), strict=True))

        return _in_session(bundle, unit, scratch, outputs)

    return run_graph(bundle, feeds, run)


def check_units_load(bundle: Bundle, scratch: Path) -> None:
    """Open every unit of ``bundle`` in ONNX Runtime, one at a time, as verification does
    (big inline weights through the same external-data view in ``scratch``): the load
    check of ``--no-verify``, at no more memory than verification's own sessions."""
    release_freed_memory()  # the buffers of writing the units
    for unit in bundle.units():
        _in_session(bundle, unit, scratch, lambda sess: None)


def _in_session(bundle: Bundle, unit: Unit, scratch: Path | None,
                use: Callable[[Any], _T]) -> _T:
    """``use(session)`` of ``unit``'s ONNX Runtime session (opened as :func:`_unit_source`
    says); the session is closed and its freed heap handed back before this returns."""
    with _unit_source(bundle.unit_path(unit), scratch) as path:
        sess = session(path, f"stage {unit.key} ({unit.file})")
        result = use(sess)
        del sess
    release_freed_memory()
    return result


@contextlib.contextmanager
def _unit_source(path: Path, scratch: Path | None) -> Iterator[Path]:
    """The file ONNX Runtime opens for the unit at ``path``.

    The unit file itself, unless ``scratch`` is given and the file holds inline weights
    above :data:`~partitioner.frontend.inline_weights.LAZY_MIN_BYTES`: then a view of it in
    ``scratch``, its graph as read from the file and every such weight's bytes copied from
    the file into an external-data file. ORT memory-maps external data instead of parsing
    it with the graph, which spares ~60 MiB of the peak on vgg16's 517 MiB second half
    (issue 16); the graph, the weights and the kernels ORT picks are the same, so the
    outputs are bit for bit those of the file (tests/test_inline_weights.py).
    """
    from partitioner.frontend.inline_weights import is_inline_ref, read_model
    from partitioner.frontend.stagefile import save_model

    model = None if scratch is None else read_model(path, lazy=True)
    if model is None or not any(is_inline_ref(t) for t in model.graph.initializer):
        yield path
        return
    work = Path(tempfile.mkdtemp(prefix=".unit-", dir=scratch))
    try:
        view = work / path.name
        save_model(model, view, base_dir=path.parent, external_data=path.name + ".data")
        del model
        yield view
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_chain(root: Path, stages: Sequence[StageSpec], feeds: Mapping[str, np.ndarray]
              ) -> dict[str, np.ndarray]:
    """The bundle at ``root`` run by :func:`run_bundle` (the schema-1 era entry point;
    ``stages`` must be the bundle's own)."""
    bundle = load_bundle(root)
    if [s.id for s in stages] != [s.id for s in bundle.stages]:
        fail(f"{root}: run_chain was given stages that are not the bundle's")
    return run_bundle(bundle, feeds)


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
