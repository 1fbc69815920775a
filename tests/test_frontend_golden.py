"""Golden ``partitioner inspect --json`` documents of three zoo models.

The zoo builds each model from a seeded generator, so its layers, FLOPs, weights and cuts
are fixed; any change in what the front end reports for them (layer grouping, names, FLOP
or weight counting, live tensors across a cut) shows up here as a diff naming the field.

The goldens live in ``tests/testdata/frontend/<model>.inspect.json``. They hold the stable
fields only: the file's ``sha256`` and ``path`` depend on the ONNX serialiser and on where
the file was written, so they are checked separately (the SHA-256 against the file's
bytes). After an intended change, regenerate them and review the diff::

    UPDATE_GOLDEN=1 python -m pytest tests/test_frontend_golden.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import models

GOLDEN_DIR = Path(__file__).parent / "testdata" / "frontend"
MODELS = ("tiny_cnn", "lstm_small", "resnet18")
# Not stable across onnx versions or checkouts: compared separately, not in the golden.
UNSTABLE_MODEL_KEYS = ("sha256", "path")
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def stable_document(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without the fields that depend on the serialiser or the file's location."""
    out = json.loads(json.dumps(doc))  # deep copy
    for key in UNSTABLE_MODEL_KEYS:
        out["model"].pop(key, None)
    return out


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.inspect.json"


def write_golden(name: str, doc: dict[str, Any]) -> None:
    """Write atomically (temp file, then rename), sorted keys, one trailing newline."""
    path = golden_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def first_difference(want: Any, got: Any, where: str = "") -> str | None:
    """The path of the first differing field, with both values (None when equal)."""
    if isinstance(want, dict) and isinstance(got, dict):
        for key in sorted(set(want) | set(got)):
            if key not in got or key not in want:
                side = "missing" if key not in got else "unexpected"
                return f"{where}.{key}: {side}"
            diff = first_difference(want[key], got[key], f"{where}.{key}")
            if diff:
                return diff
        return None
    if isinstance(want, list) and isinstance(got, list):
        for i, (a, b) in enumerate(zip(want, got, strict=False)):
            diff = first_difference(a, b, f"{where}[{i}]")
            if diff:
                return diff
        if len(want) != len(got):
            return f"{where}: {len(got)} items, golden has {len(want)}"
        return None
    return None if want == got else f"{where}: got {got!r}, golden {want!r}"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("zoo")
    return {name: models.save_model(name, folder / f"{name}.onnx") for name in MODELS}


def _inspect_cli(path: Path) -> dict[str, Any]:
    """The real command in a subprocess: one JSON document on stdout, nothing else."""
    proc = subprocess.run([sys.executable, "-m", "partitioner", "inspect", str(path), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", MODELS)
def test_inspect_matches_golden(zoo, name):
    path = zoo[name]
    doc = _inspect_cli(path)
    # The unstable fields, checked on their own.
    assert doc["model"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert Path(doc["model"]["path"]) == path
    got = stable_document(doc)
    if UPDATE:
        write_golden(name, got)
        pytest.skip(f"wrote {golden_path(name)}")
    if not golden_path(name).is_file():
        pytest.fail(f"{golden_path(name)} is missing; run with UPDATE_GOLDEN=1 to create it")
    want = json.loads(golden_path(name).read_text(encoding="utf-8"))
    diff = first_difference(want, got)
    assert diff is None, f"{name}: inspect --json differs from the golden at {diff}"


@pytest.mark.parametrize("name", MODELS)
def test_golden_is_self_consistent(name):
    """The goldens themselves obey the layer-graph rules (so a bad regeneration shows)."""
    doc = json.loads(golden_path(name).read_text(encoding="utf-8"))
    layers, totals, model = doc["layers"], doc["totals"], doc["model"]
    assert [layer["index"] for layer in layers] == list(range(len(layers)))
    assert len({layer["name"] for layer in layers}) == len(layers)
    assert totals["layers"] == len(layers)
    assert totals["flops"] == sum(layer["flops"] for layer in layers)
    assert totals["macs"] == sum(layer["macs"] for layer in layers)
    assert totals["nodes"] == sum(layer["nodes"] for layer in layers)
    # Weights are deduplicated in the totals; no zoo model shares a weight between layers.
    assert totals["weight_count"] == sum(layer["weight_count"] for layer in layers)
    assert totals["weight_bytes"] == sum(layer["weight_bytes"] for layer in layers)
    assert all(layer["weight_bytes"] == 4 * layer["weight_count"] for layer in layers)
    # The cut after the last layer is exactly the model outputs.
    assert layers[-1]["cut_tensors"] == [t["name"] for t in model["outputs"]]
    assert layers[-1]["cut_bytes"] == sum(t["nbytes"] for t in model["outputs"])
    assert totals["max_cut_bytes"] == max([model["input_cut_bytes"]]
                                          + [layer["cut_bytes"] for layer in layers])


def test_in_process_document_matches_the_cli(zoo):
    """``inspect_document`` (the API) and the command agree, so the golden covers both."""
    from partitioner.cli.inspect_cmd import inspect_document
    from partitioner.frontend import load_model

    doc = inspect_document(load_model(zoo["tiny_cnn"]))
    want = json.loads(golden_path("tiny_cnn").read_text(encoding="utf-8"))
    assert first_difference(want, stable_document(doc)) is None
