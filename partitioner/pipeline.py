"""The one compiler sequence: load -> system -> profiles -> cost table -> solve -> bundle.

Every caller runs it from here, so there is one copy: the Python API
(:mod:`partitioner.api`), the CLI (``partitioner plan`` / ``compile`` / ``demo``), lazy
profiling (which gets :func:`planner` as a callable and never imports the solver) and the
runtime's fail-over (:func:`replan`, behind :mod:`runtime.replan`).

* :func:`plan`: the model (a path, a PyTorch module or an already
  :class:`~partitioner.frontend.PreparedModel`), a system (a file or an :class:`ir.System`)
  and profiles (files or loaded :class:`~partitioner.analysis.profiles.Profile`) in, a
  :class:`PlanResult` out;
* :func:`compile`: :func:`plan`, then the bundle directory;
* :func:`replan`: the plan of a compiled bundle again, on the system without some lost
  devices, written as the fallback bundle ``BUNDLE/fallback/without-<lost>``;
* :func:`bundle_context`, :func:`solve_on`, :func:`write_plan`: live adaptation
  (:mod:`runtime.adapt`) prices a bundle's plan on a calibrated cost table, solves on that
  table and writes the new plan's bundle, with the same steps as :func:`plan`.

Heavy dependencies (onnx, mip) are imported inside the functions, so importing this module
is cheap.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from partitioner import ir
from partitioner.analysis.routing import route_plan
from partitioner.errors import UserError, fail

if TYPE_CHECKING:
    from partitioner.analysis.profiles import Profile
    from partitioner.analysis.variants import QuantSetup
    from partitioner.frontend import PreparedModel

__all__ = ["PlanResult", "plan", "compile", "replan", "planner", "system_without",
           "fallback_name", "FALLBACK_DIR", "bundle_context", "solve_on", "write_plan"]

log = logging.getLogger("partitioner.pipeline")

# Fallback bundles live inside the main bundle (runtime.replan says why).
FALLBACK_DIR = "fallback"


@dataclass(frozen=True)
class PlanResult:
    """What :func:`plan` (and :func:`compile`) produced, stage by stage.

    Attributes:
        prepared: the front end's model (ONNX model and layer graph).
        system: the validated system the plan was solved for.
        table: the priced extended chain the solver saw.
        plan: the chosen plan.
        objective: the objective and caps it was solved with.
        bundle: the bundle directory, once :func:`compile` wrote it.
        quant: what ``quantize=True`` measured (candidates, calibration, noise fit).
    """

    prepared: PreparedModel
    system: ir.System
    table: ir.CostTable
    plan: ir.Plan
    objective: ir.Objective = dataclasses.field(default_factory=ir.Objective)
    bundle: Path | None = None
    quant: QuantSetup | None = None


def planner(objective: ir.Objective | None = None) -> Callable[[ir.CostTable], ir.Plan]:
    """The solver as a callable ``table -> plan`` for ``objective`` (default: latency).

    Lazy profiling takes this, so that the analysis stage never imports the solver.
    """
    from partitioner.solver import solve

    chosen = objective or ir.Objective()

    def solve_table(table: ir.CostTable) -> ir.Plan:
        return solve(table, chosen)

    return solve_table


def _load_system(system: str | Path | ir.System) -> ir.System:
    if isinstance(system, ir.System):
        return system
    from partitioner.analysis.system import load_system

    return load_system(system)


def _prepare(model: Any, shapes: Mapping[str, tuple[int, ...]] | None, granularity: str,
             example_inputs: Any, lazy_weights: bool = False) -> PreparedModel:
    from partitioner.frontend import PreparedModel, load_model

    if isinstance(model, PreparedModel):
        return model
    return load_model(model, shapes=shapes, granularity=granularity,
                      example_inputs=example_inputs, lazy_weights=lazy_weights)


def _profiles(profiles: Sequence[str | Path | Profile], graph: ir.LayerGraph
              ) -> list[Profile]:
    from partitioner.analysis.profiles import Profile, load_profile

    # Loaded profiles are checked against the graph by the cost table, files here.
    return [p if isinstance(p, Profile) else load_profile(p, graph) for p in profiles]


def plan(model: str | Path | PreparedModel | Any, system: str | Path | ir.System, *,
         profiles: Sequence[str | Path | Profile] = (),
         shapes: Mapping[str, tuple[int, ...]] | None = None, granularity: str = "major",
         objective: ir.Objective | None = None, mbs: int | None = None,
         preload: bool = True, private: int = 0, example_inputs: Any = None,
         exits: Sequence[Any] = (), calibration: Any = None,
         spatial: bool = False, max_parts: int | None = None,
         spatial_baseline: str | None = None,
         quantize: bool = False, quantize_layers: int | str | Sequence[str] | None = None,
         max_noise: float | None = None,
         int8_speedups: Mapping[tuple[int, str, str | None], float] | None = None,
         lazy_weights: bool = False) -> PlanResult:
    """Load a model, price it on a system and solve for the best plan.

    Args:
        model: ``.onnx`` path, PyTorch module (give ``example_inputs``) or a
            :class:`PreparedModel` (then ``shapes``, ``granularity`` and
            ``example_inputs`` are not used).
        system: system file (TOML/JSON) or a loaded :class:`ir.System`; loaded first, so
            a bad system file fails before the (slower) model load.
        profiles: profile files (``partitioner profile -o``) or loaded profiles; a device
            with a profile is priced from it, the others analytically.
        shapes: static dims for dynamic inputs.
        granularity: ``"major"`` or ``"node"``.
        objective: objective and caps (default: minimise latency).
        mbs: maximum bundle size (default: chosen by the cost table).
        preload: model weight preloading (ODIWeP).
        private: the first ``private`` layers run only on trusted devices.
        example_inputs: ``forward`` arguments when ``model`` is a PyTorch module.
        exits: early-exit heads, ``"OUTPUT=P"`` / ``"OUTPUT@T"`` strings or
            :class:`~partitioner.frontend.exits.ExitSpec` (docs/EXITS.md).
        calibration: ``.npz`` inputs that measure the probability of ``OUTPUT@T`` heads,
            and calibrate the int8 variants and measure their noise (``quantize``; loaded
            arrays are accepted there; None: seeded random data, the noise figures are
            then meaningless).
        quantize: the solver may run candidate layers as int8 variants (QUANT).
        quantize_layers: the candidates: K heaviest layers, or names (default 12).
        max_noise: cap on the fitted output noise (0: nothing int8); overrides the
            objective's ``max_noise``.
        int8_speedups: measured int8 speed-up (fp32 / int8 time) per ``(layer, device,
            frequency)`` (:func:`partitioner.analysis.int8_profile.measure_int8`); without
            one a device's is analytic (its class's int8 speed-up).
        spatial: runs of row-splittable layers may be split by rows across devices
            (DISTREDGE; :mod:`partitioner.solver.spatial`).
        max_parts: the most parts of one split stage (default: every device).
        spatial_baseline: plan by one of DISTREDGE's baselines instead
            (:mod:`partitioner.solver.spatial_baselines`).
        lazy_weights: an ``.onnx`` model's big inline weights stay in its file
            (:func:`~partitioner.frontend.load_model`); :func:`compile` sets it.

    Raises:
        UserError: bad model, system or profile; InfeasibleError when no plan meets the caps.
    """
    from partitioner.analysis.costs import build_cost_table
    from partitioner.analysis.row_profile import with_row_profiles

    if mbs is not None and mbs < 1:
        fail(f"--mbs must be >= 1, got {mbs}")
    objective = objective or ir.Objective()
    if not quantize:
        for given, flag in ((max_noise, "--max-noise"), (quantize_layers, "--quantize-layers")):
            if given is not None:
                fail(f"{flag} needs --quantize")
    if max_noise is not None:
        objective = dataclasses.replace(objective, max_noise=max_noise)
    if objective.max_noise is not None and not objective.max_noise >= 0:
        fail(f"--max-noise {objective.max_noise}: must be >= 0")
    loaded_system = _load_system(system)
    prepared = _prepare(model, shapes, granularity, example_inputs, lazy_weights)
    heads: tuple[Any, ...] = ()
    if exits:
        from partitioner.frontend.exits import resolve_exits

        prepared, heads = resolve_exits(prepared, exits, calibration)
    loaded_profiles = _profiles(profiles, prepared.graph)
    table = build_cost_table(prepared.graph, loaded_system, profiles=loaded_profiles,
                             mbs=mbs, preload=preload, private=private)
    table = with_row_profiles(table, prepared.graph, loaded_profiles)  # profile --spatial
    if heads:
        from partitioner.analysis.exits import with_exits

        table = with_exits(table, prepared.graph, [(h.head, h.layer) for h in heads])
    spatial_asked = spatial or spatial_baseline is not None or max_parts is not None
    if heads and spatial_asked:
        fail("--spatial and --exit cannot be combined (the spatial planner prices no "
             "exit heads)")
    if quantize and spatial_asked:
        fail("--spatial and --quantize cannot be combined (a split stage holds no int8 "
             "layer)")
    setup = None
    if quantize:
        from partitioner.analysis.variants import attach_variants

        table, setup = attach_variants(
            prepared, table, layers=12 if quantize_layers is None else quantize_layers,
            calibration=calibration, fit_noise_model=objective.max_noise != 0,
            measured=int8_speedups)
    if setup is not None and objective.max_noise:
        from partitioner.analysis.variants import check_noise

        # the chosen int8 set measured, the fit refitted, solved again (QUANT noise cap)
        solve_table = planner(objective)
        unrouted, table, setup = check_noise(prepared, table, setup, solve_table(table),
                                             solve_table)
        chosen = route_plan(prepared.graph, table, unrouted)
    else:
        chosen = _solve(prepared.graph, table, objective, spatial=spatial,
                        max_parts=max_parts, spatial_baseline=spatial_baseline)
    if heads:  # nothing may skip an exit stage; expected and worst case re-priced
        from partitioner.analysis.exits import route_exits

        chosen = route_exits(prepared.graph, table, chosen)
    return PlanResult(prepared, loaded_system, table, chosen, objective, quant=setup)


def _solve(graph: ir.LayerGraph, table: ir.CostTable, objective: ir.Objective, *,
           spatial: bool = False, max_parts: int | None = None,
           spatial_baseline: str | None = None) -> ir.Plan:
    if spatial or spatial_baseline or max_parts is not None:
        from partitioner.solver.spatial_entry import spatial_plan

        chosen = spatial_plan(graph, table, objective, max_parts=max_parts,
                              baseline=spatial_baseline, spatial=spatial)
    else:
        chosen = planner(objective)(table)
    # Routing, once, before anything reads the plan (compile(), replan() and live
    # adaptation all plan through here): direct sends where they are cheaper, the
    # estimate re-priced.
    return route_plan(graph, table, chosen)


def solve_on(result: PlanResult, table: ir.CostTable) -> PlanResult:
    """Solve ``result``'s model again on ``table`` (e.g. a calibrated copy of its cost
    table), with its objective; the plan is routed and priced on ``table``. (A plan with
    early-exit heads is re-solved without them: live adaptation of exits is not built.)"""
    return dataclasses.replace(result, table=table,
                               plan=_solve(result.prepared.graph, table, result.objective))


def write_plan(result: PlanResult, out_dir: str | Path) -> PlanResult:
    """Write ``result.plan`` as a verified bundle at ``out_dir`` (replaced if present)."""
    return _write(result, out_dir, verify=True, force=True, triton=False, progress=False)


def _write(result: PlanResult, out_dir: str | Path, *, verify: bool, force: bool,
           triton: bool, progress: bool) -> PlanResult:
    from partitioner.backend import compile_bundle
    from partitioner.backend.planning import planning_record

    variant: dict[str, Any] = {}
    if result.quant is not None and any(s.quantized for s in result.plan.stages):
        # the back end builds the same int8 variant the planner measured (quantvar)
        variant["calibration"] = result.quant.calibration
    out = compile_bundle(result.prepared, result.plan, result.system, out_dir,
                         verify=verify, force=force, triton=triton, table=result.table,
                         progress=progress, extra=planning_record(result), **variant)
    return dataclasses.replace(result, bundle=Path(out))


def compile(model: str | Path | PreparedModel | Any,  # noqa: A001 - the API's verb
            system: str | Path | ir.System, out_dir: str | Path, *, verify: bool = True,
            force: bool = False, triton: bool = False, progress: bool = False,
            **plan_options: Any) -> PlanResult:
    """:func:`plan`, then write the deployment bundle to ``out_dir``.

    Args:
        model / system: as for :func:`plan`.
        out_dir: bundle directory (must not exist or be empty unless ``force``); checked
            before the model is loaded.
        verify: run the chained stages against the whole model before finishing.
        force: replace a non-empty ``out_dir``.
        triton: also write a Triton model repository per device.
        progress: a progress bar over the stages on stderr.
        **plan_options: the keyword arguments of :func:`plan` (``lazy_weights``
            defaults to True here: ``result.prepared.model`` then holds references into
            the model file instead of its big inline weights).

    Returns:
        The :class:`PlanResult`, with ``bundle`` set.
    """
    from partitioner.backend.emit import check_output

    # before the (slow) load and solve; --force must not delete the files it reads
    inputs = [x for x in (model, system, *plan_options.get("profiles", ()),
                          plan_options.get("calibration")) if isinstance(x, (str, Path))]
    check_output(out_dir, force=force, inputs=inputs)
    # big inline weights stay in the model file: the proto holds none (issue 16)
    result = plan(model, system, **{"lazy_weights": True, **plan_options})
    return _write(result, out_dir, verify=verify, force=force, triton=triton,
                  progress=progress)


# --------------------------------------------------------------------------- re-planning


def system_without(system: ir.System, lost: Iterable[str]) -> ir.System:
    """``system`` minus the ``lost`` devices and their links."""
    gone = set(lost)
    return dataclasses.replace(
        system, devices=tuple(d for d in system.devices if d.name not in gone),
        links=tuple(k for k in system.links if k.a not in gone and k.b not in gone))


def fallback_name(lost: Iterable[str]) -> str:
    """Folder name under ``BUNDLE/fallback/`` for a set of lost devices."""
    return "without-" + "+".join(sorted(lost))


def _bundle_model(main: Any, model: Any, bundle_dir: Path) -> PreparedModel:
    """The model ``main`` (a loaded bundle) was compiled from, with its input shapes and
    granularity; a different model (fingerprint) is refused."""
    shapes = {t.name: tuple(t.shape) for t in main.model.inputs}
    prepared = _prepare(model, shapes, main.model.granularity, None)
    if prepared.graph.sha256 != main.model.sha256:
        fail(f"--model {model}: not the model bundle {bundle_dir} was compiled from "
             f"(sha256 differs)")
    return prepared


def bundle_context(bundle_dir: str | Path, model: str | Path | PreparedModel | Any,
                   system: str | Path | ir.System, *,
                   profiles: Sequence[str | Path | Profile] = ()) -> PlanResult:
    """A compiled bundle's own plan with its model (fingerprint checked), the system and
    a freshly built cost table; the objective is the plan's kind, caps dropped (as for
    :func:`replan`)."""
    from partitioner.analysis.costs import build_cost_table
    from partitioner.analysis.row_profile import with_row_profiles
    from stagebundle import load_bundle

    bundle_dir = Path(bundle_dir)
    main = load_bundle(bundle_dir)
    loaded_system = _load_system(system)
    prepared = _bundle_model(main, model, bundle_dir)
    loaded_profiles = _profiles(profiles, prepared.graph)
    table = build_cost_table(prepared.graph, loaded_system, profiles=loaded_profiles)
    table = with_row_profiles(table, prepared.graph, loaded_profiles)  # profile --spatial
    kind = str(main.plan.get("objective", "latency"))
    return PlanResult(prepared, loaded_system, table, ir.Plan.from_json(main.plan),
                      ir.Objective(kind=kind), bundle_dir)  # type: ignore[arg-type]


def replan(bundle_dir: str | Path, model: str | Path | PreparedModel | Any,
           system: str | Path | ir.System, lost: Iterable[str], *,
           profiles: Sequence[str | Path | Profile] = ()) -> Path | None:
    """Compile the bundle's model for the system without ``lost``; ``None`` if infeasible.

    The model must be the one the bundle was compiled from (its fingerprint is checked);
    it is loaded with the bundle's input shapes and granularity. The plan is solved with
    the objective *kind* of the bundle's plan, its caps dropped (a degraded system may not
    meet them, and a slower answer beats none).

    Returns:
        The new bundle directory ``BUNDLE/fallback/without-<lost>``, or ``None`` when a
        lost device is pinned as source or destination or no plan exists without them.

    Raises:
        UserError: a lost device not in the system, or a model other than the bundle's.
    """
    from stagebundle import load_bundle

    bundle_dir, gone = Path(bundle_dir), frozenset(lost)
    main = load_bundle(bundle_dir)
    full = _load_system(system)
    where = full.path or "the system file"
    known = {d.name for d in full.devices}
    for d in sorted(gone):
        if d not in known:
            fail(f"--device {d}: not a device of {where}")
    app = full.application
    pinned = {app.source, app.destination} & gone
    if pinned:
        log.warning("cannot plan without %s: it is pinned as source/destination",
                    ", ".join(sorted(x for x in pinned if x)))
        return None
    prepared = _bundle_model(main, model, bundle_dir)
    # A lost device's profile prices nothing now (and would name a device not in the
    # reduced system); bad profile files still fail here, before the try below.
    kept = [p for p in _profiles(profiles, prepared.graph) if p.device not in gone]
    kind = str(main.plan.get("objective", "latency"))
    # the bundle's exit heads again, with the probabilities it was planned with
    from partitioner.frontend.exits import ExitSpec

    heads = [ExitSpec(str(e["output"]), float(e["probability"]), e.get("threshold"))
             for e in main.plan.get("exits") or ()]
    try:
        result = plan(prepared, system_without(full, gone), profiles=kept,
                      objective=ir.Objective(kind=kind),  # type: ignore[arg-type]
                      exits=heads)
    except UserError as err:
        log.warning("no plan without %s: %s", ", ".join(sorted(gone)), err)
        return None
    out = bundle_dir / FALLBACK_DIR / fallback_name(gone)
    out.parent.mkdir(exist_ok=True)
    _write(result, out, verify=True, force=True, triton=False, progress=False)
    log.info("fallback without %s: %s", ", ".join(sorted(gone)),
             " -> ".join(f"{s.device}[{s.first}..{s.last}]" for s in result.plan.stages))
    return out
