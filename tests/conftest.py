"""Shared pytest fixtures (keep this file small).

Fixtures:
    save_onnx: ``save_onnx(model, name="model.onnx", **onnx_save_kwargs) -> Path`` writes an
        ``onnx.ModelProto`` into the test's ``tmp_path`` (pass ``save_as_external_data=True``
        and friends for external weights) and returns the file path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest


@pytest.fixture
def save_onnx(tmp_path: Path) -> Callable[..., Path]:
    """Write a model under ``tmp_path`` and return its path."""

    def _save(model: onnx.ModelProto, name: str = "model.onnx", **kwargs: Any) -> Path:
        path = tmp_path / name
        onnx.save(model, str(path), **kwargs)
        return path

    return _save
