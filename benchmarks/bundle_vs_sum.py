"""Is a bundle's latency the sum of its single layers' latencies on this host? (SPEC §3, DIME)

For a few zoo models, every bundle of 1..MBS consecutive major layers is profiled with
``partitioner.analysis.profiler`` (ONNX Runtime, CPU, batch 1, real intermediate inputs,
trimmed mean). For each bundle of two or more layers the ratio

    bundle latency / sum of its single-layer latencies

says whether the sum over-estimates (ratio < 1: running the layers together is faster,
e.g. fusion across the cut, no graph-boundary copies) or under-estimates (ratio > 1) the
bundle on this host. The full profiles are kept under ``results/profiles/`` (resumable:
a re-run skips measured bundles) and reused by ``lazy_profiling.py``.

Usage::

    python benchmarks/bundle_vs_sum.py --quick        # ~2 minutes on 2 cores
    python benchmarks/bundle_vs_sum.py --models alexnet resnet18 --mbs 6 --runs 50

Writes ``results/bundle_vs_sum.json`` and ``.png`` (``bundle_vs_sum_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks.common import result_paths, save_figure, zoo_model  # noqa: E402
from partitioner.analysis.profiler import (  # noqa: E402
    BundleTimer,
    ProfileSettings,
    bundle_ranges,
    capture_intermediates,
    host_info,
    sample_inputs,
    start_profile,
    trimmed_stats,
)
from partitioner.analysis.profiles import (  # noqa: E402
    Profile,
    ProfiledBundle,
    read_profile,
    save_profile,
    write_json_atomic,
)

__all__ = ["full_profile", "ratios", "summarise", "QUICK", "DEFAULT"]

# model -> MBS. AlexNet (8 layers) is profiled completely; deeper models up to MBS.
QUICK = {"alexnet": 8, "resnet18": 4, "mobilenet_v2": 3}
DEFAULT = {"alexnet": 8, "resnet18": 6, "mobilenet_v2": 4, "yolo_small": 3}


def _interleaved(timer: BundleTimer, ranges: list[tuple[int, int]], settings: ProfileSettings,
                 passes: int, progress: bool) -> list[ProfiledBundle]:
    """Measure ``ranges`` in ``passes`` shuffled passes and pool each bundle's samples.

    Other processes load this host unevenly over minutes; measuring one bundle after the
    other (or all lengths in order) would turn that drift into fake differences between
    bundles. Interleaving spreads it evenly over all bundles.
    """
    from tqdm import tqdm

    runners = {r: timer.runner(*r) for r in ranges}
    for once in runners.values():
        for _ in range(settings.warmup):
            once()
    samples: dict[tuple[int, int], list[float]] = {r: [] for r in ranges}
    per_pass = max(1, settings.runs // passes)
    rng = np.random.default_rng(0)
    with tqdm(total=passes * len(ranges), file=sys.stderr, disable=not progress,
              unit="bundle") as bar:
        for _ in range(passes):
            for i in rng.permutation(len(ranges)):
                once = runners[ranges[i]]
                samples[ranges[i]] += [once() for _ in range(per_pass)]
                bar.update()
    return [ProfiledBundle(a, b, None, **trimmed_stats(samples[(a, b)], settings.trim))
            for a, b in ranges]


def full_profile(name: str, mbs: int, settings: ProfileSettings, out_dir: Path,
                 passes: int = 5, progress: bool = True) -> tuple[Any, Profile]:
    """Load zoo model ``name`` and profile every bundle up to ``mbs`` (kept in a file).

    Returns:
        ``(prepared model, profile)``; the profile is saved in ``out_dir/profiles`` and
        reused when it already holds every bundle.
    """
    from models import save_model
    from partitioner.frontend import load_model

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        path = save_model(name, Path(tmp) / f"{name}.onnx")
        prepared = load_model(path)
        graph = prepared.graph
        # One file per settings, so a quick run never collides with a full one.
        file = out_dir / "profiles" / f"{name}-runs{settings.runs}-t{settings.threads}.json"
        profile = start_profile(file, graph, "host", settings, force=True)
        if file.exists():
            old = read_profile(file)
            names = tuple(layer.name for layer in graph.layers)
            if (old.sha256, old.runs, old.layers) == (graph.sha256, settings.runs, names):
                profile = old
        ranges = bundle_ranges(len(graph.layers), mbs)
        if any((a, b, None) not in profile.bundle_map() for a, b in ranges):
            captured = capture_intermediates(prepared, sample_inputs(graph), settings.threads)
            timer = BundleTimer(prepared, captured, settings)
            for bundle in _interleaved(timer, ranges, settings, passes, progress):
                profile = profile.with_bundle(bundle)
            save_profile(profile, file)
    return prepared, profile


def ratios(profile: Profile) -> list[dict[str, Any]]:
    """Per bundle of >= 2 layers: its latency, the sum of its singles and their ratio."""
    single = {b.first: b for b in profile.bundles if b.first == b.last}
    rows = []
    for b in sorted(profile.bundles, key=lambda b: (b.last - b.first, b.first)):
        if b.first == b.last:
            continue
        parts = [single[k] for k in range(b.first, b.last + 1)]
        total = sum(p.latency for p in parts)
        # The ratio of medians is a second view, less sensitive to outliers. (Minima are
        # biased: a short single catches a quiet moment of a loaded host more often.)
        total_p50 = sum(p.p50 or p.latency for p in parts)
        rows.append({"first": b.first, "last": b.last, "length": b.last - b.first + 1,
                     "bundle": b.latency, "sum": total, "ratio": b.latency / total,
                     "ratio_p50": (b.p50 or b.latency) / total_p50,
                     "rel_std": (b.std or 0.0) / b.latency})
    return rows


def summarise(values: list[float]) -> dict[str, float]:
    """Distribution of ratios: count, quantiles, and the share on each side of 1."""
    a = np.asarray(values)
    return {"n": int(a.size), "mean": float(a.mean()), "p10": float(np.quantile(a, 0.1)),
            "median": float(np.median(a)), "p90": float(np.quantile(a, 0.9)),
            "min": float(a.min()), "max": float(a.max()),
            "share_sum_overestimates": float(np.mean(a < 1.0)),
            "share_sum_underestimates": float(np.mean(a > 1.0)),
            "share_within_5pct": float(np.mean(np.abs(a - 1.0) <= 0.05))}


def plot(results: dict[str, Any], path: Path) -> None:
    """Box plots of the ratio by bundle length, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models, strict=True):
        rows = results["models"][name]["bundles"]
        lengths = sorted({r["length"] for r in rows})
        data = [[r["ratio"] for r in rows if r["length"] == n] for n in lengths]
        ax.boxplot(data, tick_labels=[str(n) for n in lengths], showfliers=True)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{name} (L={results['models'][name]['layers']})")
        ax.set_xlabel("bundle length (layers)")
    axes[0][0].set_ylabel("bundle / sum of singles")
    fig.suptitle("Bundle latency vs sum of single-layer latencies (this host, ORT CPU)")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (~2 min, 2 cores)")
    parser.add_argument("--models", nargs="*", type=zoo_model, default=None,
                        help="zoo models")
    parser.add_argument("--mbs", type=int, default=None, help="MBS for every model")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--passes", type=int, default=5,
                        help="interleaved passes over all bundles (runs are split)")
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else DEFAULT)
    if args.models:
        plan = {m: plan.get(m, 4) for m in args.models}
    if args.mbs:
        plan = dict.fromkeys(plan, args.mbs)
    settings = ProfileSettings(runs=args.runs or (20 if args.quick else 50),
                               warmup=args.warmup or (3 if args.quick else 10), trim=0.1,
                               threads=args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"host": host_info(settings.threads),
                               "settings": {**settings.__dict__, "passes": args.passes},
                               "load_average_before": os.getloadavg(), "models": {}}
    everything: list[float] = []
    for name, mbs in plan.items():
        prepared, profile = full_profile(name, mbs, settings, args.out, args.passes,
                                         sys.stderr.isatty())
        rows = ratios(profile)
        values = [r["ratio"] for r in rows if r["length"] <= mbs]
        everything += values
        lengths = sorted({r["length"] for r in rows})
        results["models"][name] = {
            "layers": len(prepared.graph.layers), "mbs": mbs, "bundles": rows,
            "summary": summarise(values),
            "summary_of_medians": summarise([r["ratio_p50"] for r in rows]),
            "median_relative_std": float(np.median([r["rel_std"] for r in rows])),
            "by_length": {n: summarise([r["ratio"] for r in rows if r["length"] == n])
                          for n in lengths}}
        s = results["models"][name]["summary"]
        print(f"{name:14s} L={len(prepared.graph.layers):3d} MBS={mbs} bundles>=2: {s['n']:4d} "
              f"ratio median {s['median']:.3f} [p10 {s['p10']:.3f}, p90 {s['p90']:.3f}] "
              f"sum over-estimates {100 * s['share_sum_overestimates']:.0f}%; ratio of medians "
              f"median {results['models'][name]['summary_of_medians']['median']:.3f}",
              file=sys.stderr)
    results["all"] = summarise(everything)
    results["load_average_after"] = os.getloadavg()
    json_path, png_path = result_paths("bundle_vs_sum", args.quick, args.out)
    write_json_atomic(json_path, results)
    plot(results, png_path)
    print(json.dumps(results["all"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
