"""The runtime's view of a compiled bundle, and one ONNX Runtime session per unit.

The bundle is the :mod:`stagebundle` ``Bundle`` itself, read by its validating loader
(``stagebundle.load.load_bundle``: SHA-256 of every file, the sends of the stage graph add
up). Nothing about routing is derived here: what a unit receives, from whom, and what it
sends where come from the manifest (``Unit.receives``, ``Unit.sends``) through
:func:`stagebundle.graph.expected_senders`. This module adds only what a server needs on
top: the plan key a bundle is served under, the largest frame a unit can legitimately
receive, the check of a received message against the send the manifest declares, and an
ONNX Runtime session per unit (:class:`StageRunner`).

A bundle may carry *fallback* bundles (``BUNDLE/fallback/<name>/manifest.json``) compiled
for the system without one device (see :mod:`runtime.replan`); they are served under the
key ``"fallback/<name>"``; the main bundle's key is ``"main"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from stagebundle.errors import fail
from stagebundle.graph import HEIGHT, expected_senders
from stagebundle.load import load_bundle, read_verified, safe_path
from stagebundle.manifest import INPUT, MANIFEST, OUTPUT, Bundle, Send, TensorSpec, Unit

__all__ = [
    "MAIN",
    "BundleView",
    "open_bundle",
    "open_bundles",
    "StageRunner",
    "check_tensor",
    "check_message",
    "piece_rows",
    "merge_timings",
    "MAX_TIMINGS",
]

MAIN = "main"
# folders of the bundle whose sub-bundles are served too: fail-over plans
# (runtime.replan) and live adaptation's re-planned ones (runtime.adapt)
PLAN_FOLDERS = ("fallback", "adapt")
MAX_TIMINGS = 64  # timing records a request carries at most
_SLACK = 64  # per-tensor alignment padding of a frame body (runtime.protocol.ALIGN)


@dataclass(frozen=True)
class BundleView:
    """A loaded bundle served under plan key ``key`` (``"main"``, ``"fallback/..."``)."""

    key: str
    bundle: Bundle

    @property
    def root(self) -> Path:
        return self.bundle.root

    @property
    def plan(self) -> Mapping[str, Any]:
        return self.bundle.plan

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.bundle.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.bundle.outputs

    # made once: the manifest's Bundle builds its Unit objects afresh on every call, and
    # the executor asks for the devices of a plan on every request
    @cached_property
    def devices(self) -> tuple[str, ...]:
        return self.bundle.devices

    @cached_property
    def _units(self) -> tuple[Unit, ...]:
        return tuple(self.bundle.units())

    def units(self) -> Iterator[Unit]:
        return iter(self._units)

    @cached_property
    def unit_map(self) -> dict[str, Unit]:
        return {u.key: u for u in self._units}

    @cached_property
    def senders(self) -> dict[str, tuple[str, ...]]:
        """Receiver key (or ``"output"``) -> the senders it waits for."""
        return expected_senders(self.bundle)

    def send(self, sender: str, to: str) -> Send | None:
        """The send the manifest declares from ``sender`` (a unit key, ``"input"``) to
        ``to``, or None when there is none."""
        sends = self.bundle.input_sends if sender == INPUT else \
            self.unit_map[sender].sends if sender in self.unit_map else ()
        return next((s for s in sends if s.to == to), None)

    def receives(self, to: str) -> dict[str, TensorSpec]:
        """The tensors receiver ``to`` assembles (the model outputs for ``"output"``)."""
        specs = self.outputs if to == OUTPUT else self.unit_map[to].receives
        return {t.name: t for t in specs}

    @cached_property
    def _input_types(self) -> dict[str, tuple[Any, tuple[int, ...]]] | None:
        try:
            types = {t.name: (np.dtype(t.dtype), tuple(t.shape)) for t in self.inputs}
        except TypeError:  # a dtype numpy does not have: the full check decides
            return None
        return types if all(d.name == t.dtype for (d, _), t in
                            zip(types.values(), self.inputs, strict=True)) else None

    def inputs_match(self, inputs: Mapping[str, Any]) -> bool:
        """Whether ``inputs`` are numpy arrays of exactly the model inputs' names, dtypes
        and shapes (False: not shown here; the full check names what is wrong)."""
        types = self._input_types
        if types is None or len(inputs) != len(types):
            return False
        for name, arr in inputs.items():
            want = types.get(name)
            if want is None or type(arr) is not np.ndarray or arr.dtype != want[0] \
                    or arr.shape != want[1]:
                return False
        return True

    @cached_property  # (sender, receiver) -> what message_matches expects, made once
    def _expected(self) -> dict[tuple[str, str], dict[str, tuple[Any, Any, tuple[int, ...]]]
                                | None]:
        return {}

    def message_matches(self, sender: str, to: str, tensors: Mapping[str, np.ndarray],
                        rows: Mapping[str, tuple[int, int] | None]) -> bool:
        """Whether a message is exactly the declared send, by a check made once per
        (sender, receiver): the same names, rows, numpy dtypes and shapes. False means
        "not shown here" (also for byte-swapped or non-numpy dtypes): :func:`check_message`
        then decides, and names what is wrong."""
        key = (sender, to)
        if key not in self._expected:
            self._expected[key] = self._expect(sender, to)
        expected = self._expected[key]
        if expected is None or len(tensors) != len(expected):
            return False
        for name, arr in tensors.items():
            want = expected.get(name)
            if want is None or rows.get(name) != want[0] or arr.dtype != want[1] \
                    or arr.shape != want[2]:
                return False
        return True

    def _expect(self, sender: str, to: str
                ) -> dict[str, tuple[Any, Any, tuple[int, ...]]] | None:
        send = self.send(sender, to)
        specs = self.receives(to) if to == OUTPUT or to in self.unit_map else {}
        if send is None or any(p.name not in specs for p in send.tensors):
            return None
        out = {}
        for p in send.tensors:
            spec = specs[p.name]
            try:
                dtype = np.dtype(spec.dtype)
            except TypeError:  # a dtype numpy does not have: the full check decides
                return None
            if dtype.name != spec.dtype:
                return None
            shape = spec.shape if p.rows is None or len(spec.shape) <= HEIGHT else \
                _shape_of(spec, p.rows)
            out[p.name] = (p.rows, dtype, tuple(shape))
        return out

    def incoming_bytes(self, unit: Unit | str) -> int:
        """Largest body one message for ``unit`` can legitimately have (plus alignment)."""
        key = unit if isinstance(unit, str) else unit.key
        specs = self.receives(key)
        return sum(specs[n].nbytes + _SLACK for n in specs)


def open_bundle(path: str | Path, key: str = MAIN, device: str | None = None) -> BundleView:
    """Load ``path`` (a bundle directory) with the validating loader (``device``: check
    only that device's unit files, see ``load_bundle``)."""
    return BundleView(key, load_bundle(path, device=device))


def open_bundles(path: str | Path) -> dict[str, BundleView]:
    """The main bundle and every bundle under ``path/fallback/*`` and ``path/adapt/*``
    (keys ``"fallback/<name>"``, ``"adapt/<name>"``; names starting with a dot are skipped:
    a bundle being written).

    A fallback directory must stay inside the bundle (a symlink leading out is refused).
    """
    path = Path(path)
    views = {MAIN: open_bundle(path)}
    for folder in PLAN_FOLDERS:
        fb = path / folder
        if not fb.is_dir():
            continue
        safe_path(path, folder, f"{folder} bundles")
        for sub in sorted(p for p in fb.iterdir() if not p.name.startswith(".")):
            if (sub / MANIFEST).is_file():
                safe_path(path, f"{folder}/{sub.name}", f"{folder} {sub.name}")
                key = f"{folder}/{sub.name}"
                views[key] = open_bundle(sub, key=key)
    return views


def _shape_of(spec: TensorSpec, rows: tuple[int, int] | None) -> tuple[int, ...]:
    if rows is None:
        return spec.shape
    shape = list(spec.shape)
    shape[HEIGHT] = rows[1] - rows[0] + 1
    return tuple(shape)


def check_tensor(spec: TensorSpec, arr: np.ndarray, where: str,
                 rows: tuple[int, int] | None = None) -> None:
    """Refuse ``arr`` unless its dtype, shape and byte length match ``spec``.

    ``rows``: ``arr`` holds only these rows of the full tensor's height axis.
    """
    if arr.dtype.name != spec.dtype:
        fail(f"{where}: tensor {spec.name} has dtype {arr.dtype.name}, expected {spec.dtype}")
    shape = spec.shape if rows is None or len(spec.shape) <= HEIGHT else _shape_of(spec, rows)
    if tuple(arr.shape) != shape:
        fail(f"{where}: tensor {spec.name} has shape {list(arr.shape)}, expected "
             f"{list(shape)}")
    want = spec.nbytes if shape == spec.shape else \
        TensorSpec(spec.name, shape, spec.dtype).nbytes
    if arr.nbytes != want:
        fail(f"{where}: tensor {spec.name} has {arr.nbytes} B, expected {want}")


def piece_rows(header: Mapping[str, Any], names: Iterable[str], where: str
               ) -> dict[str, tuple[int, int] | None]:
    """The per-tensor ``rows`` a message header declares (absent or null: whole tensor)."""
    doc = header.get("rows") or {}
    if not isinstance(doc, dict):
        fail(f"{where}: 'rows' must map tensor names to [first, last] or null")
    out: dict[str, tuple[int, int] | None] = {}
    for name in names:
        r = doc.get(name)
        if r is None:
            out[name] = None
            continue
        if (not isinstance(r, list) or len(r) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
                or not 0 <= r[0] <= r[1]):
            fail(f"{where}: rows of tensor {name} must be [first, last], found {r!r}")
        out[name] = (r[0], r[1])
    return out


def check_message(view: BundleView, sender: str, to: str, tensors: Mapping[str, np.ndarray],
                  rows: Mapping[str, tuple[int, int] | None], where: str) -> None:
    """A message from ``sender`` to ``to`` is exactly the send the manifest declares:
    the same tensors, the same rows, each with its declared dtype and (sliced) shape."""
    if view.message_matches(sender, to, tensors, rows):  # the common case, checked fast
        return
    send = view.send(sender, to)
    if send is None:
        fail(f"{where}: {sender!r} sends nothing to {to!r} in plan {view.key!r}")
    specs = view.receives(to)
    declared = {p.name: p.rows for p in send.tensors}
    for name, arr in tensors.items():
        if name not in declared or name not in specs:
            fail(f"{where}: unexpected tensor {name!r} for {_who(to)}")
        if rows.get(name) != declared[name]:
            fail(f"{where}: tensor {name} carries rows {rows.get(name)}, the plan sends "
                 f"{declared[name]}")
        check_tensor(specs[name], arr, where, declared[name])
    for name in declared:
        if name not in tensors:
            fail(f"{where}: {_who(to)} is missing input tensor {name}")


def _who(to: str) -> str:
    return "the destination" if to == OUTPUT else f"stage {to}"


def merge_timings(into: list[dict[str, Any]], more: Any) -> None:
    """Append the timing records of ``more`` not already in ``into`` (fan-in repeats the
    records of the units upstream of several senders). Records are what workers write:
    objects whose ``stage`` and ``device`` are strings; anything else is dropped."""
    if not isinstance(more, list):
        return
    seen = {(t.get("stage"), t.get("device")) for t in into}
    for t in more[:MAX_TIMINGS]:
        if isinstance(t, dict) and isinstance(t.get("stage"), str) \
                and isinstance(t.get("device"), str) \
                and (t.get("stage"), t.get("device")) not in seen \
                and len(into) < MAX_TIMINGS:
            seen.add((t.get("stage"), t.get("device")))
            into.append(t)


class StageRunner:
    """An ONNX Runtime session for unit ``unit`` of the bundle in ``root`` (CPU;
    ``threads`` intra-op threads).

    The unit file's bytes are read once, checked against the manifest's SHA-256 *as
    read*, and handed to ONNX Runtime (no check-then-open race); a unit with external
    data is opened by path, ONNX Runtime resolving the data file next to it (its digest
    was checked by the loader).

    ``spin``: let idle intra-op threads spin-wait for work (ONNX Runtime's default). Off
    here by default: a worker shares its host with its other units (pipelining) and often
    with other workers, and a spinning idle thread takes their CPU
    (benchmarks/partition_sweep.py measured the difference on 2 cores).
    """

    def __init__(self, unit: Unit, root: str | Path, *, threads: int | None = None,
                 spin: bool = False,
                 providers: Iterable[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        self.unit = unit
        self.path = Path(root) / unit.file
        what = f"stage {unit.key} ({unit.device})"
        model: bytes | str = str(self.path) if unit.external_data is not None else \
            read_verified(Path(root), unit.file, unit.sha256, what)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = ort.InferenceSession(model, opts, providers=list(providers))
        except Exception as err:  # ORT raises its own exception types
            fail(f"stage {unit.key} ({self.path.name}): ONNX Runtime cannot load it: "
                 f"{str(err).splitlines()[0] if str(err) else err.__class__.__name__}")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def stage(self) -> Unit:
        """The unit (its ``inputs`` / ``outputs`` are what the ONNX file takes and gives)."""
        return self.unit

    def run(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the unit on the tensors it needs (others in ``tensors`` are ignored)."""
        feeds = {n: tensors[n] for n in self.input_names}
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs, strict=True))
