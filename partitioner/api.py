"""The Python API: the whole compiler pipeline in two calls.

>>> from partitioner import api
>>> result = api.plan("alexnet.onnx", "edge-hub-cloud.toml")          # doctest: +SKIP
>>> print(result.plan.to_json()["stages"])                             # doctest: +SKIP
>>> api.compile("alexnet.onnx", "edge-hub-cloud.toml", "bundle/")      # doctest: +SKIP

``model`` is an ``.onnx`` path or a ``torch.nn.Module`` (give ``example_inputs``);
``system`` is a system file path or an :class:`partitioner.ir.System`.
The stages run in order: front end -> analysis (system, profiles, cost table) -> solver ->
back end. Each stage is also importable on its own (see the README).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partitioner import ir

__all__ = ["PlanResult", "plan", "compile"]


@dataclass(frozen=True)
class PlanResult:
    """What :func:`plan` produced, stage by stage.

    Attributes:
        prepared: the front end's ``PreparedModel`` (ONNX model and layer graph).
        system: the validated system.
        table: the priced extended chain the solver saw.
        plan: the chosen plan.
    """

    prepared: Any
    system: ir.System
    table: ir.CostTable
    plan: ir.Plan


def plan(model: str | Path | Any, system: str | Path | ir.System, *,
         profiles: Sequence[str | Path] = (), shapes: Mapping[str, tuple[int, ...]] | None = None,
         granularity: str = "major", objective: ir.Objective | None = None,
         mbs: int | None = None, preload: bool = True, private: int = 0,
         example_inputs: Any = None) -> PlanResult:
    """Load a model, price it on a system and solve for the best plan.

    Args:
        model: ``.onnx`` path or PyTorch module.
        system: system file (TOML/JSON) or a loaded :class:`ir.System`.
        profiles: profile files (``partitioner profile -o``); a device with a profile is
            priced from it, the others analytically.
        shapes: static dims for dynamic inputs.
        granularity: ``"major"`` or ``"node"``.
        objective: objective and caps (default: minimise latency).
        mbs: maximum bundle size (default: all layers).
        preload: model weight preloading (ODIWeP).
        private: the first ``private`` layers run only on trusted devices.
        example_inputs: ``forward`` arguments when ``model`` is a PyTorch module.

    Raises:
        UserError: bad model, system or profile; InfeasibleError when no plan meets the caps.
    """
    from partitioner.analysis.costs import build_cost_table
    from partitioner.analysis.profiles import load_profile
    from partitioner.analysis.system import load_system
    from partitioner.frontend import load_model
    from partitioner.solver import solve

    prepared = load_model(model, shapes=shapes, granularity=granularity,
                          example_inputs=example_inputs)
    sys_ = system if isinstance(system, ir.System) else load_system(system)
    loaded = [load_profile(p, prepared.graph) for p in profiles]
    table = build_cost_table(prepared.graph, sys_, profiles=loaded, mbs=mbs, preload=preload,
                             private=private)
    return PlanResult(prepared, sys_, table, solve(table, objective or ir.Objective()))


def compile(model: str | Path | Any, system: str | Path | ir.System,  # noqa: A001
            out_dir: str | Path, *, verify: bool = True, force: bool = False,
            triton: bool = False, **plan_options: Any) -> Path:
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
    from partitioner.backend import compile_bundle

    result = plan(model, system, **plan_options)
    return compile_bundle(result.prepared, result.plan, result.system, out_dir, verify=verify,
                          force=force, triton=triton, table=result.table)
