"""Profile files: measured bundle latencies (and energies) of one device (SPEC §3, DIME).

The format is the one of docs/INTERFACES.md ("Profile file"); this module adds, per
bundle, the spread of the timed runs (``std``, ``min``, ``max``, ``p50``) and, at the top
level, ``warmup``, ``energy_meter`` and ``lazy``. A *lazy* profile (see
:mod:`partitioner.analysis.lazy`) holds every single layer but only some longer bundles;
the cost model estimates its missing bundles from the single layers.

``partitioner profile --spatial`` adds ``rows``: per row-splittable layer, the latency of
the back end's row part that computes ``rows`` of the layer's output rows (halo included),
for the spatial cost model (:mod:`partitioner.analysis.row_profile`).

A profile is tied to one model file by ``model.sha256`` (SHA-256 of the ONNX file's bytes)
and to its layer list; :func:`load_profile` refuses a profile of another model and says
which of the two differs.
"""

from __future__ import annotations

import gc
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from partitioner.analysis.profile_columns import BundleColumns, columns_from_entries, columns_of
from partitioner.errors import fail
from partitioner.ir import LayerGraph

__all__ = [
    "ProfiledBundle",
    "ProfiledRows",
    "Profile",
    "read_profile",
    "load_profile",
    "save_profile",
    "check_profile",
    "write_json_atomic",
]


@dataclass(frozen=True)
class ProfiledBundle:
    """One measured bundle: model layers ``first..last`` at ``frequency``.

    Attributes:
        latency: trimmed mean of the timed runs, s.
        energy: joules per inference, or None when no energy meter was used.
        std / min / max / p50: spread of all timed runs, s (None when unknown).
    """

    first: int
    last: int
    frequency: str | None
    latency: float
    energy: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    p50: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last, "frequency": self.frequency,
                "latency": self.latency, "energy": self.energy, "std": self.std,
                "min": self.min, "max": self.max, "p50": self.p50}


@dataclass(frozen=True)
class ProfiledRows:
    """One measured row part: ``rows`` output rows of model layers ``first..last`` (today
    always one layer) at ``frequency``; ``latency`` is the trimmed mean, s."""

    first: int
    last: int
    rows: int
    frequency: str | None
    latency: float

    def to_json(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last, "rows": self.rows,
                "frequency": self.frequency, "latency": self.latency}


@dataclass(frozen=True)
class Profile:
    """The measurements of one device for one model.

    Attributes:
        device: the device name in the system file.
        sha256 / granularity / layers: the model fingerprint and its layer names.
        runs / warmup / trim / threads: the measurement settings.
        host: description of the measuring host (cpu, onnxruntime version, threads, ...).
        bundles: the measured bundles (a tuple, or the :class:`BundleColumns` a file is
            read into: the same sequence, held as arrays).
        energy_meter: the ``--energy-meter`` spec used, or None.
        lazy: missing bundles may be estimated from single layers (lazy profiling).
        rows: measured row parts (``profile --spatial``), empty otherwise.
        path: the file it was read from (for messages), or None.
    """

    device: str
    sha256: str
    granularity: str
    layers: tuple[str, ...]
    runs: int
    trim: float
    bundles: Sequence[ProfiledBundle] = ()
    warmup: int = 0
    threads: int | None = None
    host: Mapping[str, Any] = field(default_factory=dict)
    energy_meter: str | None = None
    lazy: bool = False
    rows: tuple[ProfiledRows, ...] = ()
    path: str | None = None

    @property
    def frequencies(self) -> tuple[str | None, ...]:
        """The frequency labels measured, in first-seen order."""
        return columns_of(self.bundles).present_labels()

    def bundle_map(self) -> dict[tuple[int, int, str | None], ProfiledBundle]:
        """``(first, last, frequency) -> bundle``."""
        return {(b.first, b.last, b.frequency): b for b in self.bundles}

    def with_bundle(self, bundle: ProfiledBundle) -> Profile:
        """A copy with ``bundle`` added (replacing a bundle of the same key)."""
        key = (bundle.first, bundle.last, bundle.frequency)
        kept = tuple(b for b in self.bundles if (b.first, b.last, b.frequency) != key)
        return replace(self, bundles=(*kept, bundle))

    def with_rows(self, entry: ProfiledRows) -> Profile:
        """A copy with ``entry`` added (replacing one of the same layers, rows, frequency)."""
        key = (entry.first, entry.last, entry.rows, entry.frequency)
        kept = tuple(r for r in self.rows if (r.first, r.last, r.rows, r.frequency) != key)
        return replace(self, rows=(*kept, entry))

    def to_json(self) -> dict[str, Any]:
        """The profile document of docs/INTERFACES.md (plus the additive fields)."""
        doc = {"device": self.device,
               "model": {"sha256": self.sha256, "granularity": self.granularity,
                         "layers": list(self.layers)},
               "runs": self.runs, "warmup": self.warmup, "trim": self.trim,
               "host": dict(self.host), "energy_meter": self.energy_meter,
               "lazy": self.lazy,
               "bundles": [b.to_json() for b in self.bundles]}
        if self.rows:  # additive: only profiles measured with --spatial carry it
            doc["rows"] = [r.to_json() for r in self.rows]
        return doc


