"""Loading a bundle directory, trusting nothing in it: :func:`load_bundle`.

Checked, each failure a one-line :class:`~stagebundle.errors.UserError` naming the stage
(or part) and file: schema version and keys; paths (relative, inside the bundle, no
symlink leading out); the SHA-256 of every unit file and external-data file; that every
external-data reference inside an ONNX file is the declared file; that the sends of the
stage graph add up (:func:`stagebundle.graph.check_graph`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from stagebundle.errors import UserError, fail
from stagebundle.manifest import MANIFEST, Bundle, Unit

__all__ = ["load_bundle", "sha256_file", "safe_path", "iter_tensors"]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks (stage files can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safe_path(root: Path, rel: str, what: str) -> Path:
    """``root / rel`` after checking it stays inside ``root`` (symlinks resolved).

    Raises:
        UserError: ``rel`` is absolute, contains ``..``, or resolves outside ``root``.
    """
    pure = PurePosixPath(rel)
    if not rel or pure.is_absolute() or Path(rel).is_absolute() or "\\" in rel:
        fail(f"{what}: path {rel!r} must be relative to the bundle directory")
    if ".." in pure.parts:
        fail(f"{what}: path {rel!r} escapes the bundle directory ('..')")
    path = root / rel
    real_root = root.resolve()
    real = path.resolve()
    if real != real_root and real_root not in real.parents:
        fail(f"{what}: path {rel!r} leads outside the bundle directory (symlink to {real})")
    return path


def _check_file(root: Path, rel: str, digest: str | None, what: str) -> None:
    path = safe_path(root, rel, what)
    if not path.is_file():
        fail(f"{what}: file {rel!r} is missing from bundle {str(root)!r}")
    if digest is None:
        fail(f"{what}: no sha256 recorded for {rel!r}")
    actual = sha256_file(path)
    if actual != digest:
        fail(f"{what}: file {rel!r} does not match its sha256 (manifest {digest[:12]}..., "
             f"file {actual[:12]}...); the bundle was modified")


def iter_tensors(model: Any) -> Iterator[Any]:
    """Every tensor that can hold weights: initialisers and tensor attributes, recursively."""

    def in_graph(g: Any) -> Iterator[Any]:
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from in_graph(attr.g)
                for sub in attr.graphs:
                    yield from in_graph(sub)

    yield from in_graph(model.graph)


def _check_external_refs(path: Path, allowed: str | None, what: str) -> None:
    """Every external-data location inside the ONNX file is the declared one."""
    import onnx

    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        fail(f"{what}: {path.name} is not a readable ONNX file ({err.__class__.__name__})")
    for t in iter_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if loc != allowed:
                fail(f"{what}: tensor {t.name!r} in {path.name} reads external data from "
                     f"{loc!r}, which the manifest does not declare")


def _check_chain(bundle: Bundle, where: Path) -> None:
    """Stage ids are 0..n-1 in order; inputs come from earlier stages (both schemas)."""
    stages = bundle.stages
    for i, s in enumerate(stages):
        if s.id != i:
            fail(f"{where}: stage at position {i} has id {s.id}; ids must be 0..{len(stages) - 1}"
                 f" in stage order")
        if bundle.schema_version == 1:
            want = i + 1 if i + 1 < len(stages) else None
            if s.next != want:
                fail(f"{where}: stage {i} has next {s.next!r}, expected {want!r}")
        for t in s.inputs:
            if t.source != "input" and not (isinstance(t.source, int) and t.source < i):
                fail(f"{where}: stage {i} input {t.name!r} comes from {t.source!r}, "
                     f"which is not an earlier stage or the model input")


def _check_unit(root: Path, unit: Unit, check_onnx: bool) -> None:
    what = f"stage {unit.key} ({unit.device})" if unit.part is None else \
        f"stage {unit.stage} part {unit.part} ({unit.device})"
    _check_file(root, unit.file, unit.sha256, what)
    if unit.external_data is not None:
        if PurePosixPath(unit.external_data).parent != PurePosixPath(unit.file).parent:
            fail(f"{what}: external data {unit.external_data!r} must sit next to {unit.file!r}")
        _check_file(root, unit.external_data, unit.external_data_sha256, what)
    if check_onnx:
        ext = None if unit.external_data is None else PurePosixPath(unit.external_data).name
        _check_external_refs(root / unit.file, ext, what)


def load_bundle(path: str | os.PathLike[str], *, check_onnx: bool = True) -> Bundle:
    """Read and validate a bundle directory (schema 1 or 2).

    Args:
        path: the bundle directory (or its ``manifest.json``).
        check_onnx: also parse each unit file and check that its external data
            references are the declared file (cheap: weights are not loaded).

    Raises:
        UserError: a one-line message naming the stage and file at fault.
    """
    from stagebundle.graph import check_graph

    root = Path(path)
    if root.name == MANIFEST and root.is_file():
        root = root.parent
    manifest = root / MANIFEST
    if not manifest.is_file():
        fail(f"{root}: not a bundle directory (no {MANIFEST})")
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        fail(f"{manifest}: not valid JSON ({err.__class__.__name__})")
    try:
        bundle = Bundle.from_json(doc, root)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{manifest}: malformed manifest ({err.__class__.__name__}: {err})"
                        ) from None
    _check_chain(bundle, manifest)
    for unit in bundle.units():
        _check_unit(root, unit, check_onnx)
    for s in bundle.stages:
        if s.triton is not None:
            what = f"stage {s.id} ({s.device})"
            tdir = safe_path(root, s.triton, f"{what} triton")
            if not (tdir / "config.pbtxt").is_file():
                fail(f"{what}: Triton model {s.triton!r} has no config.pbtxt")
    check_graph(bundle)
    return bundle
