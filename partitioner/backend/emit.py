"""Turn a plan into a deployment bundle: :func:`compile_bundle`.

Each plan stage becomes one ONNX file (``stage<i>_<device>.onnx``, plus
``stage<i>_<device>.onnx.data`` when its weights are external data), a stage split by
rows one file per part (``stage<i>_part<k>_<device>.onnx``, from
:func:`partitioner.backend.parts.build_parts`), each checked with ``onnx.checker`` and
loaded in ONNX Runtime. The manifest (schema 2, :mod:`stagebundle.manifest`) is the stage
graph: every unit's ``sends`` and the bundle's ``input_sends`` come from the plan's routes
(:func:`partitioner.analysis.routing.route_plan`, called here for a plan without routes),
written by :mod:`partitioner.backend.sends`. Verification runs the bundle with
:func:`stagebundle.graph.run_graph`, the runtime's own message rules.

The bundle is written into a temporary directory next to ``out_dir`` and renamed into
place at the end, so an error never leaves a half-written bundle; an existing non-empty
``out_dir`` is only replaced with ``force``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from partitioner.backend.manifest import (
    MANIFEST,
    PRODUCER,
    Bundle,
    ModelSpec,
    PartSpec,
    StageSpec,
    dumps,
    sha256_file,
    unit_key,
)
from partitioner.backend.sends import (
    UnitFiles,
    check_reads,
    forwarded_specs,
    input_sends,
    sends_of,
    spec,
    tensor_specs,
    transfer_kind,
)
from partitioner.backend.timeline import stage_figures
from partitioner.backend.units import build_unit
from partitioner.backend.verify import (
    TOLERANCE,
    check_units_load,
    compare,
    release_freed_memory,
    run_bundle,
    sample_inputs,
    session,
)
from partitioner.errors import fail
from partitioner.frontend.slicing import save_model
from partitioner.ir import CostTable, Plan, Stage, System, TensorInfo
from stagebundle.dtypes import is_known_dtype
from stagebundle.graph import check_graph

__all__ = ["compile_bundle", "check_output", "safe_name", "stage_file_name",
           "part_file_name"]


def safe_name(text: str) -> str:
    """``text`` as a file name: only letters, digits, ``._-`` (others become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".") or "_"


def stage_file_name(index: int, device: str) -> str:
    """``stage<i>_<device>.onnx`` with the device name made file-name safe."""
    return f"stage{index}_{safe_name(device)}.onnx"


def part_file_name(stage: int, part: int, device: str) -> str:
    """``stage<i>_part<k>_<device>.onnx``."""
    return f"stage{stage}_part{part}_{safe_name(device)}.onnx"


def _check_plan(plan: Plan, n_layers: int, system: System | None) -> None:
    if not plan.stages:
        fail("plan: no stages")
    expect = 0
    known = {d.name for d in system.devices} if system is not None else None
    for i, s in enumerate(plan.stages):
        if s.first != expect or s.last < s.first:
            fail(f"plan stage {i} ({s.device}): layers {s.first}..{s.last} do not continue "
                 f"the previous stage (expected to start at layer {expect})")
        expect = s.last + 1
        if not s.devices:
            fail(f"plan stage {i}: no device and no parts")
        for dev in s.devices:
            if known is not None and dev not in known:
                fail(f"plan stage {i}: device {dev!r} is not in the system file")
    if expect != n_layers:
        fail(f"plan: stages end at layer {expect - 1}, the model has {n_layers} layers "
             f"(0..{n_layers - 1})")


