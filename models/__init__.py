"""Builders of reference models (random weights, no downloads).

Every model is written directly with ``onnx.helper`` (see :mod:`models.builder`) from a
seeded numpy generator, so the zoo needs neither torch nor a network and each model
builds in seconds. Names, layouts and parameter counts of the classifiers follow
torchvision; :data:`PUBLISHED` holds their published reference figures.

Example:
    >>> import models
    >>> m = models.build_model("tiny_cnn", dynamic_batch=True)
    >>> models.save_model("resnet18", "resnet18.onnx", external_data=True)
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from models.cnn import alexnet, mobilenet_v2, resnet18, resnet50, tiny_cnn, vgg11, vgg16
from models.exits import branchy_alexnet, resnet18_exit, tiny_branchy
from models.published import PUBLISHED
from models.rnn import lstm_small
from models.vit import vit_b_16, vit_tiny
from models.yolo import yolo_small
from models.yolo11 import yolo11_small
from partitioner.errors import fail

__all__ = ["PUBLISHED", "ModelInfo", "MODELS", "list_models", "build_model", "save_model"]


@dataclass(frozen=True)
class ModelInfo:
    """One zoo entry: its builder, default input size and a one-line description."""

    builder: Callable[..., onnx.ModelProto]
    image_size: int
    description: str


MODELS: dict[str, ModelInfo] = {
    "alexnet": ModelInfo(alexnet, 224, "AlexNet, torchvision layout"),
    "vgg11": ModelInfo(vgg11, 224, "VGG11, torchvision layout"),
    "vgg16": ModelInfo(vgg16, 224, "VGG16, torchvision layout"),
    "resnet18": ModelInfo(resnet18, 224, "ResNet-18 (BN, residual adds), torchvision layout"),
    "resnet50": ModelInfo(resnet50, 224, "ResNet-50 v1.5 (bottlenecks), torchvision layout"),
    "mobilenet_v2": ModelInfo(mobilenet_v2, 224, "MobileNetV2 (depthwise, ReLU6), torchvision"),
    "vit_b_16": ModelInfo(vit_b_16, 224, "ViT-B/16, torchvision layout"),
    "vit_tiny": ModelInfo(vit_tiny, 224, "small ViT: patch 16, dim 192, depth 4, 3 heads"),
    "yolo_small": ModelInfo(yolo_small, 640, "YOLO-style detector, FPN/PAN neck, 3 outputs"),
    "yolo11_small": ModelInfo(yolo11_small, 640, "YOLO11-shaped detector: C3k2, SPPF, C2PSA "
                              "attention, 3-scale head"),
    "lstm_small": ModelInfo(lstm_small, 32, "2-layer LSTM classifier (size = sequence length)"),
    "tiny_cnn": ModelInfo(tiny_cnn, 32, "4-layer chain CNN, 24k parameters, for fast tests"),
    "branchy_alexnet": ModelInfo(branchy_alexnet, 224,
                                 "AlexNet + BranchyNet exit after conv2 (outputs logits, exit1)"),
    "resnet18_exit": ModelInfo(resnet18_exit, 224,
                               "ResNet-18 + an exit after layer2 (outputs logits, exit1)"),
    "tiny_branchy": ModelInfo(tiny_branchy, 32, "tiny_cnn + an exit after conv1, for fast tests"),
}


def list_models() -> list[str]:
    """Names of the models :func:`build_model` can build, sorted."""
    return sorted(MODELS)


def build_model(name: str, *, batch: int = 1, image_size: int | None = None,
                dynamic_batch: bool = False, seed: int = 0) -> onnx.ModelProto:
    """Build a zoo model with random weights.

    Args:
        name: One of :func:`list_models`.
        batch: Static batch size (ignored when ``dynamic_batch``).
        image_size: Input height = width (sequence length for ``lstm_small``); ``None``
            for the model's default (224, 640 for ``yolo_small`` and ``yolo11_small``, 32
            for the small ones).
        dynamic_batch: Make the batch dimension the symbolic ``"batch"`` (inputs and
            outputs), so callers must fix it (``--shape``).
        seed: Seed of the weight generator; the same seed gives the same bytes.

    Returns:
        The model (opset 17), weights stored inline.

    Raises:
        UserError: Unknown name, non-positive batch or size, or a size the model cannot take.
    """
    info = MODELS.get(name)
    if info is None:
        fail(f"unknown model {name!r}; known: {', '.join(list_models())}")
    if not dynamic_batch and (isinstance(batch, bool) or not isinstance(batch, int)
                              or batch < 1):
        fail(f"model {name}: batch must be a positive integer, got {batch!r}")
    size = info.image_size if image_size is None else image_size
    if not isinstance(size, int) or size < 1:
        fail(f"model {name}: image size must be a positive integer, got {size!r}")
    return info.builder("batch" if dynamic_batch else batch, size, seed=seed)


def save_model(name: str, path: str | os.PathLike[str], *, external_data: bool = False,
               **kw: object) -> Path:
    """Build model ``name`` and write it to ``path`` atomically.

    Args:
        name: One of :func:`list_models`.
        path: Destination ``.onnx`` file.
        external_data: Store the weights in a side file ``<file name>.data`` next to it.
        **kw: Passed to :func:`build_model` (``batch``, ``image_size``, ``dynamic_batch``,
            ``seed``).

    Returns:
        The path written. Files are written in a temporary folder beside ``path`` and
        moved into place (data first), so an interrupted save leaves no partial file.
    """
    dest = Path(path)
    if dest.is_dir():
        fail(f"{dest}: is a folder, expected an .onnx file path")
    if not dest.parent.is_dir():
        fail(f"{dest.parent}: folder does not exist")
    model = build_model(name, **kw)  # type: ignore[arg-type]
    data_name = f"{dest.name}.data" if external_data else None
    tmp_dir: Path | None = None
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        _write(model, tmp_dir, dest, data_name)
    except OSError as err:
        fail(f"{dest}: cannot write: {err.strerror or err}")
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    return dest


def _write(model: onnx.ModelProto, tmp_dir: Path, dest: Path, data_name: str | None) -> None:
    """Save into ``tmp_dir``, then move the data file and the model over ``dest``."""
    tmp_model = tmp_dir / dest.name
    if data_name is not None:
        # A fresh folder: onnx appends to an existing data file, never truncates it.
        onnx.save_model(model, tmp_model, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        data = tmp_dir / data_name
        if data.exists():   # absent when no tensor reaches the 1 KiB threshold
            # onnx creates the data file owner-only; give it the model file's mode.
            os.chmod(data, stat.S_IMODE(tmp_model.stat().st_mode))
            os.replace(data, dest.parent / data_name)
    else:
        onnx.save_model(model, tmp_model)
    os.replace(tmp_model, dest)
