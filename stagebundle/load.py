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

__all__ = ["load_bundle", "sha256_file", "safe_path", "iter_tensors", "read_verified"]


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
    """Every dense tensor that can hold weights or point at external data, recursively.

    Initialisers, sparse initialisers (values and indices), tensor and sparse-tensor
    attributes, in the main graph, every sub-graph and every local function: each of them
    can carry an external-data location (the CVE-2022-25882 / CVE-2024-27318 /
    CVE-2025-51480 class), so each is checked whatever ONNX Runtime version reads it.
    """

    def sparse(sp: Any) -> Iterator[Any]:
        yield sp.values
        yield sp.indices

    def in_nodes(nodes: Any) -> Iterator[Any]:
        for node in nodes:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("sparse_tensor"):
                    yield from sparse(attr.sparse_tensor)
                for sp in attr.sparse_tensors:
                    yield from sparse(sp)
                if attr.HasField("g"):
                    yield from in_graph(attr.g)
                for sub in attr.graphs:
                    yield from in_graph(sub)

    def in_graph(g: Any) -> Iterator[Any]:
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield from sparse(sp)
        yield from in_nodes(g.node)

    yield from in_graph(model.graph)
    for fn in model.functions:
        yield from in_nodes(fn.node)


def read_verified(root: Path, rel: str, digest: str | None, what: str) -> bytes:
    """The bytes of a bundle file, checked against its SHA-256 *as read*.

    Whoever loads a file should hand these bytes on (ONNX Runtime accepts a model as
    bytes) rather than re-open the path: that closes the check-then-open race.
    """
    path = safe_path(root, rel, what)
    if not path.is_file():
        fail(f"{what}: file {rel!r} is missing from bundle {str(root)!r}")
    if digest is None:
        fail(f"{what}: no sha256 recorded for {rel!r}")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        fail(f"{what}: file {rel!r} does not match its sha256 (manifest {digest[:12]}..., "
             f"file {actual[:12]}...); the bundle was modified")
    return data


def _value_shapes(values: Any) -> dict[str, tuple[tuple[int | None, ...], int]]:
    out = {}
    for vi in values:
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        out[vi.name] = (dims, tt.elem_type)
    return out


def _check_onnx(path: Path, unit: Unit, allowed: str | None, what: str) -> None:
    """External-data references are the declared file; inputs/outputs match the manifest."""
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
    declared = {"input": unit.inputs, "output": unit.outputs}
    found = {"input": _value_shapes(model.graph.input),
             "output": _value_shapes(model.graph.output)}
    for side, specs in declared.items():
        for spec in specs:
            if spec.name not in found[side]:
                fail(f"{what}: {path.name} has no {side} {spec.name!r} that the manifest "
                     f"declares")
            dims, elem = found[side][spec.name]
            if len(dims) != len(spec.shape) or any(
                    d is not None and d != s for d, s in zip(dims, spec.shape, strict=True)):
                fail(f"{what}: {side} {spec.name!r} is declared {list(spec.shape)} in the "
                     f"manifest but {[d if d is not None else '?' for d in dims]} in "
                     f"{path.name}")
            try:
                file_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name
            except (KeyError, ValueError, TypeError):
                file_dtype = onnx.TensorProto.DataType.Name(elem).lower()
            if file_dtype != spec.dtype:
                fail(f"{what}: {side} {spec.name!r} is declared {spec.dtype} in the manifest "
                     f"but {file_dtype} in {path.name}")


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
        _check_onnx(root / unit.file, unit, ext, what)


def load_bundle(path: str | os.PathLike[str], *, check_onnx: bool = True,
                device: str | None = None) -> Bundle:
    """Read and validate a bundle directory (schema 1 or 2).

    Args:
        path: the bundle directory (or its ``manifest.json``).
        check_onnx: also parse each unit file and check that its external data
            references are the declared file (cheap: weights are not loaded).
        device: check only the files of this device's units (a worker that builds its
            own units from the model, ``runtime serve --model``, holds no others); the
            manifest and its stage graph are still checked whole.

    Raises:
        UserError: a one-line message naming the stage and file at fault.
    """
    from stagebundle.graph import check_graph

    root = Path(path)
    if root.name == MANIFEST and root.is_file():
        root = root.parent
    manifest = root / MANIFEST
    if manifest.is_dir():
        fail(f"{manifest}: is a folder, not the bundle's manifest file")
    if not manifest.is_file():
        fail(f"{root}: not a bundle directory (no {MANIFEST})")
    safe_path(root, MANIFEST, "bundle")  # a symlinked manifest must not lead outside
    try:
        doc = json.loads(manifest.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        fail(f"{manifest}: not valid JSON ({err.__class__.__name__})")
    try:
        bundle = Bundle.from_json(doc, root)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{manifest}: malformed manifest ({err.__class__.__name__}: {err})"
                        ) from None
    _check_chain(bundle, manifest)
    for unit in bundle.units():
        if device is None or unit.device == device:
            _check_unit(root, unit, check_onnx)
    for s in bundle.stages:
        if s.triton is not None and device is None:
            what = f"stage {s.id} ({s.device})"
            tdir = safe_path(root, s.triton, f"{what} triton")
            if not (tdir / "config.pbtxt").is_file():
                fail(f"{what}: Triton model {s.triton!r} has no config.pbtxt")
    check_graph(bundle)
    return bundle