def _reference(prepared: Any, work: Path, feeds: dict[str, Any]) -> dict[str, Any]:
    """The whole prepared model's outputs on ``feeds`` (ORT, CPU).

    The model goes to ONNX Runtime through a file with external data, never as one
    serialised byte string: that string is a second copy of every weight (vgg16, inline
    weights: benchmarks/compile_memory.py measured the difference).
    """
    model: onnx.ModelProto = prepared.model
    names = [o.name for o in model.graph.output]
    what = f"model {prepared.graph.name!r}"
    path = work / "full.onnx"
    save_model(model, path, base_dir=getattr(prepared, "base_dir", None),
               external_data="full.onnx.data")
    sess = session(path, what)
    outputs = dict(zip(names, sess.run(names, feeds), strict=True))
    del sess  # only its outputs are kept: the stage sessions come after it
    release_freed_memory()
    return outputs


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is swapped out, then deleted."""
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        try:
            os.replace(out, old / out.name)
        except OSError:
            old.rmdir()  # still empty: leave nothing behind
            raise
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output(out_dir: str | os.PathLike[str], *, force: bool,
                 inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Refuse an output that is a file, or a non-empty directory unless ``force``, or
    (even with ``force``) a directory that holds the current one (``-o .``, ``-o ..``) or
    one of the ``inputs`` (the model, system, profiles: replacing it would delete them)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        fail(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        fail(f"output directory {str(out)!r} is not empty (use --force to replace it)")
    if out.is_dir():
        here, target = Path.cwd().resolve(), out.resolve()
        if target == here or target in here.parents:
            fail(f"output directory {str(out)!r} holds the current directory; a bundle "
                 f"cannot replace it (choose another -o)")
        for path in inputs:
            if target in Path(path).resolve().parents:
                fail(f"output directory {str(out)!r} holds the input {str(path)!r}; "
                     f"replacing it would delete that file (choose another -o)")
    return out


def _check_dtypes(graph: Any) -> None:
    """A bundle carries fixed-size tensors only (the manifest and the wire format)."""
    for kind, tensors in (("input", graph.inputs), ("output", graph.outputs)):
        for t in tensors:
            if not is_known_dtype(t.dtype):
                shown = "string" if t.dtype in ("object", "str") else t.dtype
                fail(f"model {graph.name!r}: {kind} {t.name!r} has element type {shown}; "
                     f"a bundle carries only numeric and bool tensors")


def compile_bundle(prepared: Any, plan: Plan, system: System | None,
                   out_dir: str | os.PathLike[str], *, verify: bool = True,
                   force: bool = False, triton: bool = False, table: CostTable | None = None,
                   seed: int = 0, progress: bool = False,
                   calibration: Mapping[str, Any] | None = None,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write the deployment bundle of ``plan`` to ``out_dir``.

    Args:
        prepared: the ``PreparedModel`` the plan was made for.
        plan: its stages cover layers ``0..L-1`` in order.
        system: the system file (devices checked, source/destination recorded); may be
            None for a plan made without one.
        out_dir: bundle directory to create.
        verify: run the chained stages on a seeded sample input against the whole model and
            fail when they differ by more than :data:`TOLERANCE` of the output scale.
        force: replace an existing non-empty ``out_dir``.
        triton: also write a Triton model repository per device under ``triton/``.
        table: the cost table the plan was priced with; when given, the manifest records
            the per-stage timeline (see :mod:`partitioner.backend.timeline`).
        seed: seed of the verification input.
        progress: show a progress bar over the stages on stderr (tqdm).
        calibration: inputs (``--calibration`` format) the int8 variant of a plan with
            ``quantized`` layers is calibrated on (:mod:`partitioner.backend.quantized`);
            None: seeded random ones, with a warning.
        extra: more top-level manifest entries (the pipeline's ``planning`` record,
            :mod:`partitioner.backend.planning`).

    Returns:
        The bundle directory.

    Raises:
        UserError: bad plan, existing output, a stage failing the checker or ORT, or a
            verification mismatch. Nothing is left at ``out_dir`` in that case.
    """
    graph = prepared.graph
    _check_plan(plan, len(graph.layers), system)
    _check_dtypes(graph)
    out = check_output(out_dir, force=force)
    target = Path(os.path.normpath(out))  # ``x/y/..`` is ``x``: renamed, and returned
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        bundle = _build(prepared, plan, system, tmp, verify=verify, triton=triton,
                        table=table, seed=seed, progress=progress, calibration=calibration,
                        extra=extra)
        text = dumps(bundle.to_json()) + "\n"
        Bundle.from_json(json.loads(text), tmp)  # what the loader will check, before it lands
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(prepared: Any, plan: Plan, system: System | None, tmp: Path, *, verify: bool,
           triton: bool, table: CostTable | None, seed: int, progress: bool,
           calibration: Mapping[str, Any] | None = None,
           extra: Mapping[str, Any] | None = None) -> Bundle:
    from tqdm import tqdm

    from partitioner.analysis.routing import messages, route_plan, tensor_flow

    variant = None
    estimate = plan.estimate
    if any(s.quantized for s in plan.stages):  # slice the int8 variant instead (QUANT)
        from partitioner.backend.quantized import quantized_variant

        float_prepared = prepared
        prepared, plan, variant = quantized_variant(prepared, plan, calibration)
    graph = prepared.graph
    parts = {s.id: _build_parts(prepared, s) for s in plan.stages if s.parts}
    rows = _unit_rows(parts)
    if not plan.routes:  # a hand-made plan: route it here, with the same function
        plan = route_plan(graph, table, plan, unit_rows=rows)
        if variant is not None:  # the planner priced the variant: keep its estimate
            plan = replace(plan, estimate=estimate)
    msgs = messages(graph, plan, plan.routes, table, rows)
    routes = {r.tensor: r for r in plan.routes}
    infos = {**graph.tensors, **{t.name: t for t in (*graph.inputs, *graph.outputs)}}
    _, readers = tensor_flow(graph, plan)
    timeline = None
    if table is not None:
        from partitioner.backend.timeline import timeline as make_timeline

        timeline = make_timeline(plan, table, graph, msgs)
    stages: list[StageSpec] = []
    bar = tqdm(total=len(plan.stages), desc="stages", unit="stage", disable=not progress,
               file=sys.stderr, leave=False)
    for s in plan.stages:
        bar.update(1)
        reads = {n for n, r in readers.items() if s.id in r}
        common = dict(id=s.id, first=s.first, last=s.last, quantized=s.quantized,
                      exit=None if s.exit is None else s.exit.to_json(),
                      next=s.id + 1 if s.id + 1 < len(plan.stages) else None,
                      estimate=stage_figures(timeline, s.id))
        if s.parts:
            stages.append(_split_stage(prepared, s, parts[s.id], tmp, msgs, routes, reads,
                                       common))
            continue
        name, data, sub = build_unit(prepared, s, None, tmp)  # the --model worker's too
        files = UnitFiles(tuple((t, None) for t in sub.inputs),
                          tuple((t, None) for t in sub.outputs))
        check_reads(s.id, files, reads)
        assert s.device is not None
        ins, outs = tensor_specs(files, routes)
        key = unit_key(s.id)
        stages.append(StageSpec(
            device=s.device, frequency=s.frequency or plan.frequencies.get(s.device),
            file=name, sha256=sha256_file(tmp / name), inputs=ins, outputs=outs,
            forward=forwarded_specs(msgs, key, files, routes, infos),
            sends=sends_of(msgs, key), external_data=data,
            external_data_sha256=None if data is None else sha256_file(tmp / data),
            **common))  # type: ignore[arg-type]
    bar.close()
    app = system.application if system is not None else None
    model = ModelSpec(graph.name, graph.sha256, graph.granularity,
                      tuple(spec(t) for t in graph.inputs),
                      tuple(spec(t) for t in graph.outputs),
                      tuple(layer.name for layer in graph.layers))
    entries: dict[str, Any] = {"timeline": timeline, **(extra or {})}
    bundle = Bundle(path=tmp, model=model, plan=plan.to_json(), stages=tuple(stages),
                    input_sends=input_sends(msgs),
                    source=app.source if app else plan.pseudo.get("source"),
                    destination=app.destination if app else plan.pseudo.get("destination"),
                    transfer=transfer_kind(plan.routes), producer=PRODUCER, extra=entries)
    check_graph(bundle)  # the sends add up, as the loader and the runtime will check
    if verify:
        bundle = _verified(prepared, bundle, tmp, seed,
                           None if variant is None else (float_prepared, variant))
    else:  # still prove every unit loads in ONNX Runtime
        check_units_load(bundle, tmp)
    if triton:
        from partitioner.backend.triton import write_repository

        bundle = write_repository(bundle, tmp)
    return bundle


