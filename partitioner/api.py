"""The Python API: the whole compiler pipeline in two calls.

>>> from partitioner import api
>>> result = api.plan("alexnet.onnx", "edge-hub-cloud.toml")          # doctest: +SKIP
>>> print(result.plan.to_json()["stages"])                             # doctest: +SKIP
>>> api.compile("alexnet.onnx", "edge-hub-cloud.toml", "bundle/")      # doctest: +SKIP

``model`` is an ``.onnx`` path, a ``torch.nn.Module`` (give ``example_inputs``) or a
:class:`partitioner.frontend.PreparedModel`; ``system`` is a system file path or an
:class:`partitioner.ir.System`. Both calls run :mod:`partitioner.pipeline` (front end ->
analysis (system, profiles, cost table) -> solver -> back end), the sequence the CLI, lazy
profiling and the runtime's fail-over run too. Each stage is also importable on its own
(see the README). ``api.plan`` *is* :func:`partitioner.pipeline.plan`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from partitioner import ir, pipeline
from partitioner.pipeline import PlanResult, plan

if TYPE_CHECKING:
    from partitioner.frontend import PreparedModel

__all__ = ["PlanResult", "plan", "compile"]


def compile(model: str | Path | PreparedModel | Any,  # noqa: A001
            system: str | Path | ir.System, out_dir: str | Path, *, verify: bool = True,
            force: bool = False, triton: bool = False, **plan_options: Any) -> Path:
    """:func:`plan`, then write the deployment bundle to ``out_dir``.

    :func:`partitioner.pipeline.compile`, returning only the bundle directory.

    Args:
        model / system: as for :func:`plan`.
        out_dir: bundle directory (must not exist or be empty unless ``force``).
        verify: run the chained stages against the whole model before finishing.
        force: replace a non-empty ``out_dir``.
        triton: also write a Triton model repository per device.
        **plan_options: the keyword arguments of :func:`plan`.

    Returns:
        The bundle directory.
    """
    result = pipeline.compile(model, system, out_dir, verify=verify, force=force,
                              triton=triton, **plan_options)
    assert result.bundle is not None
    return result.bundle
