"""A Triton Inference Server model repository per device (``compile --triton``).

Layout: ``triton/<device>/<model>_stage<i>/config.pbtxt`` and ``.../1/model.onnx`` (with the
stage's external-data file next to it under the name the ONNX file refers to). Each config
is a ``ModelConfig`` in protobuf text format for the ONNX Runtime backend with
``max_batch_size: 0`` (the stages have static shapes, batch included), so a device running
Triton serves its stages with ``--model-repository=triton/<device>``.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from partitioner.backend.emit import safe_name
from partitioner.backend.manifest import Bundle, StageSpec, TensorSpec
from partitioner.errors import fail

__all__ = ["TRITON_TYPES", "config_text", "write_repository", "triton_model_name"]

# numpy dtype name -> Triton DataType (model_config.proto).
TRITON_TYPES = {
    "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32", "uint64": "TYPE_UINT64", "int8": "TYPE_INT8",
    "int16": "TYPE_INT16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
    "object": "TYPE_STRING", "str": "TYPE_STRING", "bfloat16": "TYPE_BF16",
}


def _quote(text: str) -> str:
    """A protobuf text-format string literal (octal escapes for anything unusual)."""
    out = []
    for byte in text.encode("utf-8"):
        ch = chr(byte)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _io(t: TensorSpec, stage: StageSpec) -> str:
    kind = TRITON_TYPES.get(np.dtype(t.dtype).name)
    if kind is None:
        fail(f"stage {stage.id}: tensor {t.name!r} has dtype {t.dtype}, which Triton cannot "
             f"serve")
    lines = ["  {", f"    name: {_quote(t.name)}", f"    data_type: {kind}"]
    if t.shape:
        lines.append(f"    dims: [ {', '.join(str(d) for d in t.shape)} ]")
    else:  # Triton needs at least one dim; a scalar is [1] reshaped to []
        lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    lines.append("  }")
    return "\n".join(lines)


def config_text(name: str, stage: StageSpec) -> str:
    """The ``config.pbtxt`` of one stage."""
    ins = ",\n".join(_io(t, stage) for t in stage.inputs)
    outs = ",\n".join(_io(t, stage) for t in stage.outputs)
    return (f"name: {_quote(name)}\n"
            f'platform: "onnxruntime_onnx"\n'
            f"max_batch_size: 0\n"
            f"input [\n{ins}\n]\n"
            f"output [\n{outs}\n]\n")


def triton_model_name(model: str, stage: int) -> str:
    return f"{safe_name(model)}_stage{stage}"


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no second copy of gigabytes of weights), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_repository(bundle: Bundle, root: Path) -> Bundle:
    """Write the repositories under ``root/triton`` and record each stage's model folder."""
    stages = []
    skipped = []
    for s in bundle.stages:
        if s.parts or s.device is None or s.file is None:
            # a split stage is several models whose row pieces the stage graph gathers;
            # a Triton repository serves whole models, so it is left out (noted below)
            skipped.append(s.id)
            stages.append(s)
            continue
        name = triton_model_name(bundle.model.name, s.id)
        rel = f"triton/{safe_name(s.device)}/{name}"
        version = root / rel / "1"
        version.mkdir(parents=True, exist_ok=False)
        _link_or_copy(root / s.file, version / "model.onnx")
        if s.external_data is not None:
            # The ONNX file names its data file; keep that name next to model.onnx.
            _link_or_copy(root / s.external_data, version / Path(s.external_data).name)
        (root / rel / "config.pbtxt").write_text(config_text(name, s), encoding="utf-8")
        stages.append(replace(s, triton=rel))
    if skipped:
        note = (f"stages {', '.join(map(str, skipped))} are split into row parts and have no "
                f"Triton model; serve them with runtime workers")
        print(f"triton: {note}", file=sys.stderr)
        return replace(bundle, stages=tuple(stages),
                       extra={**bundle.extra, "triton_note": note})
    return replace(bundle, stages=tuple(stages))
