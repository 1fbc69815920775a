"""Measure bundles of consecutive layers on this host with ONNX Runtime (SPEC §3, DIME).

Every bundle ``i..j`` (``j - i + 1 <= MBS``) is cut out as its own sub-model
(:func:`partitioner.frontend.slicing.extract_layers`), run on the CPU execution provider
at batch 1 and fed with *real* intermediate tensors: the full model is run once on the
sample inputs with every cut tensor added as a graph output (DISS §7.2: realistic inputs).
After ``warmup`` runs, ``runs`` runs are timed; the latency is the mean after dropping
the top and bottom ``trim`` fraction, and the spread (std, min, max, p50) of all runs is
kept. The number of bundles is ``L*MBS - MBS*(MBS-1)/2`` (SPEC §3).

Profiling is resumable: the profile is written atomically after every bundle, and a
restart with the same settings skips the bundles already in the file.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from partitioner.analysis.meters import EnergyMeter
from partitioner.analysis.profiles import Profile, ProfiledBundle, read_profile, save_profile
from partitioner.errors import fail
from partitioner.ir import LayerGraph

__all__ = [
    "ProfileSettings",
    "bundle_ranges",
    "bundle_count",
    "trimmed_stats",
    "sample_inputs",
    "capture_intermediates",
    "BundleTimer",
    "host_info",
    "start_profile",
    "profile_bundles",
]


@dataclass(frozen=True)
class ProfileSettings:
    """How bundles are measured (recorded in the profile; a resume needs the same)."""

    runs: int = 100
    warmup: int = 10
    trim: float = 0.1
    threads: int | None = None

    def check(self) -> None:
        """Reject impossible settings with a one-line user error."""
        if self.runs < 1:
            fail(f"--runs {self.runs}: need at least 1 timed run")
        if self.warmup < 0:
            fail(f"--warmup {self.warmup}: must be >= 0")
        if not 0 <= self.trim < 0.5:
            fail(f"--trim {self.trim}: must be in [0, 0.5)")
        if self.threads is not None and self.threads < 1:
            fail(f"--threads {self.threads}: must be >= 1")


def bundle_count(n_layers: int, mbs: int) -> int:
    """Bundles of length 1..MBS over ``n_layers`` layers: ``L*MBS - MBS*(MBS-1)/2``."""
    mbs = min(mbs, n_layers)
    return n_layers * mbs - mbs * (mbs - 1) // 2


def bundle_ranges(n_layers: int, mbs: int) -> list[tuple[int, int]]:
    """Every ``(first, last)`` of length 1..MBS, shortest first (singles are most useful)."""
    mbs = min(mbs, n_layers)
    return [(i, i + size - 1) for size in range(1, mbs + 1)
            for i in range(n_layers - size + 1)]


def trimmed_stats(samples: Sequence[float], trim: float) -> dict[str, float]:
    """Trimmed mean (drop ``trim`` of the runs at each end) and the spread of all runs."""
    data = np.sort(np.asarray(samples, dtype=np.float64))
    k = int(len(data) * trim)
    if 2 * k >= len(data):
        k = (len(data) - 1) // 2
    kept = data[k:len(data) - k]
    return {"latency": float(kept.mean()), "std": float(data.std()),
            "min": float(data[0]), "max": float(data[-1]), "p50": float(np.median(data))}


def _session_options(threads: int | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    # Measure a bundle the way `runtime serve` runs it: idle threads do not spin.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        opts.intra_op_num_threads = threads
    return opts


def _session(model: onnx.ModelProto, threads: int | None,
             base_dir: Path | None = None) -> ort.InferenceSession:
    from partitioner.frontend.slicing import save_model, uses_external_data

    opts = _session_options(threads)
    if not uses_external_data(model):
        return ort.InferenceSession(model.SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
    # External weights: write a self-contained copy and let ORT map it from disk.
    with tempfile.TemporaryDirectory(prefix="partitioner-profile-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path, base_dir=base_dir, external_data="model.onnx.data")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def sample_inputs(graph: LayerGraph, npz: str | Path | None = None, *, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """Model inputs from ``npz`` (keys = input names), else seeded random data.

    Raises:
        UserError: the file is unreadable, lacks an input, or has a wrong shape (naming
            the file and the input).
    """
    if npz is None:
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        for t in graph.inputs:
            dtype = np.dtype(t.dtype)
            if dtype.kind == "f":
                out[t.name] = rng.standard_normal(t.shape).astype(dtype)
            elif dtype.kind == "b":
                out[t.name] = rng.integers(0, 2, t.shape).astype(bool)
            else:  # small non-negative integers stay valid as indices
                out[t.name] = rng.integers(0, 2, t.shape).astype(dtype)
        return out
    try:
        with np.load(npz, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        fail(f"{npz}: cannot read the --inputs file: {err}")
    out = {}
    for t in graph.inputs:
        if t.name not in arrays:
            fail(f"{npz}: no array for model input {t.name!r}")
        a = arrays[t.name]
        if tuple(a.shape) != t.shape:
            fail(f"{npz}: input {t.name!r} has shape {tuple(a.shape)}, the model wants "
                 f"{t.shape}")
        out[t.name] = a.astype(np.dtype(t.dtype), copy=False)
    return out


def capture_intermediates(prepared: Any, inputs: Mapping[str, np.ndarray],
                          threads: int | None = None) -> dict[str, np.ndarray]:
    """Run the full model once and return every tensor that crosses a cut, by name.

    All cut tensors are added as graph outputs of one ORT session, so each bundle can be
    fed the tensors the model really produces at its boundary.
    """
    graph: LayerGraph = prepared.graph
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model)
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for name, info in graph.tensors.items():
        if name in have:
            continue
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype))
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, info.shape))
    sess = _session(model, threads, getattr(prepared, "base_dir", None))
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, dict(inputs))
    captured = dict(inputs)
    captured.update(zip(names, values, strict=True))
    return captured


class BundleTimer:
    """Times bundles of one prepared model on this host.

    Args:
        prepared: a ``PreparedModel``.
        captured: tensors by name from :func:`capture_intermediates`.
        settings: runs, warm-up, trim, threads.
        meter: optional energy meter.
    """

    def __init__(self, prepared: Any, captured: Mapping[str, np.ndarray],
                 settings: ProfileSettings, meter: EnergyMeter | None = None) -> None:
        self.prepared = prepared
        self.captured = captured
        self.settings = settings
        self.meter = meter

    def runner(self, first: int, last: int) -> Callable[[], float]:
        """A function that runs layers ``first..last`` once and returns its seconds.

        The bundle is its own ORT session built from the extracted sub-model, fed with the
        captured tensors of the cut before ``first``.
        """
        from partitioner.frontend.slicing import extract_layers

        sub = extract_layers(self.prepared, first, last)
        sess = _session(sub.model, self.settings.threads, sub.base_dir)
        feeds = {t.name: self.captured[t.name] for t in sub.inputs}
        outputs = [o.name for o in sess.get_outputs()]

        def once() -> float:
            t0 = time.perf_counter()
            sess.run(outputs, feeds)
            return time.perf_counter() - t0

        return once

    def measure(self, first: int, last: int, frequency: str | None = None) -> ProfiledBundle:
        """Measure layers ``first..last`` as one sub-model (batch 1, warm-up, N runs)."""
        once = self.runner(first, last)
        for _ in range(self.settings.warmup):
            once()
        if self.meter is not None:
            self.meter.start()
        samples = [once() for _ in range(self.settings.runs)]
        stats = trimmed_stats(samples, self.settings.trim)
        energy = None
        if self.meter is not None:
            energy = self.meter.stop(self.settings.runs, stats["latency"])
        return ProfiledBundle(first=first, last=last, frequency=frequency, energy=energy,
                              **stats)


def host_info(threads: int | None) -> dict[str, Any]:
    """What measured: CPU model, core count, ONNX Runtime version, threads, platform."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": ort.__version__,
            "threads": threads, "python": platform.python_version(),
            "platform": platform.platform()}


