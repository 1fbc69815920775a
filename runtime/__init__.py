"""Runtime: workers that serve the units of a stage graph and executors that drive them.

``runtime serve`` (:mod:`runtime.worker`) serves one device's units (whole stages and row
parts) of a compiled bundle; ``runtime run`` (:mod:`runtime.executor`) runs a bundle in one
process or across workers. The runtime imports only :mod:`stagebundle` (the bundle
schema and its message mechanics), numpy and onnxruntime; the compiler is imported only
to re-plan on demand (:mod:`runtime.replan`).
From Python::

    from runtime import LocalExecutor, RemoteExecutor
    outputs = LocalExecutor("bundle/").infer({"input": x})
    with RemoteExecutor("bundle/", {"edge": "10.0.0.2:7000", ...}, token=tok) as ex:
        outputs = ex.infer({"input": x})          # or ex.submit(...) for pipelining

Names are imported lazily so ``import runtime`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["LocalExecutor", "RemoteExecutor", "RequestError", "Worker", "Replanner",
           "compile_fallbacks"]

_WHERE = {"LocalExecutor": "runtime.executor", "RemoteExecutor": "runtime.executor",
          "RequestError": "runtime.executor", "Worker": "runtime.worker",
          "Replanner": "runtime.replan", "compile_fallbacks": "runtime.replan"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
