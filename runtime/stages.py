"""The runtime's view of a compiled bundle, and one ONNX Runtime session per stage.

The manifest is read by the back end's loader (``partitioner.backend.manifest.load_bundle``,
which also checks every stage file's SHA-256); this module only turns the loaded bundle into
the few things the runtime needs:

* per stage, the tensors it may receive (``incoming``) and the tensors it passes on to the
  next stage (``carry``): a tensor produced early and needed later (a residual, a model input
  used deep in the network, a model output produced by an early stage) rides along the chain,
  hop by hop, so each hop is a single frame to a single host (SPEC §2: the cut carries
  every live tensor);
* a table of every tensor's declared shape and dtype, against which received tensors are
  checked before ONNX Runtime sees them.

A bundle may carry *fallback* bundles (``BUNDLE/fallback/<name>/manifest.json``) compiled
for the system without one device (see :mod:`runtime.replan`); they are views too, keyed
by ``"fallback/<name>"``; the main bundle's key is ``"main"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from partitioner.errors import fail

if TYPE_CHECKING:
    from partitioner.backend.manifest import Bundle

__all__ = [
    "TensorSpec",
    "StageSpec",
    "BundleView",
    "open_bundle",
    "open_bundles",
    "view_of",
    "StageRunner",
    "check_tensor",
    "check_inputs",
]

MAIN = "main"


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the manifest declares: name, static shape, numpy dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class StageSpec:
    """One stage of a bundle, with what it receives and passes on (see module doc)."""

    id: str
    device: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    next: str | None
    incoming: tuple[str, ...] = ()
    carry: tuple[str, ...] = ()


@dataclass(frozen=True)
class BundleView:
    """A loaded bundle as the runtime uses it."""

    key: str
    root: Path
    stages: tuple[StageSpec, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tensors: Mapping[str, TensorSpec]
    plan: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None
    destination: str | None = None

    def stage(self, stage_id: str) -> StageSpec:
        for s in self.stages:
            if s.id == stage_id:
                return s
        raise KeyError(stage_id)

    @property
    def devices(self) -> tuple[str, ...]:
        """Devices the stages run on, in chain order, without repeats."""
        return tuple(dict.fromkeys(s.device for s in self.stages))

    def incoming_bytes(self, stage: StageSpec) -> int:
        """Largest body a frame for ``stage`` can legitimately have (plus alignment)."""
        return sum(self.tensors[n].nbytes + 64 for n in stage.incoming)


def _spec(t: Any) -> TensorSpec:
    """The runtime's tensor spec of a manifest ``TensorSpec``."""
    return TensorSpec(t.name, tuple(int(d) for d in t.shape), t.dtype)


def view_of(bundle: Bundle, key: str = MAIN, root: Path | None = None) -> BundleView:
    """The runtime view of a bundle returned by ``load_bundle``.

    ``load_bundle`` has already checked the chain (``next``), the files and their SHA-256;
    this only derives what each hop carries and the table of declared tensors.
    """
    root = Path(root) if root is not None else bundle.root
    stages = [StageSpec(
        id=str(s.id), device=s.device, path=bundle.stage_path(s),
        inputs=tuple(_spec(t) for t in s.inputs), outputs=tuple(_spec(t) for t in s.outputs),
        next=None if s.next is None else str(s.next)) for s in bundle.stages]
    inputs = tuple(_spec(t) for t in bundle.inputs)
    outputs = tuple(_spec(t) for t in bundle.outputs)
    tensors: dict[str, TensorSpec] = {}
    for t in (*inputs, *outputs, *(x for s in stages for x in (*s.inputs, *s.outputs))):
        old = tensors.setdefault(t.name, t)
        if old != t:
            fail(f"bundle: tensor {t.name} declared as {old.dtype}{list(old.shape)} and "
                 f"{t.dtype}{list(t.shape)}")
    # carry after stage i: available so far and needed by a later stage or as an output
    final: list[StageSpec] = []
    available = {t.name for t in inputs}
    incoming: tuple[str, ...] = tuple(t.name for t in inputs)
    for i, s in enumerate(stages):
        missing = [t.name for t in s.inputs if t.name not in available]
        if missing:
            fail(f"bundle: stage {s.id} needs {missing[0]}, which no earlier stage produces")
        available |= {t.name for t in s.outputs}
        needed = {t.name for later in stages[i + 1:] for t in later.inputs}
        needed |= {t.name for t in outputs}
        carry = tuple(n for n in tensors if n in available and n in needed)
        final.append(StageSpec(s.id, s.device, s.path, s.inputs, s.outputs, s.next,
                               incoming=incoming, carry=carry))
        incoming = carry
    lost = [t.name for t in outputs if t.name not in available]
    if lost:
        fail(f"bundle: model output {lost[0]} is produced by no stage")
    return BundleView(key=key, root=root, stages=tuple(final), inputs=inputs,
                      outputs=outputs, tensors=tensors, plan=dict(bundle.plan),
                      source=bundle.source, destination=bundle.destination)


