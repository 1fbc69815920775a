"""Turn a plan into a deployment bundle: :func:`compile_bundle`.

Each plan stage becomes one ONNX file (``stage<i>_<device>.onnx``, plus
``stage<i>_<device>.onnx.data`` when its weights are external data), checked with
``onnx.checker`` and loaded in ONNX Runtime. The manifest records what crosses every cut:
a tensor produced at stage ``a`` and read at ``c > a + 1`` is forwarded by the stages
between (SPEC §2 chain model; see :mod:`partitioner.backend.manifest`).

The bundle is written into a temporary directory next to ``out_dir`` and renamed into
place at the end, so an error never leaves a half-written bundle; an existing non-empty
``out_dir`` is only replaced with ``force``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from partitioner.backend.manifest import (
    MANIFEST,
    PRODUCER,
    Bundle,
    Endpoint,
    ModelSpec,
    StageSpec,
    TensorSpec,
    dumps,
    sha256_file,
)
from partitioner.backend.verify import TOLERANCE, compare, run_chain, sample_inputs, session
from partitioner.errors import fail
from partitioner.frontend.slicing import SubModel, extract_layers, save_model, uses_external_data
from partitioner.ir import CostTable, Plan, System, TensorInfo

__all__ = ["compile_bundle", "check_output", "safe_name", "stage_file_name", "route"]


def safe_name(text: str) -> str:
    """``text`` as a file name: only letters, digits, ``._-`` (others become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".") or "_"


def stage_file_name(index: int, device: str) -> str:
    """``stage<i>_<device>.onnx`` with the device name made file-name safe."""
    return f"stage{index}_{safe_name(device)}.onnx"


def _spec(t: TensorInfo, **kw: Any) -> TensorSpec:
    return TensorSpec(t.name, tuple(t.shape), t.dtype, **kw)


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
        if known is not None and s.device not in known:
            fail(f"plan stage {i}: device {s.device!r} is not in the system file")
    if expect != n_layers:
        fail(f"plan: stages end at layer {expect - 1}, the model has {n_layers} layers "
             f"(0..{n_layers - 1})")


def route(subs: Sequence[SubModel], model_inputs: Sequence[TensorInfo],
          model_outputs: Sequence[TensorInfo]
          ) -> list[tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]:
    """Per stage: (inputs with ``from``, outputs with ``to``, forwarded tensors).

    A tensor with origin ``o`` (a stage, or -1 for a model input) whose last reader is
    stage ``n`` (the number of stages when it is a model output) is carried through every
    stage ``i`` with ``o < i < n`` that does not produce it.
    """
    n = len(subs)
    origin: dict[str, int] = {t.name: -1 for t in model_inputs}
    info: dict[str, TensorInfo] = {t.name: t for t in model_inputs}
    for i, sub in enumerate(subs):
        for t in sub.outputs:
            origin[t.name] = i
            info[t.name] = t
    readers: dict[str, list[int]] = {}
    for i, sub in enumerate(subs):
        for t in sub.inputs:
            if t.name not in origin or origin[t.name] >= i:
                fail(f"stage {i}: input tensor {t.name!r} is produced by no earlier stage "
                     f"(is the plan's layer order topological?)")
            readers.setdefault(t.name, []).append(i)
    outputs = {t.name for t in model_outputs}
    for name in outputs:
        if name not in origin:
            fail(f"model output {name!r} is produced by no stage")
    last_need = {name: max(readers.get(name, [-1]) + ([n] if name in outputs else []))
                 for name in origin}

    def source(name: str) -> Endpoint:
        return "input" if origin[name] < 0 else origin[name]

    def targets(name: str, after: int) -> tuple[Endpoint, ...]:
        later: list[Endpoint] = [r for r in readers.get(name, []) if r > after]
        return tuple(later + (["output"] if name in outputs else []))

    result = []
    for i, sub in enumerate(subs):
        ins = tuple(_spec(t, source=source(t.name)) for t in sub.inputs)
        outs = tuple(_spec(t, targets=targets(t.name, i)) for t in sub.outputs)
        fwd = tuple(_spec(info[name], source=source(name), targets=targets(name, i))
                    for name, o in origin.items() if o < i < last_need[name])
        result.append((ins, outs, fwd))
    return result


