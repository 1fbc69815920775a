"""``partitioner plan MODEL --system SYSTEM [options]``: choose a device for every layer.

Runs :func:`partitioner.pipeline.plan` (system file -> model -> profiles -> cost table ->
solve). Prints a table of stages and the estimate, or with ``--json`` the plan
document of docs/INTERFACES.md. An infeasible problem exits with 2 and the reason on
stderr (with ``--json``, stdout still holds one document: ``{"status": "infeasible",
"message": ...}``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from partitioner.cli.common import (
    add_plan_options,
    plan_from_args,
    print_json,
)
from partitioner.errors import InfeasibleError

__all__ = ["add_arguments", "run", "format_plan", "stage_times"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_plan_options(parser)
    parser.add_argument("--weights", default=None, metavar="T,E",
                        help="weights of normalised latency and edge energy "
                             "(weighted objective; same as --latency-weight/--energy-weight)")
    parser.add_argument("--solver", default="CBC", metavar="NAME",
                        help="python-mip solver (default CBC)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")


def stage_times(table: Any, plan: Any) -> list[float]:
    """Seconds each stage spends computing: its bundles' time, hidden weight time off."""
    from partitioner.solver import canonical_bundles

    times = [0.0] * len(plan.stages)
    layer_stage = {}
    for s_idx, st in enumerate(plan.stages):
        for layer in range(st.first, st.last + 1):
            layer_stage[layer] = s_idx
    for b in canonical_bundles(table, plan.placement):
        layer = table.positions[b.first].layer
        if layer is None or plan.stages[layer_stage[layer]].parts:
            continue  # a split stage's parts: their rows and devices are listed below it
        cost = table.bundles[b.first, b.last, b.device, plan.frequencies.get(b.device)]
        hidden = cost.hidden if (table.preload and b.starts_run) else 0.0
        times[layer_stage[layer]] += cost.time - hidden
    return times


def _fmt_s(x: float) -> str:
    return f"{x * 1e3:.3f} ms" if abs(x) < 1 else f"{x:.3f} s"


def format_plan(plan: Any, table: Any, layer_names: list[str]) -> str:
    """The human report: stages, pseudo layers and the estimate breakdown."""
    rows = [("stage", "device", "frequency", "layers", "names", "time")]
    for k, (st, t) in enumerate(zip(plan.stages, stage_times(table, plan), strict=True)):
        first, last = layer_names[st.first], layer_names[st.last]
        names = first if st.first == st.last else f"{first} .. {last}"
        rows.append((str(k), st.device or "parts", "-" if st.frequency is None else
                     st.frequency, f"{st.first}..{st.last}", names,
                     _fmt_s(t) if not st.parts else "parallel"))
        for j, p in enumerate(st.parts or ()):
            rows.append((f"{k}.{j}", p.device, "-" if p.frequency is None else p.frequency,
                         "", f"rows {p.rows[0]}..{p.rows[1]}", ""))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [f"plan: {plan.status}, objective {plan.objective}, solved in "
             f"{plan.solve_seconds:.3f} s"]
    for i, r in enumerate(rows):
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if plan.pseudo:
        lines.append("pseudo layers: " + ", ".join(f"{k} on {v}" for k, v in plan.pseudo.items()))
    e = plan.estimate
    lines.append(f"latency {_fmt_s(e.latency)} = compute {_fmt_s(e.compute)} + communication "
                 f"{_fmt_s(e.communication)} + weight loading {_fmt_s(e.weight_loading)}")
    if e.expected_latency is not None:  # early exits: latency above is the worst case
        heads = ", ".join(f"{h.output} after stage {i} (p={h.probability:.3g})"
                          for i, h in plan.exits)
        lines.append(f"expected latency {_fmt_s(e.expected_latency)} with exits {heads}; "
                     "latency is the worst case")
    rate = 1.0 / e.bottleneck if e.bottleneck > 0 else float("inf")
    lines.append(f"bottleneck {_fmt_s(e.bottleneck)} ({rate:.3g} inferences/s pipelined)")
    if any(e.energy.values()):
        lines.append("energy per inference: " + ", ".join(
            f"{d} {j:.4g} J" for d, j in e.energy.items()))
    if e.carbon is not None and plan.objective == "carbon":
        lines.append(f"carbon {e.carbon:.4g} mgCO2-eq over {e.inferences:.4g} inferences")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        made = plan_from_args(args)
    except InfeasibleError as err:
        if args.json:
            print_json({"status": "infeasible", "message": str(err)})
        print(f"partitioner plan: error: {err}", file=sys.stderr)
        return err.exit_code
    plan, table, prepared = made.plan, made.table, made.prepared
    if args.json:
        print_json(plan.to_json())
    else:
        print(format_plan(plan, table, [layer.name for layer in prepared.graph.layers]))
    return 0
