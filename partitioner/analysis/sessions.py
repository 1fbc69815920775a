"""How the profiler opens bundles' ONNX Runtime sessions (split from the profiler).

* :func:`open_session`: a session of a (sub-)model, with inline or external weights;
* :class:`SharedWeights`: the model's weights written once to one file, so that every
  bundle's session maps them instead of copying (issue 16);
* :func:`reuse_freed_memory`: glibc keeps freed memory, so each bundle's pre-packed weights
  reuse its predecessor's pages.

All sessions run on the CPU execution provider the way ``runtime serve`` runs a stage
(sequential execution, idle threads do not spin).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import platform
import re
import sys
import tempfile
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn

import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from partitioner.errors import fail
from partitioner.ir import LayerGraph

__all__ = ["open_session", "SharedWeights", "reuse_freed_memory", "ORT_ERRORS", "ort_failure"]

# What ONNX Runtime raises for a model it cannot load or run (its own types, not
# RuntimeError): a user error naming the model, never a traceback.
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    e for e in (getattr(_ort_state, n, None) for n in (
        "Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError",
        "RuntimeException", "InvalidProtobuf", "ModelLoaded", "NotImplemented",
        "InvalidGraph", "EPFail"))
    if isinstance(e, type) and issubclass(e, Exception))
# Noise in ORT's messages: the temporary file it read, and the C++ function that failed.
_TEMP_PATH = re.compile(r"Load model from \S+ failed:\s*")
_CXX_WHERE = re.compile(r"/onnxruntime_src/\S+:\d+ .*?\) (?=[A-Z])")


def ort_failure(err: Exception, what: str, doing: str = "load") -> NoReturn:
    """Fail with ORT's first line: ``what: ONNX Runtime cannot load it: ...``."""
    text = _CXX_WHERE.sub("", _TEMP_PATH.sub("", str(err).strip()), count=1)
    first = text.splitlines()[0] if text else type(err).__name__
    fail(f"{what}: ONNX Runtime cannot {doing} it: {first}")


def _ort_session(src: str | bytes, opts: ort.SessionOptions, what: str
                 ) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as err:
        ort_failure(err, what)


def _what(model: onnx.ModelProto, what: str | None) -> str:
    return what or f"model {model.graph.name or 'model'!r}"


def _session_options(threads: int | None, prepack: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    # Measure a bundle the way `runtime serve` runs it: idle threads do not spin.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        opts.intra_op_num_threads = threads
    if not prepack:
        # For a session run once whose timing nobody reads: ORT then skips re-laying out
        # the weights for its kernels (most of opening one; same results to ~1e-6).
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts


class SharedWeights:
    """The prepared model with its weights written once to one file, for cheap bundles.

    ``prepared`` is the model whose initialisers (1 KB and larger) are references into
    ``weights.bin`` in a private temporary folder (offsets page-aligned, so ONNX Runtime
    can map them instead of reading them); sub-models extracted from it carry references,
    not bytes. The folder is in ``/dev/shm`` when that has room (the file then never waits
    for a disk), else in the system's temporary folder; it is removed by :meth:`close` (or
    when this object is collected).

    Raises:
        UserError: the folder cannot be written (naming it and why).
    """

    def __init__(self, prepared: Any) -> None:
        from partitioner.frontend.slicing import save_model

        self._names = itertools.count()
        base_dir = getattr(prepared, "base_dir", None)
        for where in _weight_folders(_weight_bytes(prepared.model)):
            self._tmp = tempfile.TemporaryDirectory(prefix="partitioner-profile-", dir=where)
            self._cleanup = weakref.finalize(self, self._tmp.cleanup)
            self.folder = Path(self._tmp.name)
            try:
                save_model(prepared.model, self.folder / "model.onnx", base_dir=base_dir,
                           external_data="weights.bin")
                break
            except OSError as err:
                self.close()
                if where is None:  # the last resort failed too
                    fail(f"{self.folder}: cannot write the profiler's copy of the weights: "
                         f"{err.strerror or err}")
        model = onnx.load(str(self.folder / "model.onnx"), load_external_data=False)
        if dataclasses.is_dataclass(prepared) and not isinstance(prepared, type):
            self.prepared: Any = replace(prepared, model=model, base_dir=self.folder)
        else:  # any object with model / graph / base_dir (what extract_layers reads)
            self.prepared = _Prepared(model, prepared.graph, self.folder)

    def session(self, model: onnx.ModelProto, threads: int | None, *, prepack: bool = True,
                what: str | None = None) -> ort.InferenceSession:
        """An ORT session of ``model`` (references into ``weights.bin``, or inline);
        ``prepack=False`` for one run whose timing does not count (opens faster). A model
        ORT rejects is a user error naming ``what`` (default: the model's graph name)."""
        # The proto is small (weights are references); ORT reads it from a file so that
        # it resolves the references against this folder. The file is not needed after.
        path = self.folder / f"bundle{next(self._names)}.onnx"
        path.write_bytes(model.SerializeToString())
        try:
            return _ort_session(str(path), _session_options(threads, prepack),
                                _what(model, what))
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the folder (open sessions keep their mapped weights)."""
        self._cleanup()


def _weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's weights: the proto's own plus its external data."""
    external = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            fields = {e.key: e.value for e in t.external_data}
            external += int(fields.get("length", 0) or 0)
    return model.ByteSize() + external


def _weight_folders(size: int) -> list[str | None]:
    """Where to put the weight file, best first (None: the system's temporary folder)."""
    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        # room for the file twice over (other users of shared memory) and some slack
        if os.access(shm, os.W_OK) and st.f_bavail * st.f_frsize > 2 * size + (64 << 20):
            return [str(shm), None]
    except OSError:
        pass
    return [None]


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the system.

    Every bundle's session allocates its pre-packed weights afresh and frees them when
    the next bundle opens; by default glibc maps each large block anew and unmaps it on
    free, so every bundle pays page faults on fresh memory for its whole weights (most of
    a bundle's set-up on AlexNet). With the thresholds raised the next bundle reuses the
    same pages. Kernels and their data are unchanged (the same 4 KiB anonymous pages), so
    timings are not; the process keeps its peak memory until it exits. Threads share the
    one heap (a thread's own glibc arena holds at most 64 MiB blocks, and a bundle opened
    ahead on the opening thread would map its big weights afresh). Returns False where
    this is not glibc (nothing is changed).
    """
    import ctypes
    import ctypes.util

    if sys.platform != "linux" or not platform.libc_ver()[0] == "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # from <malloc.h>
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
    ok = libc.mallopt(m_arena_max, 1) == 1 and ok
    return libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1 and ok


@dataclass(frozen=True)
class _Prepared:
    model: onnx.ModelProto
    graph: LayerGraph
    base_dir: Path | None


def open_session(model: onnx.ModelProto, threads: int | None,
                 base_dir: Path | None = None, *, prepack: bool = True,
                 what: str | None = None) -> ort.InferenceSession:
    """An ORT session of ``model`` (weights inline, or external files under ``base_dir``);
    ``prepack=False`` for one run whose timing does not count (opens faster). A model ORT
    rejects is a user error naming ``what`` (default: the model's graph name)."""
    from partitioner.frontend.slicing import save_model, uses_external_data

    opts = _session_options(threads, prepack)
    if not uses_external_data(model):
        return _ort_session(model.SerializeToString(), opts, _what(model, what))
    # External weights: write a self-contained copy and let ORT map it from disk.
    with tempfile.TemporaryDirectory(prefix="partitioner-profile-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, base_dir=base_dir, external_data="model.onnx.data")
        return _ort_session(str(path), opts, _what(model, what))