def _reference(prepared: Any, work: Path, feeds: dict[str, Any]) -> dict[str, Any]:
    """The whole prepared model's outputs on ``feeds`` (ORT, CPU)."""
    model: onnx.ModelProto = prepared.model
    names = [o.name for o in model.graph.output]
    what = f"model {prepared.graph.name!r}"
    data: bytes | None = None
    if not uses_external_data(model):
        try:
            data = model.SerializeToString()
        except ValueError:  # above protobuf's 2 GB: go through a file with external data
            data = None
    if data is None:
        path = work / "full.onnx"
        save_model(model, path, base_dir=getattr(prepared, "base_dir", None))
        sess = session(path, what)
    else:
        sess = session(data, what)
    return dict(zip(names, sess.run(names, feeds), strict=True))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is swapped out, then deleted."""
    old = None
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output(out_dir: str | os.PathLike[str], *, force: bool) -> Path:
    """Refuse an output that is a file, or a non-empty directory unless ``force``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        fail(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        fail(f"output directory {str(out)!r} is not empty (use --force to replace it)")
    return out


def compile_bundle(prepared: Any, plan: Plan, system: System | None,
                   out_dir: str | os.PathLike[str], *, verify: bool = True,
                   force: bool = False, triton: bool = False, table: CostTable | None = None,
                   seed: int = 0, progress: bool = False) -> Path:
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

    Returns:
        The bundle directory.

    Raises:
        UserError: bad plan, existing output, a stage failing the checker or ORT, or a
            verification mismatch. Nothing is left at ``out_dir`` in that case.
    """
    graph = prepared.graph
    _check_plan(plan, len(graph.layers), system)
    out = check_output(out_dir, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        bundle = _build(prepared, plan, system, tmp, verify=verify, triton=triton,
                        table=table, seed=seed, progress=progress)
        text = dumps(bundle.to_json()) + "\n"
        (tmp / MANIFEST).write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build(prepared: Any, plan: Plan, system: System | None, tmp: Path, *, verify: bool,
           triton: bool, table: CostTable | None, seed: int, progress: bool) -> Bundle:
    from tqdm import tqdm

    graph = prepared.graph
    subs = [extract_layers(prepared, s.first, s.last) for s in plan.stages]
    routes = route(subs, graph.inputs, graph.outputs)
    timeline = None
    if table is not None:
        from partitioner.backend.timeline import timeline as make_timeline

        timeline = make_timeline(plan, table)
    stages: list[StageSpec] = []
    bar = tqdm(total=len(subs), desc="stages", unit="stage", disable=not progress,
               file=sys.stderr, leave=False)
    for i, (s, sub, (ins, outs, fwd)) in enumerate(zip(plan.stages, subs, routes, strict=True)):
        bar.update(1)
        name = stage_file_name(i, s.device)
        sub.save(tmp / name)
        what = f"stage {i} ({s.device}, layers {s.first}..{s.last})"
        try:
            onnx.checker.check_model(str(tmp / name))
        except onnx.checker.ValidationError as err:
            fail(f"{what}: {name} fails the ONNX checker: {str(err).splitlines()[0]}")
        data = name + ".data" if (tmp / (name + ".data")).exists() else None
        stages.append(StageSpec(
            id=i, device=s.device, frequency=s.frequency or plan.frequencies.get(s.device),
            first=s.first, last=s.last, file=name, sha256=sha256_file(tmp / name),
            inputs=ins, outputs=outs, forward=fwd,
            next=i + 1 if i + 1 < len(plan.stages) else None, external_data=data,
            external_data_sha256=None if data is None else sha256_file(tmp / data),
            estimate=_stage_estimate(timeline, i)))
    bar.close()
    app = system.application if system is not None else None
    model = ModelSpec(graph.name, graph.sha256, graph.granularity,
                      tuple(_spec(t) for t in graph.inputs),
                      tuple(_spec(t) for t in graph.outputs),
                      tuple(layer.name for layer in graph.layers))
    extra: dict[str, Any] = {"timeline": timeline}
    # schema 1 (a forwarding chain) until the back end writes stage graphs
    bundle = Bundle(path=tmp, model=model, plan=plan.to_json(), stages=tuple(stages),
                    source=app.source if app else plan.pseudo.get("source"),
                    destination=app.destination if app else plan.pseudo.get("destination"),
                    transfer="forwarded", schema_version=1, producer=PRODUCER, extra=extra)
    if verify:
        bundle = _verified(prepared, bundle, tmp, seed)
    else:
        for st in bundle.stages:  # still prove every stage loads in ONNX Runtime
            session(tmp / st.file, f"stage {st.id} ({st.file})")
    if triton:
        from partitioner.backend.triton import write_repository

        bundle = write_repository(bundle, tmp)
    return bundle


def _stage_estimate(timeline: list[dict[str, Any]] | None, i: int) -> dict[str, float] | None:
    if timeline is None:
        return None
    compute = sum(s["duration"] for s in timeline if s["stage"] == i and s["kind"] == "compute")
    send = sum(s["duration"] for s in timeline if s["stage"] == i and s["kind"] == "transfer")
    return {"compute": compute, "send": send}


def _verified(prepared: Any, bundle: Bundle, tmp: Path, seed: int) -> Bundle:
    from dataclasses import replace

    feeds = sample_inputs(bundle.model.inputs, seed)
    work = Path(tempfile.mkdtemp(prefix=".verify-", dir=tmp))
    try:
        full = _reference(prepared, work, feeds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    chained = run_chain(tmp, bundle.stages, feeds)
    worst_abs, worst_rel, name = compare(full, chained)
    if worst_rel > TOLERANCE:
        fail(f"verification: model output {name!r} differs between the chained stages and "
             f"the whole model by {worst_abs:.3g} ({worst_rel:.3g} of its scale, tolerance "
             f"{TOLERANCE:g})")
    return replace(bundle, verification={"max_abs_diff": worst_abs,
                                         "max_rel_diff": worst_rel,
                                         "tolerance": TOLERANCE,
                                         "inputs": "seeded random", "seed": seed})