def _build_parts(prepared: Any, stage: Stage) -> list[Any]:
    from partitioner.backend.parts import build_parts

    return list(build_parts(prepared, stage))


def _unit_rows(parts: dict[int, list[Any]]) -> Any:
    """The rows each part receives and holds, from its part model (routing's UnitRows)."""
    if not parts:
        return None

    def rows(stage: int, part: int) -> tuple[dict[str, Any], dict[str, Any]]:
        pm = parts[stage][part]
        return ({t.name: r for t, r in pm.inputs}, {t.name: r for t, r in pm.outputs})
    return rows


def _split_stage(prepared: Any, s: Stage, parts: list[Any], tmp: Path,
                 msgs: Sequence[Any], routes: dict[str, Any], reads: set[str],
                 common: dict[str, Any]) -> StageSpec:
    """A stage split by rows: one file and one PartSpec per part, the stage's own lists
    whole (unsliced)."""
    specs = []
    whole_in: dict[str, TensorInfo] = {}
    whole_out: dict[str, TensorInfo] = {}
    for k, pm in enumerate(parts):
        files = UnitFiles(tuple(pm.inputs), tuple(pm.outputs))
        name, data, _ = build_unit(prepared, s, k, tmp, parts=parts)
        ins, outs = tensor_specs(files, routes)
        specs.append(PartSpec(
            index=k, device=pm.device, frequency=pm.frequency, rows=tuple(pm.rows),
            file=name, sha256=sha256_file(tmp / name), inputs=ins, outputs=outs,
            sends=sends_of(msgs, unit_key(s.id, k)), external_data=data,
            external_data_sha256=None if data is None else sha256_file(tmp / data)))
        whole_in.update((t.name, t) for t, _ in pm.inputs)
        whole_out.update((t.name, t) for t, _ in pm.outputs)
    files = UnitFiles(tuple((t, None) for t in whole_in.values()),
                      tuple((t, None) for t in whole_out.values()))
    check_reads(s.id, files, reads)
    ins, outs = tensor_specs(files, routes)
    return StageSpec(device=None, frequency=None, file=None, sha256=None, inputs=ins,
                     outputs=outs, parts=tuple(specs), **common)

