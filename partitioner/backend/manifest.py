"""The bundle manifest (``manifest.json``, schema version 1) and its validating loader.

A bundle is a directory holding ``manifest.json`` and one ONNX file per stage (plus the
stage's external-data file for large stages, and optionally a Triton model repository).
The stage ids are the chain order: stage ``i`` sends everything the later stages or the
destination still need to stage ``i + 1`` (``next``). A tensor produced at stage ``a`` and
read at stage ``c > a + 1`` is *forwarded* by the stages between, which list it under
``forward`` and pass it on without running ONNX Runtime (``"transfer": "forwarded"``): the
chain cost model (SPEC §2) prices such a tensor in every cut it crosses, so the bundle does
exactly what the plan priced.

:func:`load_bundle` trusts nothing in the directory: schema version, required keys, paths
(relative, inside the bundle, no symlink leading out), and the SHA-256 of every stage file
and external-data file are checked, each failure a one-line :class:`UserError` naming the
stage and file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from partitioner import __version__
from partitioner.errors import UserError, fail
from partitioner.ir import Plan

__all__ = [
    "SCHEMA_VERSION",
    "PRODUCER",
    "MANIFEST",
    "Endpoint",
    "TensorSpec",
    "ModelSpec",
    "StageSpec",
    "Bundle",
    "load_bundle",
    "sha256_file",
    "safe_path",
    "dumps",
]

SCHEMA_VERSION = 1
PRODUCER = f"partitioner {__version__}"
MANIFEST = "manifest.json"

# Where a tensor comes from / goes to: a stage id, the model input, the model output.
Endpoint = int | Literal["input", "output"]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in chunks (stage files can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dumps(doc: Any, indent: int = 0) -> str:
    """JSON with two-space indentation whose lists of scalars (shapes) stay on one line."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(doc, Mapping) and doc:
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, indent + 1)}" for k, v in doc.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(doc, (list, tuple)) and doc:
        if all(not isinstance(x, (Mapping, list, tuple)) for x in doc):
            return "[" + ", ".join(json.dumps(x) for x in doc) + "]"
        return "[\n" + ",\n".join(inner + dumps(x, indent + 1) for x in doc) + "\n" + pad + "]"
    return json.dumps(doc)


def _need(doc: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(doc, Mapping):
        fail(f"{where}: expected an object, found {type(doc).__name__}")
    if key not in doc:
        fail(f"{where}: missing required key {key!r}")
    return doc[key]


def _endpoint(value: Any, where: str) -> Endpoint:
    if value in ("input", "output") or (isinstance(value, int) and not isinstance(value, bool)
                                       and value >= 0):
        return value  # type: ignore[no-any-return]
    fail(f"{where}: {value!r} is not a stage id, 'input' or 'output'")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor crossing a boundary: name, static shape, numpy dtype name.

    Attributes:
        source: where it comes from (JSON ``from``): a stage id or ``"input"``; None for
            the model's own input/output lists and for stage outputs.
        targets: where it goes (JSON ``to``): stage ids and/or ``"output"``; empty for
            stage inputs and the model lists.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: Endpoint | None = None
    targets: tuple[Endpoint, ...] = ()

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "shape": list(self.shape),
                               "dtype": self.dtype}
        if self.source is not None:
            doc["from"] = self.source
        if self.targets:
            doc["to"] = list(self.targets)
        return doc

    @staticmethod
    def from_json(doc: Mapping[str, Any], where: str = "tensor") -> TensorSpec:
        name = _need(doc, "name", where)
        where = f"{where} {name!r}"
        shape = _need(doc, "shape", where)
        dtype = _need(doc, "dtype", where)
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            fail(f"{where}: shape must be a list of non-negative integers")
        try:
            np.dtype(dtype)
        except TypeError:
            fail(f"{where}: unknown dtype {dtype!r}")
        src = doc.get("from")
        return TensorSpec(str(name), tuple(shape), str(dtype),
                          None if src is None else _endpoint(src, where),
                          tuple(_endpoint(t, where) for t in doc.get("to", ())))


def _tensors(docs: Any, where: str) -> tuple[TensorSpec, ...]:
    if not isinstance(docs, list):
        fail(f"{where}: expected a list of tensors")
    return tuple(TensorSpec.from_json(d, where) for d in docs)