def open_bundle(path: str | Path, key: str = MAIN) -> BundleView:
    """Load ``path`` (a bundle directory) with the back end's loader (checks SHA-256s)."""
    from partitioner.backend.manifest import load_bundle

    path = Path(path)
    if not (path / "manifest.json").is_file():
        fail(f"{path}: not a bundle directory (no manifest.json)")
    return view_of(load_bundle(path), key=key, root=path)


def open_bundles(path: str | Path) -> dict[str, BundleView]:
    """The main bundle and every fallback bundle under ``path/fallback/*``."""
    path = Path(path)
    views = {MAIN: open_bundle(path)}
    fb = path / "fallback"
    if fb.is_dir():
        for sub in sorted(p for p in fb.iterdir()
                          if not p.name.startswith(".") and (p / "manifest.json").is_file()):
            key = f"fallback/{sub.name}"
            views[key] = open_bundle(sub, key=key)
    return views


def check_tensor(spec: TensorSpec, arr: np.ndarray, where: str) -> None:
    """Refuse ``arr`` unless its dtype, shape and byte length match ``spec``."""
    if arr.dtype.name != spec.dtype:
        fail(f"{where}: tensor {spec.name} has dtype {arr.dtype.name}, expected {spec.dtype}")
    if tuple(arr.shape) != spec.shape:
        fail(f"{where}: tensor {spec.name} has shape {list(arr.shape)}, expected "
             f"{list(spec.shape)}")
    if arr.nbytes != spec.nbytes:
        fail(f"{where}: tensor {spec.name} has {arr.nbytes} B, expected {spec.nbytes}")


def check_inputs(view: BundleView, stage: StageSpec, tensors: Mapping[str, np.ndarray],
                 where: str) -> None:
    """The tensors arriving for ``stage`` are exactly known ones with declared types."""
    allowed = set(stage.incoming) | {t.name for t in stage.inputs}
    for name, arr in tensors.items():
        if name not in allowed:
            fail(f"{where}: unexpected tensor {name!r} for stage {stage.id}")
        check_tensor(view.tensors[name], arr, where)
    for t in stage.inputs:
        if t.name not in tensors:
            fail(f"{where}: stage {stage.id} is missing input tensor {t.name}")


class StageRunner:
    """An ONNX Runtime session for one stage (CPU; ``threads`` intra-op threads).

    ``spin``: let idle intra-op threads spin-wait for work (ONNX Runtime's default). Off
    here by default: a worker shares its host with its other stages (pipelining) and often
    with other workers, and a spinning idle thread takes their CPU
    (benchmarks/partition_sweep.py measured the difference on 2 cores).
    """

    def __init__(self, stage: StageSpec, *, threads: int | None = None, spin: bool = False,
                 providers: Iterable[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        self.stage = stage
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.session = ort.InferenceSession(str(stage.path), opts,
                                                providers=list(providers))
        except Exception as err:  # ORT raises its own exception types
            fail(f"stage {stage.id} ({stage.path.name}): ONNX Runtime cannot load it: "
                 f"{str(err).splitlines()[0] if str(err) else err.__class__.__name__}")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the stage on the tensors it needs (others in ``tensors`` are ignored)."""
        feeds = {n: tensors[n] for n in self.input_names}
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs, strict=True))

    def advance(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the stage and return what goes on: the carry set (or the model outputs)."""
        available = dict(tensors)
        available.update(self.run(tensors))
        return {n: available[n] for n in self.stage.carry}
