"""Profiler overhead: ``partitioner profile`` wall time against the time its bundles run.

Issue 16's measure: the wall time of one ``partitioner profile`` command (a fresh process:
imports, model loading, the intermediate tensors, every bundle's set-up, warm-up and timed
runs, the profile written after every bundle) divided by ``sum(bundle latency x runs)``
over the bundles it wrote, the time a perfect profiler would spend on the timed runs
alone. The warm-up runs put a floor under the ratio: ``(runs + warmup) / runs``.

Each model is profiled by the real command in three set-ups, in turn (reversed every
other repeat), so load drift on a shared host hits them alike:

* ``shared``: the default (weights written once, every bundle maps them; the next bundle
  is opened during the current one's warm-up);
* ``one_at_a_time``: ``--no-open-ahead``, each bundle opened only when it is measured;
* ``inline``: ``--inline-weights``, every bundle opened from its own copy of its weights
  (the set-up before issue 16).

The JSON keeps every ratio, the command's own breakdown (weight file, bundle set-up and
waiting, runs, the rest, seconds spent opening ahead), its peak memory and, per bundle,
the ratio of the latencies the set-ups measured (a set-up must not change what is
measured; on a loaded host the spread is the host's noise). Usage::

    python benchmarks/profiler_overhead.py            # alexnet (MBS 8), resnet18 (MBS 4)
    python benchmarks/profiler_overhead.py --quick    # fewer runs and bundles

Writes ``results/profiler_overhead.json`` and ``.png`` (``profiler_overhead_quick.*`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    ROOT,
    machine,
    peak_rss_bytes,
    result_paths,
    save_figure,
    zoo_models,
)

# model -> MBS (None: every layer)
DEFAULT = {"alexnet": None, "resnet18": 4}
QUICK = {"alexnet": 3, "resnet18": 2}
SETUPS = ("shared", "one_at_a_time", "inline")


def profile_once(model: Path, setup: str, mbs: int | None, args: argparse.Namespace,
                 out: Path) -> dict[str, Any]:
    """Run ``partitioner profile`` once; its wall time, summary and bundles."""
    cmd = [sys.executable, "-m", "partitioner", "profile", str(model), "--device", "host",
           "--runs", str(args.runs), "--warmup", str(args.warmup), "--threads",
           str(args.threads), "-o", str(out), "--force", "--quiet", "--json"]
    if mbs is not None:
        cmd += ["--mbs", str(mbs)]
    if setup == "inline":
        cmd.append("--inline-weights")
    if setup == "one_at_a_time":
        cmd.append("--no-open-ahead")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=env)
        peak = None
        while proc.poll() is None:  # the child's own high-water mark, read as it runs
            peak = peak_rss_bytes(proc.pid) or peak
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        stdout.seek(0)
        stderr.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: "
                               f"{stderr.read()[-1500:]}")
        summary = json.loads(stdout.read())
    bundles = json.loads(out.read_text())["bundles"]
    timed = sum(b["latency"] for b in bundles) * args.runs
    other = wall - summary["weights_file_seconds"] - summary["setup_seconds"] - \
        summary["run_seconds"]
    return {"setup": setup, "wall_s": wall, "timed_runs_s": timed, "ratio": wall / timed,
            "bundles": len(bundles),
            "weights_file_s": summary["weights_file_seconds"],
            "bundle_setup_s": summary["setup_seconds"],
            "bundle_setup_per_bundle_s": summary["setup_seconds"] / len(bundles),
            "opened_ahead_s": summary["ahead_seconds"],  # overlapped with warm-up runs
            "peak_rss_mb": None if peak is None else peak / 2**20,
            "runs_s": summary["run_seconds"],
            "rest_s": other,  # interpreter start, imports, loading, intermediates, saving
            "reused_freed_memory": summary["reused_freed_memory"],
            "latencies": {f"{b['first']}-{b['last']}": b["latency"] for b in bundles}}


def bench_model(name: str, mbs: int | None, args: argparse.Namespace, work: Path
                ) -> dict[str, Any]:
    import models

    model = work / f"{name}.onnx"
    models.save_model(name, model)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SETUPS}
    for rep in range(args.repeats):
        order = SETUPS if rep % 2 == 0 else SETUPS[::-1]
        for setup in order:
            row = profile_once(model, setup, mbs, args, work / f"{name}-{setup}.json")
            runs[setup].append(row)
            print(f"[overhead] {name} {setup}: wall {row['wall_s']:.1f} s, timed runs "
                  f"{row['timed_runs_s']:.1f} s, ratio {row['ratio']:.3f} (set-up "
                  f"{row['bundle_setup_per_bundle_s'] * 1e3:.0f} ms/bundle)", file=sys.stderr)
    return {
        "model": name, "mbs": mbs, "runs": {s: [{k: v for k, v in r.items()
                                                 if k != "latencies"} for r in rows]
                                            for s, rows in runs.items()},
        "ratio": {s: float(np.median([r["ratio"] for r in rows])) for s, rows in runs.items()},
        "floor": (args.runs + args.warmup) / args.runs,
        "latency_shared_over_inline": _agreement(runs, "shared", "inline"),
        "latency_shared_over_one_at_a_time": _agreement(runs, "shared", "one_at_a_time"),
        "latencies": {s: runs[s][-1]["latencies"] for s in SETUPS},
    }


def _agreement(runs: dict[str, list[dict[str, Any]]], mine: str, theirs: str
               ) -> dict[str, float]:
    """Per bundle, the latency set-up ``mine`` measured over ``theirs`` (last repeats)."""
    a, b = runs[mine][-1]["latencies"], runs[theirs][-1]["latencies"]
    ratio = np.array([a[k] / b[k] for k in a])
    return {"median": float(np.median(ratio)), "p10": float(np.percentile(ratio, 10)),
            "p90": float(np.percentile(ratio, 90)), "bundles": len(ratio)}


def plot(doc: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["models"]
    fig, ax = plt.subplots(figsize=(11, 4))
    parts = [("runs_s", "warm-up + timed runs", "#4c72b0"),
             ("bundle_setup_s", "bundle set-up", "#dd8452"),
             ("weights_file_s", "weight file", "#55a868"),
             ("rest_s", "start, load, intermediates", "#8c8c8c")]
    labels, x = [], 0
    for row in rows:
        for setup in SETUPS:
            r = row["runs"][setup][-1]
            bottom = 0.0
            for key, label, colour in parts:
                value = r[key] / r["timed_runs_s"]
                ax.bar(x, value, bottom=bottom, color=colour,
                       label=label if x == 0 else None)
                bottom += value
            ax.text(x, bottom + 0.02, f"{r['ratio']:.2f}x", ha="center", fontsize=8)
            labels.append(f"{row['model']}\n{setup}")
            x += 1
    ax.axhline(1.2, color="r", ls="--", lw=1, label="goal 1.2x")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("wall / sum(latency x runs)")
    loaded = doc.get("machine_before", {}).get("loaded") or doc.get("machine_after", {}).get(
        "loaded")
    ax.set_title(f"partitioner profile overhead (runs {doc['settings']['runs']}, warm-up "
                 f"{doc['settings']['warmup']}; {'loaded' if loaded else 'quiet'} host)",
                 fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save_figure(fig, png)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=zoo_models, default=None,
                    help="comma-separated zoo models")
    ap.add_argument("--runs", type=int, default=None, help="timed runs (default 100; quick 20)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs (10; quick 3)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None,
                    help="profiles per set-up, alternating (default 2; quick 1)")
    ap.add_argument("--quick", action="store_true", help="fewer runs and bundles")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    args = ap.parse_args(argv)
    plan = dict(QUICK if args.quick else DEFAULT)
    if args.models:
        plan = {m: plan.get(m) for m in args.models}
    args.runs = args.runs or (20 if args.quick else 100)
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 10)
    args.repeats = args.repeats or (1 if args.quick else 2)
    json_path, png_path = result_paths("profiler_overhead", args.quick, args.out)

    from partitioner.analysis.profiler import host_info
    from partitioner.analysis.profiles import write_json_atomic

    before = machine()
    with tempfile.TemporaryDirectory(prefix="profiler-overhead-") as tmp:
        rows = [bench_model(name, mbs, args, Path(tmp)) for name, mbs in plan.items()]
    doc = {"benchmark": "profiler_overhead", "quick": args.quick,
           "settings": {"runs": args.runs, "warmup": args.warmup, "threads": args.threads,
                        "repeats": args.repeats},
           "host": host_info(args.threads), "machine_before": before,
           "machine_after": machine(), "models": rows}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, doc)
    plot(doc, png_path)
    print(json.dumps({r["model"]: {"ratio": r["ratio"], "floor": r["floor"],
                                   "latency_shared_over_inline":
                                       r["latency_shared_over_inline"]["median"],
                                   "latency_shared_over_one_at_a_time":
                                       r["latency_shared_over_one_at_a_time"]["median"]}
                      for r in rows}, indent=1))
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