@dataclass(frozen=True)
class ModelSpec:
    """The whole model the bundle was compiled from."""

    name: str
    sha256: str
    granularity: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    layers: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "granularity": self.granularity,
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs],
                "layers": list(self.layers)}

    @staticmethod
    def from_json(doc: Mapping[str, Any]) -> ModelSpec:
        w = "manifest model"
        return ModelSpec(str(_need(doc, "name", w)), str(_need(doc, "sha256", w)),
                         str(_need(doc, "granularity", w)),
                         _tensors(_need(doc, "inputs", w), f"{w} inputs"),
                         _tensors(_need(doc, "outputs", w), f"{w} outputs"),
                         tuple(str(x) for x in doc.get("layers", ())))


@dataclass(frozen=True)
class StageSpec:
    """One stage: layers ``first..last`` run on ``device`` from ``file``.

    ``inputs`` are the ONNX file's inputs, ``outputs`` its outputs, ``forward`` the tensors
    it receives and passes on unchanged; it sends ``outputs`` and ``forward`` to ``next``
    (or, for the last stage, to the destination as the model outputs).
    """

    id: int
    device: str
    frequency: str | None
    first: int
    last: int
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    forward: tuple[TensorSpec, ...] = ()
    next: int | None = None
    external_data: str | None = None
    external_data_sha256: str | None = None
    triton: str | None = None
    estimate: Mapping[str, Any] | None = None

    @property
    def sends(self) -> tuple[TensorSpec, ...]:
        """Every tensor this stage hands on (its outputs, then what it forwards)."""
        return self.outputs + self.forward

    @property
    def send_bytes(self) -> int:
        return sum(t.nbytes for t in self.sends)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "device": self.device, "frequency": self.frequency,
                "layers": [self.first, self.last], "file": self.file, "sha256": self.sha256,
                "external_data": self.external_data,
                "external_data_sha256": self.external_data_sha256,
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs],
                "forward": [t.to_json() for t in self.forward],
                "next": self.next, "triton": self.triton, "estimate": self.estimate}

    @staticmethod
    def from_json(doc: Mapping[str, Any], where: str = "manifest stage") -> StageSpec:
        sid = _need(doc, "id", where)
        if not isinstance(sid, int) or isinstance(sid, bool) or sid < 0:
            fail(f"{where}: id {sid!r} is not a non-negative integer")
        where = f"manifest stage {sid}"
        layers = _need(doc, "layers", where)
        if (not isinstance(layers, list) or len(layers) != 2
                or not all(isinstance(x, int) for x in layers) or layers[0] > layers[1]):
            fail(f"{where}: layers must be [first, last] with first <= last")
        nxt = doc.get("next")
        if nxt is not None and (not isinstance(nxt, int) or isinstance(nxt, bool)):
            fail(f"{where}: next {nxt!r} is not a stage id or null")
        return StageSpec(
            id=sid, device=str(_need(doc, "device", where)), frequency=doc.get("frequency"),
            first=layers[0], last=layers[1], file=str(_need(doc, "file", where)),
            sha256=str(_need(doc, "sha256", where)),
            inputs=_tensors(_need(doc, "inputs", where), f"{where} inputs"),
            outputs=_tensors(_need(doc, "outputs", where), f"{where} outputs"),
            forward=_tensors(doc.get("forward", []), f"{where} forward"),
            next=nxt, external_data=doc.get("external_data"),
            external_data_sha256=doc.get("external_data_sha256"),
            triton=doc.get("triton"), estimate=doc.get("estimate"))


