"""Trade-off curves of the published work, computed by the planner (issue 6.4).

On an illustrative DVFS edge-hub-cloud system (benchmarks/data/dvfs-edge-hub-cloud.toml,
analytic model) and a zoo model:

1. energy vs latency cap (FreDDI latency-constrained): least edge energy for each
   ``--max-latency``, with the solver choosing frequencies, next to the same curve with the
   edge device locked to each of its frequencies;
2. latency vs energy cap (FreDDI energy-constrained): least latency for each cap on the
   edge device's energy;
3. privacy: least latency and edge energy when the first K layers must stay on the trusted
   edge device, K = 0..L;
4. carbon vs time of day (CADI): two grids with hourly carbon intensities
   (benchmarks/data/carbon_hourly.json, *illustrative* figures defined for this benchmark);
   per hour, the carbon-optimal plan under a latency cap next to the latency-optimal plan's
   carbon.

Writes benchmarks/results/tradeoffs.json and .png (``tradeoffs_quick.*`` with ``--quick``).
Usage::

    python benchmarks/tradeoffs.py [--model alexnet] [--points 12] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import result_paths, save_figure  # noqa: E402

SYSTEM = HERE / "data" / "dvfs-edge-hub-cloud.toml"
CARBON = HERE / "data" / "carbon_hourly.json"


def _summary(plan: Any) -> dict[str, Any]:
    est = plan.estimate
    return {"latency": est.latency, "edge_energy": sum(est.energy.get(d, 0.0) for d in EDGE),
            "energy": dict(est.energy), "carbon": est.carbon, "bottleneck": est.bottleneck,
            "stages": [s.to_json() for s in plan.stages],
            "frequencies": dict(plan.frequencies), "solve_seconds": plan.solve_seconds}


EDGE: tuple[str, ...] = ()


def main(argv: list[str] | None = None) -> int:
    global EDGE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--points", type=int, default=12, help="points per cap sweep")
    ap.add_argument("--quick", action="store_true", help="tiny_cnn, 5 points")
    ap.add_argument("--out", default=None, help="results folder")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.points = "tiny_cnn", 5

    import models
    from partitioner.analysis.costs import build_cost_table
    from partitioner.analysis.profiles import write_json_atomic
    from partitioner.analysis.system import load_system
    from partitioner.errors import InfeasibleError
    from partitioner.frontend import load_model
    from partitioner.ir import Objective
    from partitioner.solver import solve

    graph = load_model(models.build_model(args.model)).graph
    system = load_system(SYSTEM)
    EDGE = tuple(d.name for d in system.devices if d.device_class == "edge")
    edge = EDGE[0]
    table = build_cost_table(graph, system)
    t0 = time.perf_counter()
    fastest = solve(table, Objective("latency"))
    frugal = solve(table, Objective("energy"))
    t_lo, t_hi = fastest.estimate.latency, frugal.estimate.latency
    caps = np.geomspace(t_lo, max(t_hi, t_lo * 1.01) * 1.2, args.points)

    # 1. energy vs latency cap, free frequency and each frequency locked
    energy_vs_latency: dict[str, list[dict[str, Any]]] = {"solver": []}
    dev = system.device(edge)
    locked_tables = {}
    for f in dev.frequencies:
        locked = dict(table.frequencies)
        locked[edge] = (f,)
        locked_tables[f] = replace(table, frequencies=locked)
        energy_vs_latency[f] = []
    for cap in caps:
        for key, tab in [("solver", table), *locked_tables.items()]:
            try:
                plan = solve(tab, Objective("energy", max_latency=float(cap)))
                energy_vs_latency[key].append({"cap": float(cap), **_summary(plan)})
            except InfeasibleError as err:
                energy_vs_latency[key].append({"cap": float(cap), "infeasible": str(err)})

    # 2. latency vs energy cap on the edge device
    e_lo = frugal.estimate.energy.get(edge, 0.0)
    e_hi = max(fastest.estimate.energy.get(edge, 0.0), e_lo * 1.01)
    latency_vs_energy = []
    for cap in np.linspace(e_lo, e_hi * 1.1, args.points):
        try:
            plan = solve(table, Objective("latency", max_energy={edge: float(cap)}))
            latency_vs_energy.append({"cap": float(cap), **_summary(plan)})
        except InfeasibleError as err:
            latency_vs_energy.append({"cap": float(cap), "infeasible": str(err)})

    # 3. privacy: the first K layers on the trusted edge device
    privacy = []
    for k in range(len(graph.layers) + 1):
        tab = build_cost_table(graph, system, private=k)
        privacy.append({"k": k, "latency": _summary(solve(tab, Objective("latency"))),
                        "energy": _summary(solve(tab, Objective("energy")))})

    # 4. carbon vs time of day with two grids
    grids = json.loads(CARBON.read_text())
    lat_cap = 2.0 * t_lo
    carbon = []
    for hour in range(24):
        intensity = {d: g["hourly"][hour] for g in grids["grids"].values() for d in g["devices"]}
        devices = tuple(replace(d, carbon_intensity=intensity.get(d.name, d.carbon_intensity))
                        for d in system.devices)
        tab = replace(table, system=replace(system, devices=devices))
        green = solve(tab, Objective("carbon", max_latency=lat_cap))
        fast = solve(tab, Objective("latency"))
        carbon.append({"hour": hour, "intensity": intensity, "carbon_optimal": _summary(green),
                       "latency_optimal": _summary(fast)})
    elapsed = time.perf_counter() - t0

    doc = {"benchmark": "tradeoffs", "model": args.model, "layers": len(graph.layers),
           "system": str(SYSTEM.relative_to(HERE.parent)), "edge_device": edge,
           "fastest": _summary(fastest), "least_edge_energy": _summary(frugal),
           "energy_vs_latency_cap": energy_vs_latency, "latency_vs_energy_cap": latency_vs_energy,
           "privacy": privacy, "carbon_latency_cap": lat_cap, "carbon_by_hour": carbon,
           "carbon_note": grids["note"], "seconds": elapsed,
           "machine": {"cpu": platform.processor() or platform.machine(),
                       "cores": os.cpu_count(), "python": platform.python_version()}}
    json_path, png_path = result_paths("tradeoffs", args.quick, args.out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, doc)
    plot(doc, png_path)
    print(json.dumps({"json": str(json_path), "png": str(png_path),
                      "seconds": round(elapsed, 2)}))
    return 0


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    for key, pts in doc["energy_vs_latency_cap"].items():
        ok = [p for p in pts if "infeasible" not in p]
        style = "o-" if key == "solver" else ".--"
        label = "solver picks frequencies" if key == "solver" else f"edge locked at {key}"
        ax.plot([p["cap"] * 1e3 for p in ok], [p["edge_energy"] for p in ok], style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency cap (ms)")
    ax.set_ylabel("edge energy per inference (J)")
    ax.set_title("1. least edge energy under a latency cap")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ok = [p for p in doc["latency_vs_energy_cap"] if "infeasible" not in p]
    ax.plot([p["cap"] for p in ok], [p["latency"] * 1e3 for p in ok], "o-")
    ax.set_xlabel(f"energy cap of {doc['edge_device']} (J)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("2. least latency under an edge energy cap")
    ax = axes[1][0]
    ks = [p["k"] for p in doc["privacy"]]
    ax.plot(ks, [p["latency"]["latency"] * 1e3 for p in doc["privacy"]], "o-",
            label="min latency")
    ax.set_xlabel("K private layers on the trusted edge device")
    ax.set_ylabel("latency (ms)")
    ax2 = ax.twinx()
    ax2.plot(ks, [p["energy"]["edge_energy"] for p in doc["privacy"]], "s--", color="C1",
             label="min edge energy")
    ax2.set_ylabel("edge energy (J)")
    ax.set_title("3. privacy: cost of keeping K layers on the edge")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    ax = axes[1][1]
    hours = [p["hour"] for p in doc["carbon_by_hour"]]
    ax.plot(hours, [p["carbon_optimal"]["carbon"] / 1e3 for p in doc["carbon_by_hour"]], "o-",
            label=f"carbon-optimal (latency <= {doc['carbon_latency_cap'] * 1e3:.0f} ms)")
    ax.plot(hours, [p["latency_optimal"]["carbon"] / 1e3 for p in doc["carbon_by_hour"]], "s--",
            label="latency-optimal")
    ax.set_xlabel("hour of day (illustrative grids)")
    ax.set_ylabel("gCO2-eq per hour of service")
    ax.set_title("4. carbon over one hour of service vs time of day")
    ax.legend(fontsize=8)
    fig.suptitle(f"{doc['model']} on {Path(doc['system']).name} (analytic model)")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
