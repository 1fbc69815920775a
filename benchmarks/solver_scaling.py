"""How the planner scales, against the published integer program (DISS) as a baseline.

Baseline (DISS ch. 5-8, as restated in SPEC §4): binaries ``x[l,d,f]`` (layer ``l`` on
``d`` at ``f``), transitions ``z[l,d,d']`` (linearised AND of ``x[l,d]`` and
``x[l+1,d']``), bundle indicators ``y[i,j,d,f]`` with the coverage rows
``sum_{i<=l<=j} y[i,j,d,f] = x[l,d,f]`` and the bundle-count row
``sum y = 1 + sum z`` (one bundle per run, which makes every bundle a maximal run:
exact for ``MBS = L`` only), one frequency per device (``x <= phi``), memory, weight
preloading (the first bundle of a run, ``i > 0``, hides its weight time). It lives here,
not in the package. Ours: :func:`partitioner.solver.solve` (state network, exact
shortest-path pruning, then the MIP); "ours, MIP only" builds the same network and MIP
without pruning, to show what the formulation alone costs.

Instances: random profiled-looking tables (:mod:`partitioner.solver.synthetic`): a
chain of model layers, every bundle of 1..MBS layers priced with a factor in
[0.5, 1.5] of the sum of its layers, per-frequency noise 5 %. Every case checks that the
methods that finished agree on the optimum (1e-6 relative).

Usage: ``python benchmarks/solver_scaling.py [--quick] [--out benchmarks/results]``.
Writes ``solver_scaling[_quick].json`` and ``.png``; ``--long-baseline 900`` runs the
60x4x3 case once with a long baseline time limit (``solver_scaling_long.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mip

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_figure  # noqa: E402
from partitioner import ir  # noqa: E402
from partitioner.solver import evaluate, solve
from partitioner.solver.milp import Formulation
from partitioner.solver.network import build_network
from partitioner.solver.synthetic import TableSpec, random_table


def diss_baseline(table: ir.CostTable, time_limit: float) -> dict[str, Any]:
    """The published formulation, latency objective. Chain of model layers, MBS = L."""
    t0 = time.perf_counter()
    pos = table.positions
    n = len(pos)
    assert all(p.kind == "layer" for p in pos) and table.mbs >= n, "MBS = L chains only"
    devs = table.device_names
    m = mip.Model(sense=mip.MINIMIZE, solver_name="CBC")
    m.verbose = 0
    m.threads = 1
    m.max_mip_gap = 1e-9
    m.max_mip_gap_abs = 1e-12
    mip.cbc.cbc_set_parameter(m.solver, "increment", "1e-12")
    freqs = {d: table.frequencies[d] for d in devs}
    allowed = [set(p.allowed) if p.allowed is not None else set(devs) for p in pos]
    x = {(k, d, f): m.add_var(f"x({k},{d},{f})", var_type=mip.BINARY,
                              ub=1.0 if d in allowed[k] else 0.0)
         for k in range(n) for d in devs for f in freqs[d]}
    phi = {(d, f): m.add_var(f"phi({d},{f})", var_type=mip.BINARY)
           for d in devs for f in freqs[d]}
    xd = {(k, d): mip.xsum(x[k, d, f] for f in freqs[d]) for k in range(n) for d in devs}
    for k in range(n):
        m.add_constr(mip.xsum(xd[k, d] for d in devs) == 1, name=f"one({k})")
    for (k, d, f), v in x.items():
        m.add_constr(v <= phi[d, f], name=f"freq({k},{d},{f})")
    for d in devs:
        m.add_constr(mip.xsum(phi[d, f] for f in freqs[d]) <= 1, name=f"onefreq({d})")
    z = {}
    for k in range(n - 1):
        for a in devs:
            for b in devs:
                if a == b:
                    continue
                linked = (k, a, b) in table.transfers
                v = m.add_var(f"z({k},{a},{b})", var_type=mip.BINARY, ub=1.0 if linked else 0.0)
                z[k, a, b] = v
                m.add_constr(v >= xd[k, a] + xd[k + 1, b] - 1, name=f"zand({k},{a},{b})")
                m.add_constr(v <= xd[k, a], name=f"za({k},{a},{b})")
                m.add_constr(v <= xd[k + 1, b], name=f"zb({k},{a},{b})")
    y = {}
    for (i, j, d, f) in table.bundles:
        y[i, j, d, f] = m.add_var(f"y({i},{j},{d},{f})", var_type=mip.BINARY)
    cover: dict[tuple[int, str, str | None], list[mip.Var]] = {}
    for (i, j, d, f), v in y.items():
        for k in range(i, j + 1):
            cover.setdefault((k, d, f), []).append(v)
    for (k, d, f), v in x.items():
        m.add_constr(mip.xsum(cover.get((k, d, f), [])) == v, name=f"cover({k},{d},{f})")
    m.add_constr(mip.xsum(y.values()) == 1 + mip.xsum(z.values()), name="bundles")
    for dev in table.system.devices:
        if math.isfinite(dev.memory):
            m.add_constr(mip.xsum(pos[k].weight_bytes * xd[k, dev.name] for k in range(n))
                         <= dev.memory, name=f"mem({dev.name})")
    obj = []
    for (i, j, d, f), v in y.items():
        c = table.bundles[i, j, d, f]
        hidden = c.hidden if (table.preload and i > 0) else 0.0
        obj.append((c.time - hidden) * v)
    obj += [table.transfers[k, a, b].time * v for (k, a, b), v in z.items()
            if (k, a, b) in table.transfers]
    m.objective = mip.minimize(mip.xsum(obj))
    built = time.perf_counter()
    status = m.optimize(max_seconds=time_limit)
    done = time.perf_counter()
    out: dict[str, Any] = {"build_s": built - t0, "solve_s": done - built,
                           "total_s": done - t0, "status": status.name.lower(),
                           "vars": m.num_cols, "rows": m.num_rows, "nz": m.num_nz}
    if status in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        placement = tuple(next(d for d in devs if (xd[k, d].x or 0) > 0.5) for k in range(n))
        fq = {d: f for (d, f), v in phi.items() if (v.x or 0) > 0.5 and d in placement}
        out["latency"] = evaluate(table, placement, fq).latency
    return out


def ours(table: ir.CostTable) -> dict[str, Any]:
    t0 = time.perf_counter()
    plan = solve(table, ir.Objective())
    return {"total_s": time.perf_counter() - t0, "status": plan.status,
            "latency": plan.estimate.latency}


def ours_mip_only(table: ir.CostTable) -> dict[str, Any]:
    """The state-network MIP without the pruning pass."""
    t0 = time.perf_counter()
    net = build_network(table)
    form = Formulation(net, table, integer=True)
    built = time.perf_counter()
    r = form.optimize(form.latency)
    done = time.perf_counter()
    placement, fq = form.extract()
    return {"build_s": built - t0, "solve_s": done - built, "total_s": done - t0,
            "status": r.status, "latency": evaluate(table, placement, fq).latency,
            "vars": form.model.num_cols, "rows": form.model.num_rows}


def run_case(layers: int, devices: int, freqs: int, mbs: int, seeds: list[int],
             diss_limit: float | None, mip_only: bool) -> dict[str, Any]:
    rows = []
    for seed in seeds:
        spec = TableSpec(layers=layers, devices=devices, frequencies=freqs, mbs=mbs,
                         source=False, destination=False, memory_frac=0.0)
        table = random_table(spec, seed)
        row: dict[str, Any] = {"seed": seed, "ours": ours(table)}
        if mip_only:
            row["ours_mip_only"] = ours_mip_only(table)
        if diss_limit is not None and mbs >= layers:
            row["diss"] = diss_baseline(table, diss_limit)
        best = row["ours"]["latency"]
        for key in ("ours_mip_only", "diss"):
            r = row.get(key)
            if r and r["status"] == "optimal":
                r["agrees"] = math.isclose(r["latency"], best, rel_tol=1e-6)
                if not r["agrees"]:
                    print(f"  MISMATCH {key}: {r['latency']} vs ours {best}", file=sys.stderr)
        rows.append(row)
    summary: dict[str, Any] = {"layers": layers, "devices": devices, "frequencies": freqs,
                               "mbs": mbs, "runs": rows}
    for key in ("ours", "ours_mip_only", "diss"):
        times = [r[key]["total_s"] for r in rows if key in r]
        if times:
            summary[f"{key}_median_s"] = statistics.median(times)
    print(f"L={layers:3d} D={devices} F={freqs} MBS={mbs:3d}: " + ", ".join(
        f"{k}={summary[k + '_median_s']:.3f}s" for k in ("ours", "ours_mip_only", "diss")
        if k + "_median_s" in summary), file=sys.stderr, flush=True)
    return summary


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (sweep, xkey) in zip(axes.flat, [("layers", "layers"), ("devices", "devices"),
                                             ("frequencies", "frequencies"), ("mbs", "mbs")],
                                 strict=True):
        cases = doc["sweeps"][sweep]
        for key, label, style in (("ours", "ours (pruned network + MIP)", "o-"),
                                  ("ours_mip_only", "ours, MIP only", "s--"),
                                  ("diss", "DISS formulation (CBC)", "^:")):
            pts = [(c[xkey], c[key + "_median_s"]) for c in cases if key + "_median_s" in c]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label)
        ax.set_xlabel(xkey)
        ax.set_ylabel("seconds (median)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"sweep over {xkey}")
        ax.legend(fontsize=8)
    fig.suptitle("latency-optimal plan: solve time")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one seed")
    # Full run: headline cases over 3 seeds, sweeps over 2 (the baseline dominates the time).
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--diss-limit", type=float, default=None,
                        help="time limit of the baseline per solve, s (default 120, quick 20)")
    parser.add_argument("--long-baseline", type=float, default=None, metavar="S",
                        help="only run the 60x4x3 MBS=L case, seed 0, with this baseline "
                             "time limit; writes solver_scaling_long.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.long_baseline:
        table = random_table(TableSpec(layers=60, devices=4, frequencies=3, mbs=60,
                                       source=False, destination=False), 0)
        doc0 = {"case": "L60_D4_F3_MBS_L seed 0", "ours": ours(table),
                "diss": diss_baseline(table, args.long_baseline)}
        out.mkdir(parents=True, exist_ok=True)
        (out / "solver_scaling_long.json").write_text(json.dumps(doc0, indent=1))
        print(json.dumps(doc0), file=sys.stderr)
        return 0
    quick = args.quick
    seeds = [0] if quick else [0, 1, 2]
    limit = args.diss_limit or (20.0 if quick else 120.0)
    doc: dict[str, Any] = {"quick": quick, "diss_time_limit_s": limit, "seeds": seeds,
                           "cpu": os.cpu_count(), "headline": {}, "sweeps": {}}
    big = 30 if quick else 60
    ours(random_table(TableSpec(layers=5, source=False, destination=False), 0))  # warm-up
    sweep_seeds = seeds[:2]
    doc["headline"]["L60_D4_F3_MBS_L"] = run_case(big, 4, 3, big, seeds, limit, True)
    doc["headline"]["L100_D4_F3_MBS_L"] = run_case(50 if quick else 100, 4, 3,
                                                   50 if quick else 100, seeds, None, False)
    base = 20 if quick else 30
    sweeps = {
        "layers": [(L, 4, 3, L) for L in ([5, 10, 20, 30] if quick
                                          else [10, 20, 40, 60, 80, 100])],
        "devices": [(base, D, 3, base) for D in ([2, 3, 4] if quick else [2, 3, 4, 6, 8])],
        "frequencies": [(base, 4, F, base) for F in ([1, 2, 3] if quick else [1, 2, 3, 4, 5])],
        "mbs": [(base, 4, 3, M) for M in ([1, 4, base] if quick else [1, 2, 4, 8, 16, base])],
    }
    for name, cases in sweeps.items():
        doc["sweeps"][name] = [
            run_case(L, D, F, M, sweep_seeds, limit if L <= big else None, L <= big)
            for L, D, F, M in cases]
    out.mkdir(parents=True, exist_ok=True)
    stem = "solver_scaling_quick" if quick else "solver_scaling"
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(tmp, out / f"{stem}.json")
    plot(doc, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
