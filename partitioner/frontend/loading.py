"""Reading a model: an ``.onnx`` file (weights left on disk) or a PyTorch module (exported).

Weights are never loaded to analyse a graph: external initialisers stay references, so a
model over 2 GB (whose weights must be external) is read as a small proto, and one whose
``.data`` file is gone still inspects. With ``lazy_weights`` (compiling, profiling) the
file is parsed piece by piece (never its bytes and the parsed proto at once) and big
*inline* initialisers stay in the ``.onnx`` file as inline references
(:mod:`partitioner.frontend.inline_weights`), so the proto does not hold them; otherwise
it is ``onnx.load`` (one C-level parse, 2x the model for a moment).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import sys
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from partitioner.errors import fail
from partitioner.frontend.inline_weights import read_model

__all__ = ["read_onnx", "export_torch", "file_sha256", "check_proto"]

_CHUNK = 1 << 20
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in exporter messages


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, streamed (the profile fingerprint of INTERFACES.md)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_proto(model: onnx.ModelProto, label: str) -> None:
    """Refuse a proto that is not a model (``label`` names it in the error)."""
    # Protobuf parses many byte strings without complaint (an empty file is a valid empty
    # message); a real model has an IR version, an opset and at least one node.
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        fail(f"{label}: not an ONNX model (no IR version, opset or graph)")
    if not model.graph.node:
        fail(f"{label}: the ONNX graph has no nodes")
    if not model.graph.output:
        fail(f"{label}: the ONNX graph has no outputs")


def read_onnx(path: str | Path, *, lazy_weights: bool = False) -> tuple[onnx.ModelProto, str]:
    """Read an ONNX file without its external data.

    Args:
        path: the ``.onnx`` file.
        lazy_weights: leave big inline initialisers in the file as inline references
            (:mod:`partitioner.frontend.inline_weights`).

    Returns:
        The model proto (external initialisers left as references, and with
        ``lazy_weights`` inline ones above
        :data:`~partitioner.frontend.inline_weights.LAZY_MIN_BYTES`) and the file's
        SHA-256.

    Raises:
        UserError: the file is missing, unreadable, not ONNX or truncated.
    """
    path = Path(path)
    if not path.exists():
        fail(f"{path}: no such file")
    if not path.is_file():
        fail(f"{path}: not a file")
    try:
        sha = file_sha256(path)
        model = read_model(path, lazy=lazy_weights)
    except OSError as err:
        fail(f"{path}: cannot read ({err.strerror or err})")
    except (DecodeError, RuntimeError, ValueError, TypeError) as err:
        fail(f"{path}: not a valid ONNX file (truncated or corrupt: {err})")
    check_proto(model, str(path))
    return model, sha


def export_torch(module: Any, example_inputs: Any) -> tuple[onnx.ModelProto, str]:
    """Export a PyTorch module with the dynamo exporter.

    torch is imported here, lazily: the rest of the project never needs it.

    Args:
        module: a ``torch.nn.Module``.
        example_inputs: a tensor or a tuple of tensors, the ``forward`` arguments.

    Returns:
        The exported model and the SHA-256 of its serialised bytes.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover - depends on the environment
        fail("loading a PyTorch module needs torch: pip install 'onnx-partitioner[torch]'")
    name = type(module).__name__
    if example_inputs is None:
        fail(f"PyTorch module {name}: example_inputs are required to export it")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = module.training
    module.eval()
    try:
        # The exporter prints progress on stdout, which belongs to --json documents.
        with contextlib.redirect_stdout(sys.stderr):
            program = torch.onnx.export(module, args, dynamo=True, verbose=False)
    except Exception as err:  # the exporter raises many types; any is a user-facing failure
        text = _ANSI.sub("", str(err)).strip()
        first = text.splitlines()[0] if text else type(err).__name__
        fail(f"PyTorch module {name}: ONNX export failed: {first}")
    finally:
        module.train(was_training)
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        fail(f"PyTorch module {name}: the exporter returned no program")
    model = program.model_proto
    if not model.graph.name or model.graph.name == "main_graph":
        model.graph.name = name
    data = model.SerializeToString()
    check_proto(model, f"PyTorch module {name}")
    return model, hashlib.sha256(data).hexdigest()
