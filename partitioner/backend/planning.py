"""What re-planning needs, recorded in the bundle: the manifest's ``planning`` entry.

"The bundle carries what re-planning needs" (INTERFACES, ``runtime run --adapt``) means:
a bundle written by :func:`partitioner.pipeline.compile` records

* ``model``: the absolute path of the model file it was compiled from and its SHA-256
  (the model itself stays on the compiling host and on ``--model`` workers: weights are
  never copied into a plan);
* ``system``: the system file's path *and its text* (a few kilobytes), so a re-plan
  solves on the same devices and links even when the file has moved or changed since;
* ``objective``: the objective and caps the plan was solved with;
* ``mbs`` and ``preload``: the cost-table options.

:func:`planning_inputs` reads them back, checking the model's fingerprint, so
``runtime run BUNDLE --hosts ... --adapt`` can re-plan (and compile the new plan to learn
its digests) from the bundle alone; a bundle without the entry (compiled ahead of time
with an older version, or with ``compile_bundle`` directly) needs ``--model`` and
``--system``, as before. Profiles are not recorded: a live re-plan calibrates from
measurements instead.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partitioner import ir
from partitioner.errors import fail

__all__ = ["PLANNING", "planning_record", "PlanningInputs", "planning_inputs",
           "planning_files", "records_planning"]

PLANNING = "planning"  # the manifest key


def planning_record(result: Any) -> dict[str, Any]:
    """The manifest entry for a :class:`partitioner.pipeline.PlanResult` (empty when the
    model was not a file: a PyTorch module or an in-memory proto cannot be re-read)."""
    prepared, system = result.prepared, result.system
    if getattr(prepared, "path", None) is None:
        return {}
    system_doc = None
    if system.path is not None and Path(system.path).is_file():
        path = Path(system.path).resolve()
        system_doc = {"path": str(path), "text": path.read_text(encoding="utf-8")}
    objective = {k: dict(v) if isinstance(v, Mapping) else v
                 for k, v in dataclasses.asdict(result.objective).items()}
    return {PLANNING: {
        "model": {"path": str(Path(prepared.path).resolve()),
                  "sha256": prepared.graph.sha256},
        "system": system_doc, "objective": objective,
        "mbs": result.table.mbs, "preload": result.table.preload}}


@dataclass(frozen=True)
class PlanningInputs:
    """What :func:`partitioner.pipeline.plan` needs to plan the bundle's model again."""

    model: Path
    system: ir.System
    objective: ir.Objective
    mbs: int | None
    preload: bool


def planning_inputs(bundle: Any, *, model: str | Path | None = None,
                    system: str | Path | ir.System | None = None) -> PlanningInputs:
    """The planning inputs a bundle records (``bundle``: a loaded ``Bundle``).

    ``model`` / ``system`` override the recorded ones (the model is still checked against
    the bundle's fingerprint).

    Raises:
        UserError: the bundle records nothing and no override is given, or the model
            file is missing or is not the bundle's model.
    """
    from partitioner.analysis.system import load_system
    from stagebundle.load import sha256_file

    rec = bundle.extra.get(PLANNING) or {}
    where = f"bundle {bundle.path}"
    model_path = Path(model) if model is not None else \
        Path(rec["model"]["path"]) if rec.get("model") else None
    if model_path is None:
        fail(f"{where}: records no model to re-plan from (compiled without it); give "
             f"--model")
    if not model_path.is_file():
        fail(f"{where}: model {model_path} not found; give --model")
    if sha256_file(model_path) != bundle.model.sha256:
        fail(f"--model {model_path}: not the model {where} was compiled from (sha256 "
             f"differs)")
    if isinstance(system, ir.System):
        loaded = system
    elif system is not None:
        loaded = load_system(system)
    elif rec.get("system"):
        loaded = _system_from_text(rec["system"])
    else:
        fail(f"{where}: records no system file; give --system")
    objective = ir.Objective(**{k: v for k, v in (rec.get("objective") or {}).items()
                                if k in {f.name for f in dataclasses.fields(ir.Objective)}})
    return PlanningInputs(model_path, loaded, objective, rec.get("mbs"),
                          bool(rec.get("preload", True)))


def _system_from_text(doc: Mapping[str, Any]) -> ir.System:
    """Load the recorded system text (TOML or JSON, as the original file)."""
    from partitioner.analysis.system import load_system

    suffix = Path(str(doc.get("path", "system.toml"))).suffix or ".toml"
    with tempfile.TemporaryDirectory(prefix="planning-") as tmp:
        path = Path(tmp) / f"system{suffix}"
        path.write_text(str(doc["text"]), encoding="utf-8")
        loaded = load_system(path)
    return dataclasses.replace(loaded, path=doc.get("path"))


def records_planning(bundle_dir: str | Path) -> bool:
    """Whether the bundle's manifest records a model and a system to re-plan with."""
    from stagebundle.load import load_bundle

    rec = load_bundle(bundle_dir, check_onnx=False).extra.get(PLANNING) or {}
    return bool(rec.get("model")) and bool(rec.get("system"))


def planning_files(bundle_dir: str | Path, folder: str | Path, *,
                   model: str | Path | None = None, system: str | Path | None = None
                   ) -> tuple[Path, Path]:
    """The model file and a system file to re-plan a bundle with, for callers that take
    paths (``runtime run --adapt`` without ``--model`` / ``--system``): the recorded
    model (fingerprint checked) and the recorded system text written into ``folder``.
    Given ``model`` / ``system`` are used instead."""
    from stagebundle.load import load_bundle

    bundle = load_bundle(bundle_dir, check_onnx=False)
    inputs = planning_inputs(bundle, model=model, system=system)
    if system is not None:
        return inputs.model, Path(system)
    rec = bundle.extra[PLANNING]["system"]
    suffix = Path(str(rec.get("path", "system.toml"))).suffix or ".toml"
    path = Path(folder) / f"planning-system{suffix}"
    path.write_text(str(rec["text"]), encoding="utf-8")
    return inputs.model, path