def _verified(prepared: Any, bundle: Bundle, tmp: Path, seed: int,
              quantized: tuple[Any, Any] | None = None) -> Bundle:
    """Chained units against the whole model (the quantised one for a plan with int8
    layers: ``quantized`` = (float model, variant); then rho vs the float one too)."""
    feeds = sample_inputs(bundle.model.inputs, seed)
    release_freed_memory()  # the buffers of writing the units
    work = Path(tempfile.mkdtemp(prefix=".verify-", dir=tmp))
    try:
        # The units first: the largest one's session is the peak of compiling a large
        # model (its weights twice over while ORT pre-packs them), so it opens before
        # anything else has left memory behind; the whole model's session comes after.
        chained = run_bundle(bundle, feeds, scratch=work)
        full = _reference(prepared, work, feeds)
        floats = None if quantized is None else _reference(quantized[0], work, feeds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    worst_abs, worst_rel, name = compare(full, chained)
    if worst_rel > TOLERANCE:
        fail(f"verification: model output {name!r} differs between the chained stages and "
             f"the whole model by {worst_abs:.3g} ({worst_rel:.3g} of its scale, tolerance "
             f"{TOLERANCE:g})")
    report = {"max_abs_diff": worst_abs, "max_rel_diff": worst_rel, "tolerance": TOLERANCE,
              "inputs": "seeded random", "seed": seed}
    if quantized is not None and floats is not None:
        from partitioner.backend.quantized import noise_entry

        report |= noise_entry(quantized[1], floats, chained)
    return replace(bundle, verification=report)
