"""The model's inputs: fixing their dynamic dimensions from ``--shape``, and suggesting a
``--shape`` that makes sense for each kind of input when one is missing.

A suggestion is a starting point a user can run as written: batch 1; for images (4-D
float or uint8 tensors) 3 channels and 224 x 224 pixels; for raw audio 16000 samples (one
second at 16 kHz); for everything else that has a free axis (token ids, attention masks,
positions, feature frames) a sequence length of 128. A symbolic dimension shared by
several inputs (``sequence_length`` of ``input_ids`` and ``attention_mask``) gets the same
value in all of them, so the suggested shapes agree with each other.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
from onnx import TensorProto

from partitioner.errors import fail

__all__ = ["model_inputs", "fix_input_shapes", "suggest_dims"]

BATCH = 1
SEQUENCE = 128
IMAGE = 224
CHANNELS = 3
AUDIO_SAMPLES = 16000
VIDEO_FRAMES = 16
_IMAGE_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16,
                TensorProto.DOUBLE, TensorProto.UINT8}
_AUDIO_WORDS = ("audio", "wave", "speech", "input_values", "signal", "pcm", "samples")


def model_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Real model inputs (old IR versions also list initialisers as inputs)."""
    inits = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in inits]


def _known(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    return int(dim.dim_value) if dim.HasField("dim_value") and dim.dim_value > 0 else None


def _default(vi: onnx.ValueInfoProto, axis: int) -> int:
    """A sensible size for a free ``axis`` of input ``vi`` (see the module docstring)."""
    tt = vi.type.tensor_type
    dims = list(tt.shape.dim)
    rank = len(dims)
    if axis == 0 and rank > 1:
        return BATCH
    if tt.elem_type in _IMAGE_TYPES and rank in (4, 5):
        # Channels-last when the last axis is a small fixed channel count (NHWC).
        last = _known(dims[-1])
        channels_last = last is not None and last <= 4 and _known(dims[1]) is None
        channel_axis = rank - 1 if channels_last else 1
        if axis == channel_axis:
            return CHANNELS
        if rank == 5 and axis == (1 if channels_last else 2):
            return VIDEO_FRAMES
        return IMAGE
    name = vi.name.lower()
    if tt.elem_type in _IMAGE_TYPES and rank <= 2 and any(w in name for w in _AUDIO_WORDS):
        return AUDIO_SAMPLES
    return SEQUENCE


def suggest_dims(inputs: list[onnx.ValueInfoProto]) -> dict[str, tuple[int, ...]]:
    """A ``--shape`` for every input that has a free dimension, by input name."""
    by_symbol: dict[str, int] = {}
    out: dict[str, tuple[int, ...]] = {}
    for vi in inputs:
        if vi.type.WhichOneof("value") != "tensor_type" or not vi.type.tensor_type.HasField(
                "shape"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if all(_known(d) is not None for d in dims):
            continue
        chosen = []
        for axis, d in enumerate(dims):
            size = _known(d)
            if size is None:
                size = by_symbol.get(d.dim_param) if d.dim_param else None
                if size is None:
                    size = _default(vi, axis)
                    if d.dim_param:
                        by_symbol[d.dim_param] = size
            chosen.append(size)
        out[vi.name] = tuple(chosen)
    return out


def fix_input_shapes(graph: onnx.GraphProto, shapes: Mapping[str, tuple[int, ...]],
                     label: str) -> None:
    """Fix every dynamic input dimension of ``graph`` in place from ``shapes``.

    Raises:
        UserError: an unknown input or a wrong rank in ``shapes``, a fixed dimension given
            another size, or a dynamic dimension ``shapes`` leaves free (the message
            suggests a ``--shape`` for every such input).
    """
    inputs = model_inputs(graph)
    names = [v.name for v in inputs]
    for name in shapes:
        if name not in names:
            fail(f"--shape {name}: {label} has no input {name!r} (inputs: {', '.join(names)})")
    for vi in inputs:
        if vi.type.WhichOneof("value") != "tensor_type":
            fail(f"{label}: input {vi.name!r} is not a tensor (only tensor inputs are supported)")
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            if vi.name not in shapes:
                example = (f"{BATCH},{CHANNELS},{IMAGE},{IMAGE} for an image, "
                           if tt.elem_type in _IMAGE_TYPES else "") + f"{BATCH},{SEQUENCE}"
                fail(f"{label}: input {vi.name!r} has no shape (unknown rank); fix it with "
                     f"--shape {vi.name}=D0,D1,... (e.g. {example})")
            for d in shapes[vi.name]:
                tt.shape.dim.add().dim_value = d
            continue
        dims = tt.shape.dim
        given = shapes.get(vi.name)
        if given is not None and len(given) != len(dims):
            fail(f"--shape {vi.name}: input {vi.name!r} has rank {len(dims)}, "
                 f"got {len(given)} dimensions")
        for axis, dim in enumerate(dims):
            static = _known(dim) is not None
            if given is not None:
                if static and dim.dim_value != given[axis]:
                    fail(f"--shape {vi.name}: axis {axis} of input {vi.name!r} is fixed at "
                         f"{dim.dim_value} by the model, got {given[axis]}")
                dim.Clear()
                dim.dim_value = given[axis]
            elif not static:
                symbol = f" ({dim.dim_param!r})" if dim.dim_param else ""
                free = {n: d for n, d in suggest_dims(inputs).items() if n not in shapes}
                options = " ".join(f"--shape {n}={','.join(map(str, d))}"
                                   for n, d in free.items())
                fail(f"{label}: input {vi.name!r} axis {axis}{symbol} is dynamic; fix it with "
                     f"{options}")
