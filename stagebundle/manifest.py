"""The bundle manifest (``manifest.json``): the one definition of the bundle schema.

The back end writes it (``partitioner.backend``), the runtime reads it; both import only
this package. Schema 2 describes a *stage graph*; schema-1 manifests (a chain of stages,
each relaying what later stages need to the next one) are read too and upgraded on load.

Terms:

* a **stage** is a run of model layers ``first..last`` on one device, or, split by output
  rows, a set of **parts** running in parallel on several devices (DISTREDGE);
* a **unit** is what a worker runs: a whole stage (key ``"3"``) or one part (``"3.1"``);
* every unit lists its **sends**: which tensors (or which rows of them) go to which unit
  (``"output"``: the destination, i.e. the executor). The bundle's ``input_sends`` are what
  the source (the executor) sends. Routing is decided once, by the back end, and stored
  here; the runtime only obeys it (:mod:`stagebundle.graph` holds the shared mechanics);
* a tensor ``TensorSpec`` may cover only ``rows = (first, last)`` of the full tensor's
  height axis (axis 2): a part's inputs and outputs, and the pieces a sender sends.

Per INTERFACES (schema 2), each input of a stage (or part) names ``from`` (the producing
stage id, or ``"input"``) and ``transfer`` (``"direct"``: straight from the producer;
``"forwarded"``: relayed by a stage in between); each output lists ``to``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stagebundle.errors import fail
from stagebundle.fields import (
    INPUT,
    OUTPUT,
    Endpoint,
    Rows,
    as_int,
    as_list,
    as_object,
    as_rows,
    as_str,
    required,
)
from stagebundle.tensors import (  # re-exported: the schema's names stay here
    MAX_TENSOR_BYTES,
    Piece,
    Send,
    TensorSpec,
    send_list,
    tensor_list,
)

__all__ = [
    "SCHEMA_VERSION",
    "READABLE_VERSIONS",
    "MANIFEST",
    "MAX_TENSOR_BYTES",
    "INPUT",
    "OUTPUT",
    "Endpoint",
    "Rows",
    "TensorSpec",
    "Piece",
    "Send",
    "ModelSpec",
    "PartSpec",
    "StageSpec",
    "Unit",
    "Bundle",
    "unit_key",
    "dumps",
]

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"


def unit_key(stage: int, part: int | None = None) -> str:
    """``"3"`` for a whole stage, ``"3.1"`` for part 1 of stage 3."""
    return str(stage) if part is None else f"{stage}.{part}"


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


# --------------------------------------------------------------------------- model, stages


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
    def from_json(doc: Any) -> ModelSpec:
        w = "manifest model"
        return ModelSpec(str(as_str(required(doc, "name", w), f"{w}: name")),
                         str(as_str(required(doc, "sha256", w), f"{w}: sha256")),
                         str(as_str(required(doc, "granularity", w), f"{w}: granularity")),
                         tensor_list(required(doc, "inputs", w), f"{w} inputs"),
                         tensor_list(required(doc, "outputs", w), f"{w} outputs"),
                         tuple(str(x) for x in as_list(doc.get("layers", []), f"{w}: layers")))


@dataclass(frozen=True)
class Unit:
    """What one worker runs: a whole stage or one part of a split stage.

    ``inputs``/``outputs`` are the ONNX file's (rows-sliced for a part); ``forward`` the
    tensors it receives and relays without running them; ``sends`` what it sends where.
    """

    key: str
    stage: int
    part: int | None
    device: str
    frequency: str | None
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    forward: tuple[TensorSpec, ...]
    sends: tuple[Send, ...]
    external_data: str | None = None
    external_data_sha256: str | None = None
    exit: Mapping[str, Any] | None = None

    @property
    def receives(self) -> tuple[TensorSpec, ...]:
        """Every tensor that arrives for this unit (ONNX inputs, then relayed ones)."""
        return self.inputs + self.forward


@dataclass(frozen=True)
class PartSpec:
    """Part ``index`` of a split stage: output ``rows`` of the stage computed on ``device``."""

    index: int
    device: str
    frequency: str | None
    rows: Rows
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sends: tuple[Send, ...] = ()
    external_data: str | None = None
    external_data_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "device": self.device, "frequency": self.frequency,
                "rows": list(self.rows), "file": self.file, "sha256": self.sha256,
                "external_data": self.external_data,
                "external_data_sha256": self.external_data_sha256,
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs],
                "sends": [s.to_json() for s in self.sends]}

    @staticmethod
    def from_json(doc: Any, where: str) -> PartSpec:
        index = as_int(required(doc, "index", where), f"{where}: index")
        where = f"{where} part {index}"
        rows = as_rows(required(doc, "rows", where), where)
        assert rows is not None
        return PartSpec(
            index=index, device=str(as_str(required(doc, "device", where), f"{where}: device")),
            frequency=as_str(doc.get("frequency"), f"{where}: frequency", optional=True),
            rows=rows, file=str(as_str(required(doc, "file", where), f"{where}: file")),
            sha256=str(as_str(required(doc, "sha256", where), f"{where}: sha256")),
            inputs=tensor_list(required(doc, "inputs", where), f"{where} inputs"),
            outputs=tensor_list(required(doc, "outputs", where), f"{where} outputs"),
            sends=send_list(doc.get("sends", []), where),
            external_data=as_str(doc.get("external_data"), f"{where}: external_data",
                               optional=True),
            external_data_sha256=as_str(doc.get("external_data_sha256"),
                                      f"{where}: external_data_sha256", optional=True))


@dataclass(frozen=True)
class StageSpec:
    """One stage: layers ``first..last``, on ``device`` from ``file``, or split in ``parts``.

    For a split stage ``device``, ``file`` and ``sha256`` are None and ``inputs`` /
    ``outputs`` describe the whole stage (unsliced), with ``from`` / ``to``.
    ``next`` is the chain successor (schema 1 semantics; informative in schema 2).
    """

    id: int
    device: str | None
    frequency: str | None
    first: int
    last: int
    file: str | None
    sha256: str | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    forward: tuple[TensorSpec, ...] = ()
    next: int | None = None
    external_data: str | None = None
    external_data_sha256: str | None = None
    triton: str | None = None
    estimate: Mapping[str, Any] | None = None
    parts: tuple[PartSpec, ...] | None = None
    quantized: tuple[int, ...] = ()
    exit: Mapping[str, Any] | None = None
    sends: tuple[Send, ...] = ()

    @property
    def devices(self) -> tuple[str, ...]:
        if self.parts:
            return tuple(dict.fromkeys(p.device for p in self.parts))
        return (self.device,) if self.device is not None else ()

    @property
    def units(self) -> tuple[Unit, ...]:
        """The stage itself, or its parts, as units."""
        if self.parts:
            return tuple(Unit(unit_key(self.id, p.index), self.id, p.index, p.device,
                              p.frequency, p.file, p.sha256, p.inputs, p.outputs, (),
                              p.sends, p.external_data, p.external_data_sha256, self.exit)
                         for p in self.parts)
        assert self.device is not None and self.file is not None and self.sha256 is not None
        return (Unit(unit_key(self.id), self.id, None, self.device, self.frequency, self.file,
                     self.sha256, self.inputs, self.outputs, self.forward, self.sends,
                     self.external_data, self.external_data_sha256, self.exit),)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "device": self.device, "frequency": self.frequency,
                "layers": [self.first, self.last], "file": self.file, "sha256": self.sha256,
                "external_data": self.external_data,
                "external_data_sha256": self.external_data_sha256,
                "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs],
                "forward": [t.to_json() for t in self.forward],
                "sends": [s.to_json() for s in self.sends],
                "next": self.next, "triton": self.triton, "estimate": self.estimate,
                "parts": None if self.parts is None else [p.to_json() for p in self.parts],
                "quantized": list(self.quantized),
                "exit": None if self.exit is None else dict(self.exit)}

    @staticmethod
    def from_json(doc: Any, where: str = "manifest stage") -> StageSpec:
        sid = as_int(required(doc, "id", where), f"{where}: id")
        where = f"manifest stage {sid}"
        layers = as_list(required(doc, "layers", where), f"{where}: layers")
        if len(layers) != 2:
            fail(f"{where}: layers must be [first, last] with first <= last")
        first, last = (as_int(x, f"{where}: layers") for x in layers)
        if first > last:
            fail(f"{where}: layers must be [first, last] with first <= last")
        nxt = doc.get("next")
        if nxt is not None:
            as_int(nxt, f"{where}: next")
        parts_doc = doc.get("parts")
        parts = None if parts_doc is None else tuple(
            PartSpec.from_json(p, where) for p in as_list(parts_doc, f"{where}: parts"))
        if parts is not None and not parts:
            fail(f"{where}: parts must be null or a non-empty list")
        split = parts is not None
        if not split:  # a whole stage names its device and file
            for key in ("device", "file", "sha256"):
                required(doc, key, where)
        ex = doc.get("exit")
        if ex is not None:
            as_object(ex, f"{where}: exit")
        estimate = doc.get("estimate")
        if estimate is not None:
            as_object(estimate, f"{where}: estimate")
        return StageSpec(
            id=sid, device=as_str(doc.get("device"), f"{where}: device", optional=split),
            frequency=as_str(doc.get("frequency"), f"{where}: frequency", optional=True),
            first=first, last=last,
            file=as_str(doc.get("file"), f"{where}: file", optional=split),
            sha256=as_str(doc.get("sha256"), f"{where}: sha256", optional=split),
            inputs=tensor_list(required(doc, "inputs", where), f"{where} inputs"),
            outputs=tensor_list(required(doc, "outputs", where), f"{where} outputs"),
            forward=tensor_list(doc.get("forward", []), f"{where} forward"),
            next=nxt,
            external_data=as_str(doc.get("external_data"), f"{where}: external_data",
                               optional=True),
            external_data_sha256=as_str(doc.get("external_data_sha256"),
                                      f"{where}: external_data_sha256", optional=True),
            triton=as_str(doc.get("triton"), f"{where}: triton", optional=True),
            estimate=estimate, parts=parts,
            quantized=tuple(as_int(q, f"{where}: quantized")
                            for q in as_list(doc.get("quantized", []), f"{where}: quantized")),
            exit=ex, sends=send_list(doc.get("sends", []), where))


# --------------------------------------------------------------------------- bundle


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle. ``path`` is the bundle directory (not serialised).

    ``input_sends`` are what the source sends to the units that read model inputs.
    """

    path: Path
    model: ModelSpec
    plan: Mapping[str, Any]
    stages: tuple[StageSpec, ...]
    input_sends: tuple[Send, ...] = ()
    source: str | None = None
    destination: str | None = None
    verification: Mapping[str, Any] | None = None
    transfer: str = "direct"
    schema_version: int = SCHEMA_VERSION
    producer: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.path

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.model.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.model.outputs

    def units(self) -> Iterator[Unit]:
        """Every unit, in stage order (a topological order of the stage graph)."""
        for s in self.stages:
            yield from s.units

    def unit(self, key: str) -> Unit:
        for u in self.units():
            if u.key == key:
                return u
        raise KeyError(key)

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device a unit runs on, in stage order, without repeats."""
        return tuple(dict.fromkeys(u.device for u in self.units()))

    def stage_path(self, stage: StageSpec | int) -> Path:
        s = self.stages[stage] if isinstance(stage, int) else stage
        if s.file is None:
            raise ValueError(f"stage {s.id} is split into parts; it has no single file")
        return self.path / s.file

    def unit_path(self, unit: Unit) -> Path:
        return self.path / unit.file

    def to_json(self) -> dict[str, Any]:
        doc = {"schema_version": self.schema_version, "producer": self.producer,
               "model": self.model.to_json(), "plan": dict(self.plan),
               "source": self.source, "destination": self.destination,
               "transfer": self.transfer,
               "input_sends": [s.to_json() for s in self.input_sends],
               "stages": [s.to_json() for s in self.stages],
               "verification": None if self.verification is None else dict(self.verification)}
        doc.update(self.extra)
        return doc

    @staticmethod
    def from_json(doc: Any, path: Path) -> Bundle:
        where = str(path / MANIFEST)
        version = required(as_object(doc, where), "schema_version", where)
        if version not in READABLE_VERSIONS:
            fail(f"{where}: schema_version {version!r} is not supported (this version reads "
                 f"{', '.join(map(str, READABLE_VERSIONS))})")
        stages_doc = as_list(required(doc, "stages", where), f"{where}: stages")
        if not stages_doc:
            fail(f"{where}: 'stages' must be a non-empty list")
        plan = as_object(required(doc, "plan", where), f"{where}: plan")
        verification = doc.get("verification")
        if verification is not None:
            as_object(verification, f"{where}: verification")
        known = {"schema_version", "producer", "model", "plan", "source", "destination",
                 "transfer", "stages", "verification", "input_sends"}
        bundle = Bundle(
            path=path, model=ModelSpec.from_json(required(doc, "model", where)),
            plan=dict(plan), stages=tuple(StageSpec.from_json(s) for s in stages_doc),
            input_sends=send_list(doc.get("input_sends", []), where),
            source=as_str(doc.get("source"), f"{where}: source", optional=True),
            destination=as_str(doc.get("destination"), f"{where}: destination", optional=True),
            verification=verification,
            transfer=str(doc.get("transfer", "forwarded")), schema_version=version,
            producer=str(doc.get("producer", "")),
            extra={k: v for k, v in doc.items() if k not in known})
        n_layers = len(bundle.model.layers)
        for stage in bundle.stages:  # (a schema-1 bundle may not list the model's layers)
            if n_layers and stage.last >= n_layers:
                fail(f"{where}: stage {stage.id}: layers {stage.first}..{stage.last} go past "
                     f"the model's {n_layers} layers")
        if version == 1:
            from stagebundle.schema1 import upgrade_chain

            return upgrade_chain(bundle)
        return bundle
