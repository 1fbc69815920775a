"""Compiler stage: backend (deployment bundles, their manifest, ``explain``, Triton).

``compile_bundle`` is imported lazily so that ``partitioner.backend.manifest`` (used by the
runtime) does not pull in ONNX and the slicer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["compile_bundle", "load_bundle"]


def __getattr__(name: str) -> Any:
    if name == "compile_bundle":
        from partitioner.backend.emit import compile_bundle

        return compile_bundle
    if name == "load_bundle":
        from partitioner.backend.manifest import load_bundle

        return load_bundle
    raise AttributeError(name)
