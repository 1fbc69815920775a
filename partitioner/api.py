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
(see the README).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from partitioner import ir, pipeline
from partitioner.pipeline import PlanResult

if TYPE_CHECKING:
    from partitioner.analysis.profiles import Profile
    from partitioner.frontend import PreparedModel

__all__ = ["PlanResult", "plan", "compile"]


def plan(model: str | Path | PreparedModel | Any, system: str | Path | ir.System, *,
         profiles: Sequence[str | Path | Profile] = (),
         shapes: Mapping[str, tuple[int, ...]] | None = None, granularity: str = "major",
         objective: ir.Objective | None = None, mbs: int | None = None,
         preload: bool = True, private: int = 0, example_inputs: Any = None) -> PlanResult:
    """Load a model, price it on a system and solve for the best plan.

    Args:
        model: ``.onnx`` path, PyTorch module or :class:`PreparedModel`.
        system: system file (TOML/JSON) or a loaded :class:`ir.System`.
        profiles: profile files (``partitioner profile -o``) or loaded profiles; a device
            with a profile is priced from it, the others analytically.
        shapes: static dims for dynamic inputs.
        granularity: ``"major"`` or ``"node"``.
        objective: objective and caps (default: minimise latency).
        mbs: maximum bundle size (default: the cost table's choice).
        preload: model weight preloading (ODIWeP).
        private: the first ``private`` layers run only on trusted devices.
        example_inputs: ``forward`` arguments when ``model`` is a PyTorch module.

    Raises:
        UserError: bad model, system or profile; InfeasibleError when no plan meets the caps.
    """
    return pipeline.plan(model, system, profiles=profiles, shapes=shapes,
                         granularity=granularity, objective=objective, mbs=mbs,
                         preload=preload, private=private, example_inputs=example_inputs)


def compile(model: str | Path | PreparedModel | Any,  # noqa: A001
            system: str | Path | ir.System, out_dir: str | Path, *, verify: bool = True,
            force: bool = False, triton: bool = False, **plan_options: Any) -> Path:
    """:func:`plan`, then write the deployment bundle to ``out_dir``.

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