def start_profile(path: str | Path, graph: LayerGraph, device: str,
                  settings: ProfileSettings, meter: EnergyMeter | None = None, *,
                  force: bool = False, lazy: bool = False) -> Profile:
    """The profile to fill: the file's bundles when it exists with the same settings.

    Raises:
        UserError: the file exists but belongs to another device/model or was measured
            with other settings, unless ``force`` (then it is started afresh).
    """
    fresh = Profile(device=device, sha256=graph.sha256, granularity=graph.granularity,
                    layers=tuple(layer.name for layer in graph.layers), runs=settings.runs,
                    trim=settings.trim, warmup=settings.warmup, threads=settings.threads,
                    host=host_info(settings.threads),
                    energy_meter=None if meter is None else meter.spec, lazy=lazy)
    if Path(path).is_dir():
        fail(f"{path}: is a folder; -o needs a profile file name")
    if force or not Path(path).exists():
        return fresh
    old = read_profile(path)
    mine = (fresh.device, fresh.sha256, fresh.granularity, fresh.layers, fresh.runs,
            fresh.warmup, fresh.trim, fresh.threads, fresh.energy_meter)
    theirs = (old.device, old.sha256, old.granularity, old.layers, old.runs, old.warmup,
              old.trim, old.threads, old.energy_meter)
    if mine != theirs:
        labels = ("device", "model sha256", "granularity", "layers", "runs", "warmup",
                  "trim", "threads", "energy meter")
        which = next(lab for lab, a, b in zip(labels, mine, theirs, strict=True) if a != b)
        fail(f"{path}: exists with a different {which}; pass --force to start afresh or "
             f"choose another -o")
    # Resume: keep what was measured; a full run over a lazy file stays lazy only if asked.
    return replace(old, lazy=lazy or old.lazy, host=fresh.host)


def profile_bundles(profile: Profile, ranges: Iterable[tuple[int, int]],
                    measure: Callable[[int, int], ProfiledBundle], path: str | Path | None,
                    *, frequency: str | None = None, progress: bool = False) -> Profile:
    """Measure the ranges not yet in ``profile`` at ``frequency``, saving after each.

    Args:
        profile: what is already measured (from :func:`start_profile`).
        ranges: ``(first, last)`` bundles wanted.
        measure: measures one bundle (e.g. :meth:`BundleTimer.measure` bound to a
            frequency); its result's frequency is overwritten with ``frequency``.
        path: written atomically after every bundle (None: not written).
        frequency: the frequency label of this run.
        progress: show a tqdm bar with ETA on stderr.

    Returns:
        The profile with the new bundles.
    """
    from tqdm import tqdm

    done = profile.bundle_map()
    todo = [(a, b) for a, b in ranges if (a, b, frequency) not in done]
    with tqdm(total=len(todo), unit="bundle", file=sys.stderr, disable=not progress,
              desc=f"profiling {profile.device}", dynamic_ncols=True) as bar:
        for a, b in todo:
            bar.set_postfix_str(f"layers {a}..{b}", refresh=False)
            measured = replace(measure(a, b), frequency=frequency)
            profile = profile.with_bundle(measured)
            if path is not None:
                save_profile(profile, path)
            bar.update()
    if path is not None and not todo:
        save_profile(profile, path)
    return profile
