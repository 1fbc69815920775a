"""Forwarded against direct sends: bytes per link, the estimate and measured latency.

For ``yolo_small`` (models zoo) and the FPN detector of ``tests/test_e2e_torch.py``
(``TinyDetector``, exported from PyTorch), a 3-device plan (pi3 -> nano -> gpu1080ti on
``partitioner/data/edge-hub-cloud.toml``) is cut where a skip tensor crosses a stage
that does not use it: of every split into three stages of at least two layers, the one
whose forwarded sends carry the most skip bytes (model outputs left aside) that direct
sends would not. Its bundle is
compiled with routing mode ``forwarded`` (schema 1's chain: each stage relays what later
stages need), ``direct`` (each tensor straight to each reading device, once per device)
and ``auto`` (the default: direct unless relaying is cheaper on the system's links), and
reported per mode:

* bytes per link (``explain``'s links: every network send between two devices),
* the estimate (``route_plan``: :func:`partitioner.analysis.estimate.evaluate` with the
  routed messages; the analytic model of the system file),
* with ``--measure``: the latency measured with real workers (one ``runtime serve`` per
  device on loopback, :class:`runtime.executor.RemoteExecutor`), median of
  ``--requests``. Loopback links are not the system file's links, so the measured gap is
  the relaying work (an extra hop's framing and copies), not the link time the estimate
  prices; it needs a runtime that obeys the manifest's sends.

Usage::

    python benchmarks/direct_sends.py [--quick] [--measure] [--requests N] [--out DIR]

``--quick`` uses 160x160 yolo inputs and 5 requests and writes ``direct_sends_quick.*``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
SYSTEM = ROOT / "partitioner" / "data" / "edge-hub-cloud.toml"
DEVICES = ("pi3", "nano", "gpu1080ti")
MODES = ("forwarded", "direct", "auto")  # auto: direct unless relaying is cheaper


def load(name: str, work: Path, quick: bool) -> Any:
    """The prepared model: a zoo model, or the FPN detector exported from PyTorch."""
    from partitioner.frontend import load_model

    if name == "fpn_detector":
        import torch

        from tests.test_e2e_torch import TinyDetector

        torch.manual_seed(1)
        module = TinyDetector().eval()
        return load_model(module, example_inputs=(torch.randn(1, 3, 64, 64),))
    import models

    size = {"image_size": 160} if quick else {}
    return load_model(models.save_model(name, work / f"{name}.onnx", **size))


def three_stage_plans(n: int) -> list[Any]:
    from partitioner.ir import Estimate, Plan, Stage

    plans = []
    for a in range(2, n - 3):
        for b in range(a + 2, n - 1):
            stages = (Stage(DEVICES[0], None, 0, a - 1), Stage(DEVICES[1], None, a, b - 1),
                      Stage(DEVICES[2], None, b, n - 1))
            plans.append(Plan("feasible", "latency", stages, Estimate(0, 0, 0, 0, 0), 0.0))
    return plans


def relayed_bytes(graph: Any, plan: Any) -> int:
    """Bytes of skip tensors (not model outputs) that the forwarded plan sends over links
    and the direct one does not."""
    from partitioner.analysis.routing import messages, route_plan

    outputs = {t.name for t in graph.outputs}

    def net(mode: str) -> int:
        p = route_plan(graph, None, plan, mode=mode)
        return sum(graph.tensors[n].nbytes for m in messages(graph, p, p.routes)
                   if m.sender_device != m.receiver_device
                   for n, _ in m.pieces if n not in outputs)
    return net("forwarded") - net("direct")


def measure(bundle: Path, graph: Any, requests: int, work: Path) -> dict[str, float]:
    from benchmarks.partition_sweep import start_worker
    from runtime.executor import RemoteExecutor

    token = work / "token"
    token.write_text("direct-" + os.urandom(8).hex())
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in graph.inputs}
    procs, hosts = [], {}
    try:
        for d in DEVICES:
            proc, addr = start_worker(bundle, d, "127.0.0.1:0", token, work, 1, None, False)
            procs.append(proc)
            hosts[d] = addr
        ex = RemoteExecutor(bundle, hosts, token=token.read_text().strip(),
                            listen="127.0.0.1:0", timeout=120.0)
        try:
            for _ in range(3):
                ex.infer(feeds)
            lat = []
            for _ in range(requests):
                ex.infer(feeds)
                lat.append(ex.records[-1]["latency"])
        finally:
            ex.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
    return {"median": statistics.median(lat), "mean": statistics.fmean(lat),
            "min": min(lat), "max": max(lat)}


def systems() -> dict[str, Any]:
    """The example system, and the same with every link at 1 MB/s (its pi3-gpu1080ti link
    is 100 kB/s, so relaying through the nano is cheaper there)."""
    from dataclasses import replace

    from partitioner.analysis.system import load_system

    example = load_system(SYSTEM)
    uniform = replace(example, links=tuple(replace(link, bandwidth=1e6)
                                           for link in example.links))
    return {"example": example, "uniform_1MBps": uniform}


def run_model(name: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from partitioner.analysis.costs import build_cost_table
    from partitioner.analysis.routing import route_plan
    from partitioner.backend import compile_bundle, load_bundle
    from partitioner.backend.explain import explain

    prepared = load(name, work, args.quick)
    graph = prepared.graph
    plan = max(three_stage_plans(len(graph.layers)), key=lambda p: relayed_bytes(graph, p))
    rows = []
    for sys_name, system in systems().items():
        table = build_cost_table(graph, system)
        row: dict[str, Any] = {"model": name, "system": sys_name, "layers": len(graph.layers),
                               "stages": [[s.device, s.first, s.last] for s in plan.stages]}
        for mode in MODES:
            routed = route_plan(graph, table, plan, mode=mode)
            out = compile_bundle(prepared, routed, system, work / f"{name}-{mode}",
                                 table=table, force=True)
            doc = explain(load_bundle(out))
            est = routed.estimate
            row[mode] = {
                "links": {f"{x['from']}->{x['to']}": x["bytes"] for x in doc["links"]},
                "network_bytes": sum(x["bytes"] for x in doc["links"]),
                "relayed": sorted({n for s in doc["stages"] for n in s["forwarded"]}),
                "estimate": {"latency": est.latency, "communication": est.communication,
                             "compute": est.compute, "bottleneck": est.bottleneck,
                             "energy": dict(est.energy)}}
            if args.measure and sys_name == "example":
                row[mode]["measured"] = measure(out, graph, args.requests, work)
            print(f"[direct_sends] {name} {sys_name} {mode:>9}: "
                  f"{row[mode]['network_bytes'] / 1e3:9.1f} kB over links, estimate "
                  f"{est.latency * 1e3:9.2f} ms"
                  + (f", measured {row[mode]['measured']['median'] * 1e3:.2f} ms"
                     if "measured" in row[mode] else ""), file=sys.stderr)
        rows.append(row)
    return rows


def draw(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    panels = 3 if doc["measured"] else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels, 4.0))
    x = np.arange(len(rows))
    w = 0.27
    style = {"forwarded": ("white", "///"), "direct": ("tab:blue", None),
             "auto": ("tab:green", None)}
    series = [("network_bytes", "kB over links per request", 1e-3),
              ("estimate", "estimated latency (ms)", 1e3)]
    if doc["measured"]:
        series.append(("measured", "measured latency, loopback (ms)", 1e3))
    for ax, (key, label, scale) in zip(axes, series, strict=True):
        for k, mode in enumerate(MODES):
            vals = []
            for r in rows:
                v = r[mode].get(key)
                if isinstance(v, dict):
                    v = v["latency"] if key == "estimate" else v["median"]
                vals.append(np.nan if v is None else v * scale)
            bars = ax.bar(x + (k - 1) * w, vals, w, label=mode, color=style[mode][0],
                          hatch=style[mode][1], edgecolor="black")
            for b, v in zip(bars, vals, strict=True):
                if np.isnan(v):
                    continue
                ax.text(b.get_x() + b.get_width() / 2, b.get_height(),
                        f"{v:.0f}" if v >= 100 else f"{v:.3g}", ha="center", va="bottom",
                        fontsize=6, rotation=90)
        ax.set_xticks(x, [f"{r['model']}\n{r['system']}" for r in rows], fontsize=7)
        ax.set_title(label + " (log scale)", fontsize=9)
        ax.set_yscale("log")
        ax.margins(y=0.25)
    axes[0].legend(fontsize=8)
    fig.suptitle("forwarded vs direct sends, 3 devices (pi3 -> nano -> gpu1080ti)"
                 + (" — LOADED host" if doc["measured"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--measure", action="store_true",
                    help="also measure with real workers on loopback (needs a runtime that "
                         "obeys the manifest's sends)")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--models", default="yolo_small,fpn_detector")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    if args.quick:
        args.requests = 5
    work = Path(tempfile.mkdtemp(prefix="direct-sends-"))
    try:
        rows = [r for m in args.models.split(",") for r in run_model(m, args, work)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"benchmark": "direct_sends", "system": str(SYSTEM.relative_to(ROOT)),
           "quick": args.quick, "measured": args.measure, "requests": args.requests,
           "machine": {"cpu": platform.processor() or platform.machine(),
                       "cores": os.cpu_count(), "python": platform.python_version(),
                       "note": "shared host, loaded by other jobs"},
           "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "direct_sends_quick" if args.quick else "direct_sends"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    draw(doc, out / f"{stem}.png")
    print(f"wrote {out / stem}.json and .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
