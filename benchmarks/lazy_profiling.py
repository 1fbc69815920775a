"""Lazy vs full bundle profiling on zoo models (partitioner.analysis.lazy).

The system is the packaged edge-hub-cloud example (Pi 3B, Jetson Nano, 1080 Ti; SPEC §1)
in which the hub ``nano`` stands for *this host*: it is priced from profiles measured here,
the Pi and the GPU stay analytic. The Pi-hub link bandwidth is swept (the published
1e6 B/s and faster LANs) so that the plans give the hub different runs of layers.

For each model and bandwidth:

* **full**: every bundle up to MBS is measured (the full profiles of
  ``bundle_vs_sum.py``, measured here when missing); the plan solved on them is the
  reference;
* **lazy**: :func:`partitioner.analysis.lazy.lazy_profile` with its measurements looked
  up in the same full profile, so both see identical numbers and the comparison shows the
  method, not measurement noise. Reported: bundles measured, rounds, the final plan and
  its latency priced with the full profile;
* **lazy adaptive**: the same with ``estimate="adaptive"`` (unmeasured bundles scaled by
  the best measured/estimated ratio so far);
* **singles only**: the plan of a profile with single layers only (every bundle priced as
  the sum of its singles, JointDNN-style), priced with the full profile.

Usage::

    python benchmarks/lazy_profiling.py --quick      # reuses results/profiles from
                                                     # bundle_vs_sum.py --quick

Writes ``results/lazy_profiling.json`` and ``.png`` (``lazy_profiling_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from bundle_vs_sum import DEFAULT, QUICK, full_profile  # noqa: E402

from benchmarks.common import result_paths, save_figure, zoo_model  # noqa: E402
from partitioner.analysis.costs import build_cost_table  # noqa: E402
from partitioner.analysis.lazy import lazy_profile  # noqa: E402
from partitioner.analysis.profiler import ProfileSettings, host_info  # noqa: E402
from partitioner.analysis.profiles import Profile, write_json_atomic  # noqa: E402
from partitioner.analysis.system import load_system  # noqa: E402
from partitioner.data import example_system_path  # noqa: E402
from partitioner.ir import System  # noqa: E402
from partitioner.pipeline import planner  # noqa: E402

HOST = "nano"  # the device this host stands for
BANDWIDTHS = (1.0e6, 1.0e7, 1.0e8)  # Pi <-> hub link, B/s


def system_with(bandwidth: float) -> System:
    """The example system with the Pi-hub link at ``bandwidth`` B/s."""
    base = load_system(example_system_path())
    links = tuple(replace(link, bandwidth=bandwidth) if {link.a, link.b} == {"pi3", HOST}
                  else link for link in base.links)
    return replace(base, links=links, path=f"edge-hub-cloud (pi3-{HOST} {bandwidth:g} B/s)")


@contextlib.contextmanager
def _quiet_stdout():
    """CBC's C code may print to fd 1; keep this script's stdout to its summary."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _stages(plan: Any) -> list[list[Any]]:
    return [[s.device, s.first, s.last] for s in plan.stages]


