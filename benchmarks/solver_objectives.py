"""Every objective at 60 layers x 4 devices x 3 frequencies, MBS = L; latency at 200.

Issue 16's goals, measured side by side on this host (medians of repeats):

* ``throughput`` / ``carbon`` / ``weighted`` / ``energy`` on random profiled-looking
  tables (:mod:`partitioner.solver.synthetic`) of 60 x 4 x 3, MBS = L: the time of
  :func:`partitioner.solver.solve` (what the CLI runs), and, for reference, of the integer
  program alone (``--mip``, very slow for throughput and carbon: give it a time limit);
* ``latency`` at 200 x 4 x 3, MBS = L, against the exact dynamic program over runs x
  frequency vectors (:func:`partitioner.solver.dp.linear_dp` on
  :func:`partitioner.solver.runs.run_arrays`, timed on its own).

Every solve's objective value is checked against the integer program's where both ran.

Usage: ``python benchmarks/solver_objectives.py [--quick] [--repeats 3] [--mip-limit S]``;
writes ``results/solver_objectives[_quick].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, save_figure  # noqa: E402
from partitioner import ir  # noqa: E402
from partitioner.analysis.estimate import edge_energy
from partitioner.analysis.profiles import write_json_atomic
from partitioner.errors import InfeasibleError
from partitioner.solver import fast, solve
from partitioner.solver.carbon import least_carbon
from partitioner.solver.dp import linear_dp
from partitioner.solver.runs import run_arrays
from partitioner.solver.synthetic import TableSpec, random_table


def _value(table: ir.CostTable, kind: str, plan: ir.Plan) -> float:
    est = plan.estimate
    if kind == "throughput":
        return est.bottleneck
    if kind == "energy":
        return edge_energy(table, est.energy)
    if kind == "carbon":
        return float(est.carbon or 0.0)
    return est.latency


def _method(table: ir.CostTable, objective: ir.Objective) -> str:
    """Which exact method solved it: the MIP-free path, or the integer program."""
    if not fast.applies(table, objective):
        return "mip"
    if objective.kind == "carbon":
        status, _ = least_carbon(table, run_arrays(table))
        return "dinkelbach-dp" if status == "optimal" else "mip (bounds undecided)"
    return "label-search" if objective.kind == "throughput" else "dp"


def _time(fn: Any, repeats: int) -> tuple[float, list[float], Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def objectives(layers: int, seeds: list[int], repeats: int, mip_limit: float | None,
               carbon_limit: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("throughput", "carbon", "weighted", "energy", "latency"):
        rows = []
        for seed in seeds:
            table = random_table(TableSpec(layers=layers, devices=4, frequencies=3,
                                           mbs=layers, source=False, destination=False),
                                 seed)
            # carbon: the time limit only bounds the integer program it may hand over to
            objective = ir.Objective(kind=kind,  # type: ignore[arg-type]
                                     time_limit=carbon_limit if kind == "carbon" else None)
            try:
                med, times, plan = _time(lambda t=table, o=objective: solve(t, o), repeats)
            except InfeasibleError as err:  # the time limit ran out before any plan
                rows.append({"seed": seed, "solve_s": carbon_limit, "status": str(err)})
                continue
            row: dict[str, Any] = {"seed": seed, "solve_s": med, "all_s": times,
                                   "status": plan.status,
                                   "value": _value(table, kind, plan),
                                   "method": _method(table, objective)}
            if mip_limit:
                # A latency cap nobody reaches forces the integer program (same optimum).
                forced = ir.Objective(kind=kind, max_latency=1e9,  # type: ignore[arg-type]
                                      time_limit=mip_limit)
                t0 = time.perf_counter()
                mplan = solve(table, forced)
                row["mip_s"] = time.perf_counter() - t0
                row["mip_status"] = mplan.status
                row["mip_value"] = _value(table, kind, mplan)
            rows.append(row)
        out[kind] = {"runs": rows, "median_s": statistics.median(r["solve_s"] for r in rows)}
        print(f"{kind:10s} L={layers}: {out[kind]['median_s']:.3f} s "
              + " ".join(f"[seed {r['seed']}: {r['solve_s']:.3f} s {r.get('method', '')}"
                         + (f", MIP {r['mip_s']:.1f} s {r['mip_status']}" if 'mip_s' in r
                            else "") + "]" for r in rows), file=sys.stderr, flush=True)
    return out


def latency_vs_dp(layers: int, seeds: list[int], repeats: int) -> dict[str, Any]:
    rows = []
    for seed in seeds:
        table = random_table(TableSpec(layers=layers, devices=4, frequencies=3, mbs=layers,
                                       source=False, destination=False), seed)

        def dp(table: ir.CostTable = table) -> Any:
            arrays = run_arrays(table)
            return linear_dp(arrays, [(arrays.time, arrays.cut_time)])

        solve_s, _, plan = _time(lambda t=table: solve(t), repeats)
        dp_s, _, found = _time(dp, repeats)
        rows.append({"seed": seed, "solve_s": solve_s, "dp_s": dp_s,
                     "ratio": solve_s / dp_s, "latency": plan.estimate.latency,
                     "dp_latency": found[0][0]})
    doc = {"runs": rows, "solve_median_s": statistics.median(r["solve_s"] for r in rows),
           "dp_median_s": statistics.median(r["dp_s"] for r in rows),
           "ratio_median": statistics.median(r["ratio"] for r in rows)}
    print(f"latency L={layers}: solve {doc['solve_median_s']:.3f} s, DP "
          f"{doc['dp_median_s']:.3f} s, ratio {doc['ratio_median']:.2f}", file=sys.stderr)
    return doc


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(doc["objectives"])
    fig, ax = plt.subplots(figsize=(7, 4))
    vals = [doc["objectives"][k]["median_s"] for k in kinds]
    ax.bar(kinds, vals)
    for x, v in enumerate(vals):
        ax.text(x, v, f"{v:.2f} s", ha="center", va="bottom")
    ax.axhline(1.0, color="red", linestyle="--", label="goal: 1 s")
    ax.set_yscale("log")
    ax.set_ylabel("solve seconds (median)")
    ax.set_title(f"{doc['layers']} layers x 4 devices x 3 frequencies, MBS = L "
                 "(loaded 2-core host)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 and 50 layers, one seed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mip-limit", type=float, default=None, metavar="S",
                        help="also run the integer program alone with this time limit")
    parser.add_argument("--carbon-limit", type=float, default=60.0, metavar="S",
                        help="time limit of the carbon solves (integer program), s")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    quick = args.quick
    seeds = [0] if quick else [0, 1, 2]
    layers = 20 if quick else 60
    doc: dict[str, Any] = {"quick": quick, "machine_before": machine(), "layers": layers,
                           "seeds": seeds, "repeats": args.repeats}
    doc["carbon_time_limit_s"] = args.carbon_limit  # only if it hands over to the MIP
    doc["objectives"] = objectives(layers, seeds, args.repeats, args.mip_limit,
                                   args.carbon_limit)
    doc["latency_vs_dp"] = latency_vs_dp(50 if quick else 200, seeds, args.repeats)
    doc["machine_after"] = machine()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "solver_objectives_quick" if quick else "solver_objectives"
    write_json_atomic(out / f"{stem}.json", doc)
    plot(doc, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