def write_json_atomic(path: str | Path, doc: Any) -> None:
    """Write ``doc`` as JSON to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a profile is an ordinary file
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_profile(profile: Profile, path: str | Path) -> None:
    """Write ``profile`` atomically (a crash never leaves a half-written file)."""
    write_json_atomic(path, profile.to_json())


def _number(file: str, where: str, value: Any, *, optional: bool = False,
            positive: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0 or (positive and value <= 0):
        need = "a positive" if positive else "a non-negative"
        fail(f"{file}: {where} must be {need} number, got {value!r}")
    return float(value)


def _bundle(file: str, i: int, doc: Any, n_layers: int) -> ProfiledBundle:
    """Entry ``i``, checked key by key (the path of a file with a malformed entry)."""
    where = f"bundles[{i}]"
    if not isinstance(doc, Mapping):
        fail(f"{file}: {where} must be an object")
    for key in ("first", "last", "latency"):
        if key not in doc:
            fail(f"{file}: {where}: missing key {key!r}")
    first, last = doc["first"], doc["last"]
    for key, v in (("first", first), ("last", last)):
        if isinstance(v, bool) or not isinstance(v, int):
            fail(f"{file}: {where}.{key} must be an integer, got {v!r}")
    if not 0 <= first <= last < n_layers:
        fail(f"{file}: {where}: layers {first}..{last} outside 0..{n_layers - 1}")
    freq = doc.get("frequency")
    if freq is not None and not isinstance(freq, str):
        fail(f"{file}: {where}.frequency must be a string or null, got {freq!r}")
    spread = {k: _number(file, f"{where}.{k}", doc.get(k), optional=True)
              for k in ("std", "min", "max", "p50")}
    latency = _number(file, f"{where}.latency", doc["latency"], positive=True)
    assert latency is not None
    return ProfiledBundle(first=first, last=last, frequency=freq, latency=latency,
                          energy=_number(file, f"{where}.energy", doc.get("energy"),
                                         optional=True), **spread)


def _rows_entry(file: str, i: int, doc: Any, n_layers: int) -> ProfiledRows:
    where = f"rows[{i}]"
    if not isinstance(doc, Mapping):
        fail(f"{file}: {where} must be an object")
    for key in ("first", "last", "rows", "latency"):
        if key not in doc:
            fail(f"{file}: {where}: missing key {key!r}")
    for key in ("first", "last", "rows"):
        v = doc[key]
        if isinstance(v, bool) or not isinstance(v, int):
            fail(f"{file}: {where}.{key} must be an integer, got {v!r}")
    first, last, rows = doc["first"], doc["last"], doc["rows"]
    if not 0 <= first <= last < n_layers:
        fail(f"{file}: {where}: layers {first}..{last} outside 0..{n_layers - 1}")
    if rows < 1:
        fail(f"{file}: {where}.rows must be at least 1, got {rows}")
    freq = doc.get("frequency")
    if freq is not None and not isinstance(freq, str):
        fail(f"{file}: {where}.frequency must be a string or null, got {freq!r}")
    latency = _number(file, f"{where}.latency", doc["latency"], positive=True)
    assert latency is not None
    return ProfiledRows(first, last, rows, freq, latency)


def read_profile(path: str | Path) -> Profile:
    """Read and validate a profile file without checking it against a model.

    Raises:
        UserError: the file is missing, not JSON, or violates the schema (the message
            names the file and the key).
    """
    file = str(path)
    with _collector_paused():
        return _read_profile(path, file)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Reading creates ~10^5 dicts and lists per 20,000-bundle file and no cycles; the
    cyclic collector would walk them again at every threshold (a third of the reading
    time, issue 16). Paused for the read only; what was enabled is enabled again."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _read_profile(path: str | Path, file: str) -> Profile:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"{file}: no such profile file")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        fail(f"{file}: not a readable JSON profile: {err}")
    if not isinstance(doc, Mapping):
        fail(f"{file}: a profile must be a JSON object")
    for key in ("device", "model", "runs", "trim", "bundles"):
        if key not in doc:
            fail(f"{file}: missing key {key!r}")
    model = doc["model"]
    if not isinstance(model, Mapping) or not all(k in model for k in ("sha256", "layers")):
        fail(f"{file}: model must be an object with sha256 and layers")
    layers = model["layers"]
    if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
        fail(f"{file}: model.layers must be a list of layer names")
    if not isinstance(doc["device"], str) or not doc["device"]:
        fail(f"{file}: device must be a non-empty string")
    runs = doc["runs"]
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        fail(f"{file}: runs must be a positive integer, got {runs!r}")
    trim = _number(file, "trim", doc["trim"])
    assert trim is not None
    if trim >= 0.5:
        fail(f"{file}: trim must be below 0.5, got {trim!r}")
    if not isinstance(doc["bundles"], list):
        fail(f"{file}: bundles must be a list")
    bundles = columns_from_entries(doc["bundles"], len(layers))
    if bundles is None:  # some entry is malformed: find it and say which key
        bundles = columns_of(tuple(_bundle(file, i, b, len(layers))
                                   for i, b in enumerate(doc["bundles"])))
    _refuse_duplicates(file, bundles, len(layers))
    rows_doc = doc.get("rows", [])
    if not isinstance(rows_doc, list):
        fail(f"{file}: rows must be a list")
    rows = tuple(_rows_entry(file, i, r, len(layers)) for i, r in enumerate(rows_doc))
    host = doc.get("host") or {}
    threads = host.get("threads") if isinstance(host, Mapping) else None
    return Profile(
        device=doc["device"], sha256=str(model["sha256"]),
        granularity=str(model.get("granularity", "major")), layers=tuple(layers),
        runs=runs, trim=trim, bundles=bundles, warmup=int(doc.get("warmup") or 0),
        threads=threads if isinstance(threads, int) else None,
        host=dict(host) if isinstance(host, Mapping) else {},
        energy_meter=doc.get("energy_meter"), lazy=bool(doc.get("lazy", False)),
        rows=rows, path=file)


def _refuse_duplicates(file: str, bundles: BundleColumns, n_layers: int) -> None:
    again = bundles.first_repeat(n_layers)
    if again is not None:
        b = bundles[again]
        fail(f"{file}: bundle {b.first}..{b.last} at frequency {b.frequency} is listed twice")


def check_profile(profile: Profile, graph: LayerGraph) -> None:
    """Refuse a profile of another model, saying whether the fingerprint or layers differ."""
    file = profile.path or f"profile of {profile.device}"
    if profile.sha256 != graph.sha256:
        fail(f"{file}: model fingerprint {profile.sha256[:12]}... does not match "
             f"{graph.name} ({graph.sha256[:12]}...): the profile was measured on "
             f"another model file")
    if profile.granularity != graph.granularity:
        fail(f"{file}: profiled with --granularity {profile.granularity}, the model is "
             f"loaded with --granularity {graph.granularity}")
    names = tuple(layer.name for layer in graph.layers)
    if profile.layers != names:
        if len(profile.layers) != len(names):
            fail(f"{file}: layer list differs: the profile has {len(profile.layers)} "
                 f"layers, {graph.name} has {len(names)}")
        k = next(i for i, (a, b) in enumerate(zip(profile.layers, names, strict=True)) if a != b)
        fail(f"{file}: layer list differs at layer {k}: profile {profile.layers[k]!r}, "
             f"model {names[k]!r}")


def load_profile(path: str | Path, graph: LayerGraph) -> Profile:
    """Read a profile and check it belongs to ``graph`` (fingerprint and layer names).

    Raises:
        UserError: unreadable/invalid file, or a mismatch naming what differs.
    """
    profile = read_profile(path)
    check_profile(profile, graph)
    return profile