@dataclass(frozen=True)
class Bundle:
    """A loaded, validated bundle. ``path`` is the bundle directory (not serialised)."""

    path: Path
    model: ModelSpec
    plan: Mapping[str, Any]
    stages: tuple[StageSpec, ...]
    source: str | None = None
    destination: str | None = None
    verification: Mapping[str, Any] | None = None
    transfer: str = "forwarded"
    schema_version: int = SCHEMA_VERSION
    producer: str = PRODUCER
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.path

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The model inputs (what the source sends to stage 0)."""
        return self.model.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """The model outputs (what the last stage sends to the destination)."""
        return self.model.outputs

    def stage_path(self, stage: StageSpec | int) -> Path:
        s = self.stages[stage] if isinstance(stage, int) else stage
        return self.path / s.file

    def plan_object(self) -> Plan:
        return Plan.from_json(self.plan)

    def to_json(self) -> dict[str, Any]:
        doc = {"schema_version": self.schema_version, "producer": self.producer,
               "model": self.model.to_json(), "plan": dict(self.plan),
               "source": self.source, "destination": self.destination,
               "transfer": self.transfer,
               "stages": [s.to_json() for s in self.stages],
               "verification": None if self.verification is None else dict(self.verification)}
        doc.update(self.extra)
        return doc

    @staticmethod
    def from_json(doc: Mapping[str, Any], path: Path) -> Bundle:
        version = _need(doc, "schema_version", "manifest")
        if version != SCHEMA_VERSION:
            fail(f"{path / MANIFEST}: schema_version {version!r} is not supported "
                 f"(this partitioner reads {SCHEMA_VERSION})")
        stages_doc = _need(doc, "stages", "manifest")
        if not isinstance(stages_doc, list) or not stages_doc:
            fail(f"{path / MANIFEST}: 'stages' must be a non-empty list")
        plan = _need(doc, "plan", "manifest")
        if not isinstance(plan, Mapping):
            fail(f"{path / MANIFEST}: 'plan' must be an object")
        known = {"schema_version", "producer", "model", "plan", "source", "destination",
                 "transfer", "stages", "verification"}
        return Bundle(
            path=path, model=ModelSpec.from_json(_need(doc, "model", "manifest")),
            plan=dict(plan), stages=tuple(StageSpec.from_json(s) for s in stages_doc),
            source=doc.get("source"), destination=doc.get("destination"),
            verification=doc.get("verification"), transfer=str(doc.get("transfer",
                                                                       "forwarded")),
            schema_version=version, producer=str(doc.get("producer", "")),
            extra={k: v for k, v in doc.items() if k not in known})


# --------------------------------------------------------------------------- validation


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


def _check_chain(stages: Sequence[StageSpec], where: Path) -> None:
    for i, s in enumerate(stages):
        if s.id != i:
            fail(f"{where}: stage at position {i} has id {s.id}; ids must be 0..{len(stages) - 1}"
                 f" in chain order")
        want = i + 1 if i + 1 < len(stages) else None
        if s.next != want:
            fail(f"{where}: stage {i} has next {s.next!r}, expected {want!r}")
        for t in s.inputs:
            if t.source != "input" and not (isinstance(t.source, int) and t.source < i):
                fail(f"{where}: stage {i} input {t.name!r} comes from {t.source!r}, "
                     f"which is not an earlier stage or the model input")


def _check_external_refs(path: Path, allowed: str | None, what: str) -> None:
    """Every external-data location inside the stage file is the declared one."""
    import onnx

    from partitioner.frontend.slicing import iter_tensors

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


def load_bundle(path: str | os.PathLike[str], *, check_onnx: bool = True) -> Bundle:
    """Read and validate a bundle directory.

    Args:
        path: the bundle directory (or its ``manifest.json``).
        check_onnx: also parse each stage file and check that its external data
            references are the declared file (cheap: weights are not loaded).

    Returns:
        The bundle.

    Raises:
        UserError: a one-line message naming the stage and file at fault.
    """
    root = Path(path)
    if root.name == MANIFEST and root.is_file():
        root = root.parent
    manifest = root / MANIFEST
    if not manifest.is_file():
        fail(f"{root}: not a bundle directory (no {MANIFEST})")
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        fail(f"{manifest}: not valid JSON ({err})")
    if not isinstance(doc, dict):
        fail(f"{manifest}: expected a JSON object")
    try:
        bundle = Bundle.from_json(doc, root)
    except (KeyError, TypeError, ValueError) as err:  # malformed values inside known keys
        raise UserError(f"{manifest}: malformed manifest ({err.__class__.__name__}: {err})"
                        ) from None
    _check_chain(bundle.stages, manifest)
    for s in bundle.stages:
        what = f"stage {s.id} ({s.device})"
        _check_file(root, s.file, s.sha256, what)
        if s.external_data is not None:
            if PurePosixPath(s.external_data).parent != PurePosixPath(s.file).parent:
                fail(f"{what}: external data {s.external_data!r} must sit next to {s.file!r}")
            _check_file(root, s.external_data, s.external_data_sha256, what)
        if check_onnx:
            ext = None if s.external_data is None else PurePosixPath(s.external_data).name
            _check_external_refs(root / s.file, ext, what)
        if s.triton is not None:
            tdir = safe_path(root, s.triton, f"{what} triton")
            if not (tdir / "config.pbtxt").is_file():
                fail(f"{what}: Triton model {s.triton!r} has no config.pbtxt")
    return bundle
