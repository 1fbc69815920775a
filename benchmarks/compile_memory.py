"""Peak memory of compiling a bundle, relative to the model's bytes (issue 16).

For each model (weights inline in the ``.onnx`` file, and as external data) and each
setting, a fresh Python process loads the model with the front end (as ``partitioner
compile`` does: ``lazy_weights``, where the measured tree has it), cuts it into two
stages (the plan is fixed: the layers split in half, so no solver time or memory is
counted) and runs the back end (``compile_bundle``) with verification on, then off; a
third setting only extracts and saves the stages (``partitioner.frontend.slicing``, the
part this benchmark's owner can change). The child reports its peak resident set
(``VmHWM``) after each phase, and the wall time. The models are built in a separate
process too, so the measuring processes start small.

    python benchmarks/compile_memory.py            # vgg16 and vit_b_16 (~2 GB of files)
    python benchmarks/compile_memory.py --quick    # resnet18 only; *_quick.json
    python benchmarks/compile_memory.py --tree ../other-checkout --label before
        # the same measurement of another checkout's code (a before/after comparison);
        # writes compile_memory_<label>.json

Writes ``benchmarks/results/compile_memory.json`` (``compile_memory_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("verify", "no-verify", "slice-only")


def _peak_mb() -> float:
    """Peak resident set of this process so far, MiB.

    ``VmHWM`` (per address space, so it starts afresh at ``exec``) rather than
    ``getrusage``'s ``ru_maxrss``, which Linux carries over from the forking parent.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(model_path: str, mode: str, out_dir: str) -> dict[str, Any]:
    """Runs in the fresh process: load, plan in halves, compile (or only slice)."""
    import inspect

    from partitioner.frontend import load_model

    t0 = time.perf_counter()
    phases: dict[str, float] = {"start": _peak_mb()}
    # as `partitioner compile` loads (pipeline.compile); older trees have no such option
    lazy = "lazy_weights" in inspect.signature(load_model).parameters
    prepared = load_model(model_path, **({"lazy_weights": True} if lazy else {}))
    phases["load"] = _peak_mb()
    n = len(prepared.graph.layers)
    halves = ((0, n // 2 - 1), (n // 2, n - 1))
    if mode == "slice-only":
        from partitioner.frontend.slicing import extract_layers

        for i, (a, b) in enumerate(halves):
            extract_layers(prepared, a, b).save(Path(out_dir) / f"stage{i}.onnx")
            phases[f"stage{i}"] = _peak_mb()
    else:
        from partitioner.backend.emit import compile_bundle
        from partitioner.ir import Estimate, Plan, Stage

        plan = Plan("optimal", "latency",
                    tuple(Stage(f"d{i}", None, a, b) for i, (a, b) in enumerate(halves)),
                    Estimate(0.0, 0.0, 0.0, 0.0, 0.0), 0.0)
        compile_bundle(prepared, plan, None, Path(out_dir) / "bundle",
                       verify=mode == "verify")
        phases["compile"] = _peak_mb()
    return {"phases_peak_mb": phases, "wall_s": time.perf_counter() - t0}


def _model_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _measure(path: Path, mode: str, work: Path, tree: Path) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="out-", dir=work))
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(path), mode, str(out)],
            capture_output=True, text=True, check=False,
            env={**os.environ, "PYTHONPATH": str(tree)})
        if proc.returncode != 0:
            raise SystemExit(f"{path.name} {mode}: child failed:\n{proc.stderr[-2000:]}")
        doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)
    peak = max(doc["phases_peak_mb"].values())
    model_mb = _model_bytes(path) / 2**20
    start = doc["phases_peak_mb"]["start"]  # the interpreter and imports
    return {"mode": mode, "peak_mb": round(peak, 1), "model_mb": round(model_mb, 1),
            "ratio": round(peak / model_mb, 2),
            "ratio_above_start": round((peak - start) / model_mb, 2),
            "wall_s": round(doc["wall_s"], 2),
            "phases_peak_mb": {k: round(v, 1) for k, v in doc["phases_peak_mb"].items()}}


def plot(doc: dict[str, Any], baseline: dict[str, Any] | None, out: Path) -> None:
    """Peak RSS / model bytes per model, storage and mode; the baseline's bars hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def key(r: dict[str, Any]) -> str:
        return f"{r['model']}\n{r['storage']}"

    groups = list(dict.fromkeys(key(r) for r in doc["rows"]))
    runs = [("this tree", doc)] + ([("baseline", baseline)] if baseline else [])
    width = 0.8 / (len(MODES) * len(runs))
    fig, ax = plt.subplots(figsize=(8, 4))
    for m, mode in enumerate(MODES):
        for k, (label, run) in enumerate(runs):
            ratio = {key(r): r["ratio"] for r in run["rows"] if r["mode"] == mode}
            xs = [g + (m * len(runs) + k) * width - 0.4 + width / 2 for g in range(len(groups))]
            ax.bar(xs, [ratio.get(g, 0.0) for g in groups], width, color=f"C{m}",
                   hatch="//" if label == "baseline" else None,
                   alpha=0.5 if label == "baseline" else 1.0, label=f"{mode} ({label})")
    ax.axhline(2.0, color="k", linestyle="--", linewidth=1, label="goal: 2x")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("peak RSS / model bytes")
    ax.set_title("compile: peak memory, 2 stages (loaded 2-core host)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> int:
    sys.path.insert(0, str(ROOT))  # the children import from --tree; the parent from here
    from benchmarks.common import zoo_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet18 only")
    parser.add_argument("--models", type=zoo_models, default=None,
                        help="comma-separated zoo models")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="checkout whose partitioner is measured (default: this one)")
    parser.add_argument("--label", default=None, help="suffix of the results file")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="results JSON of another tree to draw next to this run")
    parser.add_argument("--plot-only", action="store_true",
                        help="redraw the PNG from the results JSON, measure nothing")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "MODE", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return 0
    stem = "compile_memory" + (f"_{args.label}" if args.label else "")
    out = RESULTS / (f"{stem}_quick.json" if args.quick else f"{stem}.json")
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    if args.plot_only:
        plot(json.loads(out.read_text()), baseline, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
        return 0
    names = (args.models if args.models
             else ["resnet18"] if args.quick else ["vgg16", "vit_b_16"])
    rows = []
    work = Path(tempfile.mkdtemp(prefix="compile-memory-"))
    try:
        for name in names:
            for storage in ("inline", "external"):
                path = work / f"{name}_{storage}.onnx"
                subprocess.run([sys.executable, "-c",
                                "import sys, models; models.save_model(sys.argv[1], sys.argv[2], "
                                "external_data=sys.argv[3] == 'external')",
                                name, str(path), storage],
                               check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                for mode in MODES:
                    row = {"model": name, "storage": storage,
                           **_measure(path, mode, work, args.tree.resolve())}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                for f in work.glob(f"{name}_{storage}.onnx*"):
                    f.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "-C", str(args.tree), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    doc = {"benchmark": "compile_memory", "tree": str(args.tree), "commit": commit or None,
           "host": os.uname().nodename,
           "cpus": os.cpu_count(), "loaded_host": True,
           "note": "2-core host shared by ~8 agents; peak RSS is not affected by load, "
                   "wall times are", "rows": rows}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)
    plot(doc, baseline, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
