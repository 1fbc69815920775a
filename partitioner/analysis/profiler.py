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

Setting a bundle up is kept cheap (issue 16): the model's weights are written once, at
page-aligned offsets, to one file (:class:`SharedWeights`); each bundle is then extracted
with its initialisers as references into that file, and ONNX Runtime maps them from there
when it opens the bundle's session. No weight is copied per bundle on our side (before,
each bundle copied its weights three times: extraction, serialisation, session). The
graph ONNX Runtime optimises and the kernels it runs are the same as from an inline model;
``benchmarks/profiler_overhead.py`` checks that the latencies agree. The next bundle is
opened while the current one warms up (:mod:`partitioner.analysis.opening`), never while
one is being timed.

Int8 variants are timed by :mod:`partitioner.analysis.int8_profile`.
"""

from __future__ import annotations

import os
import platform
import sys
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
from partitioner.analysis.sessions import (
    ORT_ERRORS,
    SharedWeights,
    open_session,
    ort_failure,
    reuse_freed_memory,
)
from partitioner.errors import UserError, fail
from partitioner.ir import LayerGraph
from stagebundle.errors import check_threads

__all__ = [
    "ProfileSettings",
    "bundle_ranges",
    "bundle_count",
    "trimmed_stats",
    "sample_inputs",
    "capture_intermediates",
    "SharedWeights",
    "reuse_freed_memory",
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
        check_threads(self.threads)


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
                          threads: int | None = None, *,
                          weights: SharedWeights | None = None) -> dict[str, np.ndarray]:
    """Run the full model once and return every tensor that crosses a cut, by name.

    All cut tensors are added as graph outputs of one ORT session, so each bundle can be
    fed the tensors the model really produces at its boundary. With ``weights`` (made from
    the same ``prepared``) the session maps the shared weight file instead of copying.
    """
    graph: LayerGraph = prepared.graph
    model = onnx.ModelProto()
    model.CopyFrom(prepared.model if weights is None else weights.prepared.model)
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for name, info in graph.tensors.items():
        if name in have:
            continue
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype))
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, info.shape))
    # run once and never timed: not pre-packing the weights opens it several times faster
    # (AlexNet 0.1-1.4 s -> 0.05-0.08 s on the EPYC dev host)
    if weights is None:
        sess = open_session(model, threads, getattr(prepared, "base_dir", None),
                            prepack=False, what=f"model {graph.name!r}")
    else:
        sess = weights.session(model, threads, prepack=False, what=f"model {graph.name!r}")
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, dict(inputs))
    except ORT_ERRORS as err:
        ort_failure(err, f"model {graph.name!r}", "run")
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
        weights: the shared weight file to open bundles from (see :class:`SharedWeights`);
            by default the timer writes its own on first use. ``shared=False`` opens each
            bundle from an inline copy of its weights instead (the slow set-up, kept to
            compare against).
        ahead: open the next bundle :meth:`expect` names during the current one's warm-up
            (:class:`~partitioner.analysis.opening.BundleOpener`); False opens each bundle
            only when it is measured (one session alive at a time: less memory).
    """

    def __init__(self, prepared: Any, captured: Mapping[str, np.ndarray],
                 settings: ProfileSettings, meter: EnergyMeter | None = None, *,
                 weights: SharedWeights | None = None, shared: bool = True,
                 ahead: bool = True) -> None:
        from partitioner.analysis.opening import BundleOpener

        self.prepared = prepared
        self.captured = captured
        self.settings = settings
        self.meter = meter
        self.shared = shared
        self._weights = weights
        self._own_weights = weights is None
        self._opener = BundleOpener(self.runner) if ahead else None
        # seconds this thread spent opening bundles or waiting for one opened ahead
        self.setup_seconds = 0.0
        self.run_seconds = 0.0  # warm-up and timed runs, summed likewise

    @property
    def ahead_seconds(self) -> float:
        """Seconds spent opening bundles ahead, during other bundles' warm-up."""
        return 0.0 if self._opener is None else self._opener.ahead_seconds

    def expect(self, bundles: Sequence[tuple[int, int]]) -> None:
        """The bundles :meth:`measure` will be asked for next, in order (opened ahead)."""
        if self._opener is not None:
            if self.shared:
                self.weights  # noqa: B018  (written here, not on the opening thread)
            self._opener.expect(bundles)

    @property
    def weights(self) -> SharedWeights:
        """The shared weight file (written on first use when none was given)."""
        if self._weights is None:
            self._weights = SharedWeights(self.prepared)
        return self._weights

    def close(self) -> None:
        """Stop opening ahead; remove the weight file this timer wrote itself (not one it
        was given: close the timer before that one)."""
        if self._opener is not None:
            self._opener.close()
        if self._own_weights and self._weights is not None:
            self._weights.close()
            self._weights = None

    def __enter__(self) -> BundleTimer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def runner(self, first: int, last: int) -> Callable[[], float]:
        """A function that runs layers ``first..last`` once and returns its seconds.

        The bundle is its own ORT session built from the extracted sub-model, fed with the
        captured tensors of the cut before ``first``.
        """
        from partitioner.frontend.slicing import extract_layers

        what = f"model {self.prepared.graph.name!r} layers {first}..{last}"
        if self.shared:
            sub = extract_layers(self.weights.prepared, first, last)
            sess = self.weights.session(sub.model, self.settings.threads, what=what)
        else:
            sub = extract_layers(self.prepared, first, last)
            sess = open_session(sub.model, self.settings.threads, sub.base_dir, what=what)
        feeds = {t.name: self.captured[t.name] for t in sub.inputs}
        outputs = [o.name for o in sess.get_outputs()]

        def once() -> float:
            t0 = time.perf_counter()
            sess.run(outputs, feeds)
            return time.perf_counter() - t0

        return once

    def measure(self, first: int, last: int, frequency: str | None = None) -> ProfiledBundle:
        """Measure layers ``first..last`` as one sub-model (batch 1, warm-up, N runs).

        Adds the seconds spent opening the bundle (or waiting for the next one, opened
        during this one's warm-up) to ``setup_seconds`` and those spent running it
        (warm-up and timed runs) to ``run_seconds``.
        """
        t0 = time.perf_counter()
        if self._opener is None:
            once = self.runner(first, last)
        else:
            once = self._opener.take(first, last)
        self.setup_seconds += time.perf_counter() - t0
        stats, energy = self.time_runs(once, open_next=True)
        return ProfiledBundle(first=first, last=last, frequency=frequency, energy=energy,
                              **stats)

    def time_runs(self, once: Callable[[], float], *, open_next: bool = False
                  ) -> tuple[dict[str, float], float | None]:
        """Warm-up, then the timed runs of ``once``: :func:`trimmed_stats` and the joules
        per run (None without a meter); the seconds are added to ``run_seconds``.

        ``open_next``: open the next expected bundle during the warm-up; it is waited for
        (the wait added to ``setup_seconds``) before the timed runs begin."""
        t1 = time.perf_counter()
        if open_next and self._opener is not None and self.settings.warmup > 0:
            self._opener.start_next()
        for _ in range(self.settings.warmup):
            once()
        waited = 0.0 if self._opener is None else self._opener.settle()
        self.setup_seconds += waited
        if self.meter is not None:
            self.meter.start()
        samples = [once() for _ in range(self.settings.runs)]
        stats = trimmed_stats(samples, self.settings.trim)
        energy = None
        if self.meter is not None:
            energy = self.meter.stop(self.settings.runs, stats["latency"])
        self.run_seconds += time.perf_counter() - t1 - waited
        return stats, energy


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
    try:
        old = read_profile(path)
    except UserError as err:  # resumed from: say how to start afresh instead
        fail(f"{err} (it is the -o file to resume; pass --force to start afresh or "
             f"choose another -o)")
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
                    *, frequency: str | None = None, progress: bool = False,
                    expect: Callable[[list[tuple[int, int]]], None] | None = None
                    ) -> Profile:
    """Measure the ranges not yet in ``profile`` at ``frequency``, saving after each.

    Args:
        profile: what is already measured (from :func:`start_profile`).
        ranges: ``(first, last)`` bundles wanted.
        measure: measures one bundle (e.g. :meth:`BundleTimer.measure` bound to a
            frequency); its result's frequency is overwritten with ``frequency``.
        path: written atomically after every bundle (None: not written).
        frequency: the frequency label of this run.
        progress: show a tqdm bar with ETA on stderr.
        expect: told the bundles about to be measured, in order (e.g.
            :meth:`BundleTimer.expect`, which opens each one ahead).

    Returns:
        The profile with the new bundles.
    """
    from tqdm import tqdm

    done = profile.bundle_map()
    todo = [(a, b) for a, b in ranges if (a, b, frequency) not in done]
    if expect is not None:
        expect(todo)
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