def compare(graph: Any, full: Profile, system: System, mbs: int) -> dict[str, Any]:
    """Full, lazy and singles-only plans for one model and system."""
    from partitioner.analysis.estimate import evaluate
    from partitioner.solver import solve

    full_table = build_cost_table(graph, system, profiles=[full], mbs=mbs)
    best = solve(full_table)
    lookup = full.bundle_map()
    base = replace(full, bundles=(), lazy=True)
    result = lazy_profile(graph, system, HOST, base, lambda a, b: lookup[(a, b, None)],
                          planner=planner(), mbs=mbs)
    lazy_exact = evaluate(full_table, result.plan.placement, result.plan.frequencies)
    adaptive = lazy_profile(graph, system, HOST, base, lambda a, b: lookup[(a, b, None)],
                            planner=planner(), mbs=mbs, estimate="adaptive")
    adaptive_exact = evaluate(full_table, adaptive.plan.placement, adaptive.plan.frequencies)
    singles = replace(base, bundles=tuple(b for b in full.bundles if b.first == b.last))
    naive = solve(build_cost_table(graph, system, profiles=[singles], mbs=mbs))
    naive_exact = evaluate(full_table, naive.placement, naive.frequencies)
    ref = best.estimate.latency
    return {
        "full": {"bundles": len([b for b in full.bundles if b.last - b.first < mbs]),
                 "stages": _stages(best), "latency": ref},
        "lazy": {"bundles": result.measured, "rounds": len(result.rounds),
                 "stages": _stages(result.plan), "latency": lazy_exact.latency,
                 "latency_as_estimated": result.plan.estimate.latency,
                 "gap": lazy_exact.latency / ref - 1.0,
                 "history": [{"estimate": r.latency, "measured": r.measured}
                             for r in result.rounds]},
        "lazy_adaptive": {"bundles": adaptive.measured, "rounds": len(adaptive.rounds),
                          "stages": _stages(adaptive.plan), "latency": adaptive_exact.latency,
                          "gap": adaptive_exact.latency / ref - 1.0},
        "singles_only": {"bundles": len(graph.layers), "stages": _stages(naive),
                         "latency": naive_exact.latency,
                         "latency_as_estimated": naive.estimate.latency,
                         "gap": naive_exact.latency / ref - 1.0},
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Bundles measured (lazy vs full) and latency gaps to the full-profile plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r['model']}\n{r['bandwidth']:.0e}" for r in rows]
    x = np.arange(len(rows))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(7, 0.9 * len(rows)), 6.5), sharex=True)
    a1.bar(x - 0.27, [r["full"]["bundles"] for r in rows], 0.27, label="full")
    a1.bar(x, [r["lazy"]["bundles"] for r in rows], 0.27, label="lazy (sum)")
    a1.bar(x + 0.27, [r["lazy_adaptive"]["bundles"] for r in rows], 0.27,
           label="lazy (adaptive)")
    a1.set_ylabel("bundles measured")
    a1.legend()
    a2.bar(x - 0.27, [100 * r["singles_only"]["gap"] for r in rows], 0.27,
           label="singles only (sum)")
    a2.bar(x, [100 * r["lazy"]["gap"] for r in rows], 0.27, label="lazy (sum)")
    a2.bar(x + 0.27, [100 * r["lazy_adaptive"]["gap"] for r in rows], 0.27,
           label="lazy (adaptive)")
    a2.axhline(0, color="grey", lw=0.8)
    a2.set_ylabel("latency vs full-profile plan (%)")
    a2.set_xticks(x, labels, fontsize=8)
    a2.set_xlabel("model / Pi-hub bandwidth (B/s)")
    a2.legend()
    fig.suptitle(f"Lazy vs full profiling ({HOST} = this host, others analytic)")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run (reuses profiles)")
    parser.add_argument("--models", nargs="*", type=zoo_model, default=None)
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else DEFAULT)
    if args.models:
        plan = {m: plan.get(m, 4) for m in args.models}
    settings = ProfileSettings(runs=args.runs or (20 if args.quick else 50),
                               warmup=3 if args.quick else 10, threads=args.threads)
    rows = []
    for name, mbs in plan.items():
        prepared, profile = full_profile(name, mbs, settings, args.out,
                                         progress=sys.stderr.isatty())
        profile = replace(profile, device=HOST)
        for bw in BANDWIDTHS:
            with _quiet_stdout():
                row = compare(prepared.graph, profile, system_with(bw), mbs)
            rows.append({"model": name, "layers": len(prepared.graph.layers), "mbs": mbs,
                         "bandwidth": bw, **row})
            print(f"{name:13s} bw {bw:7.0e}  full {row['full']['bundles']:4d} bundles  "
                  f"lazy {row['lazy']['bundles']:4d} in {row['lazy']['rounds']} rounds, "
                  f"gap {100 * row['lazy']['gap']:+.2f}%  adaptive "
                  f"{row['lazy_adaptive']['bundles']:4d} gap "
                  f"{100 * row['lazy_adaptive']['gap']:+.2f}%  singles-only gap "
                  f"{100 * row['singles_only']['gap']:+.2f}%")
    total_full = sum(r["full"]["bundles"] for r in rows)
    total_lazy = sum(r["lazy"]["bundles"] for r in rows)
    doc = {"host": host_info(settings.threads), "device": HOST,
           "system": str(example_system_path().name), "bandwidths": list(BANDWIDTHS),
           "rows": rows,
           "summary": {"bundles_full": total_full, "bundles_lazy": total_lazy,
                       "share_measured": total_lazy / total_full,
                       "lazy_optimal": sum(abs(r["lazy"]["gap"]) < 1e-9 for r in rows),
                       "cases": len(rows),
                       "worst_lazy_gap": max(r["lazy"]["gap"] for r in rows),
                       "bundles_adaptive": sum(r["lazy_adaptive"]["bundles"] for r in rows),
                       "adaptive_optimal": sum(abs(r["lazy_adaptive"]["gap"]) < 1e-9
                                               for r in rows),
                       "worst_adaptive_gap": max(r["lazy_adaptive"]["gap"] for r in rows),
                       "singles_optimal": sum(abs(r["singles_only"]["gap"]) < 1e-9
                                              for r in rows),
                       "worst_singles_gap": max(r["singles_only"]["gap"] for r in rows)}}
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = result_paths("lazy_profiling", args.quick, args.out)
    write_json_atomic(json_path, doc)
    plot(rows, png_path)
    print(doc["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
