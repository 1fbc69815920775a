"""The one writer of unit files: what ``partitioner compile`` and a ``--model`` worker call.

A unit (a whole stage, or one row part of a split stage) is built from the prepared model
by the front end's slicer (:func:`~partitioner.frontend.slicing.extract_layers`) or the
part builder (:func:`~partitioner.backend.parts.build_parts`) and written by
:func:`write_unit` (streamed weights, ONNX checker). The back end
(:mod:`partitioner.backend.emit`) writes every unit of a plan through here; a worker
started with ``runtime serve --model`` (:mod:`runtime.build`) writes the units of its
device through the same functions, so for the same model file, input shapes,
granularity and stage the bytes are identical and the manifest's SHA-256 is the check
that they are (the worker refuses a unit whose digest differs).

Nothing here depends on the solver or on ``tqdm``: it needs ``onnx`` and ``numpy`` only.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from partitioner.errors import fail
from partitioner.frontend.stagefile import checkable
from partitioner.ir import ExitHead, Part, Stage

__all__ = ["write_unit", "stage_of", "unit_file_name", "build_unit"]


def write_unit(model: Any, out_dir: Path, name: str, what: str) -> str | None:
    """Write a unit file, run the ONNX checker on it; the external-data file name or None.

    ``model`` is a :class:`~partitioner.frontend.slicing.SubModel` (a stage, or a part's
    model); its weights are streamed, one tensor at a time.
    """
    model.save(out_dir / name)
    data = name + ".data" if (out_dir / (name + ".data")).exists() else None
    try:
        if data is not None:  # the checker reads the file's graph, not its data file
            onnx.checker.check_model(str(out_dir / name))
        else:
            _check_inline(model, out_dir, name)
    except onnx.checker.ValidationError as err:
        fail(f"{what}: {name} fails the ONNX checker: {str(err).splitlines()[0]}")
    return data


def _check_inline(model: Any, out_dir: Path, name: str) -> None:
    """The ONNX checker on a unit whose weights are inline, without loading them.

    Checking the file would hold its bytes and the parsed model at once (twice the unit);
    the checker instead reads the unit's graph with its raw payloads declared as external
    data of the unit file itself (:func:`~partitioner.frontend.stagefile.checkable`),
    written next to it for the moment of the check. The file itself is then loaded by
    ONNX Runtime (verification, or the ``--no-verify`` load check).
    """
    fd, stub = tempfile.mkstemp(prefix=".check-", suffix=".onnx", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(checkable(model.shell, model.weights, name).SerializeToString())
        onnx.checker.check_model(stub)
    finally:
        os.unlink(stub)


def stage_of(spec: Any) -> Stage:
    """The plan stage (:class:`partitioner.ir.Stage`) a manifest ``StageSpec`` was built
    from: its layers, device or parts (device, frequency, rows), quantised layers, exit."""
    parts = None if spec.parts is None else tuple(
        Part(p.device, p.frequency, tuple(p.rows)) for p in spec.parts)
    ex: Mapping[str, Any] | None = spec.exit
    head = None if ex is None else ExitHead(str(ex["output"]), float(ex["probability"]),
                                            ex.get("threshold"))
    return Stage(spec.device, spec.frequency, spec.first, spec.last, id=spec.id,
                 parts=parts, quantized=tuple(spec.quantized), exit=head)


def unit_file_name(stage: Stage, part: int | None) -> str:
    """The file name the back end gives a unit (``stage<i>_<dev>.onnx`` or
    ``stage<i>_part<k>_<dev>.onnx``)."""
    from partitioner.backend.emit import part_file_name, stage_file_name

    if part is None:
        assert stage.device is not None
        return stage_file_name(stage.id, stage.device)
    assert stage.parts is not None
    return part_file_name(stage.id, part, stage.parts[part].device)


def build_unit(prepared: Any, stage: Stage, part: int | None, out_dir: Path,
               parts: list[Any] | None = None) -> tuple[str, str | None, Any]:
    """Write unit ``part`` of ``stage`` (None: the whole stage) into ``out_dir``.

    ``parts``: the stage's part models when the caller built them already (the back end
    needs them for routing first); otherwise they are built here.

    Returns:
        The unit's file name, its external-data file name (or None), and the model written
        (the stage's ``SubModel`` or the part's ``PartModel``).
    """
    from partitioner.frontend.slicing import extract_layers

    name = unit_file_name(stage, part)
    if part is None:
        sub = extract_layers(prepared, stage.first, stage.last)
        data = write_unit(sub, out_dir, name, f"stage {stage.id} ({stage.device}, layers "
                                              f"{stage.first}..{stage.last})")
        return name, data, sub
    if parts is None:
        from partitioner.backend.parts import build_parts

        parts = list(build_parts(prepared, stage))
    pm = parts[part]
    data = write_unit(pm.model, out_dir, name, f"stage {stage.id} part {part} ({pm.device}, "
                                               f"rows {pm.rows[0]}..{pm.rows[1]})")
    return name, data, pm
