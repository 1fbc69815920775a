"""DISTREDGE's cases in simulation: our spatial plan against every baseline, one cost model.

Devices (published specifications; the analytic model runs at a *sustained* 30 % of the
FP32 peak, an assumption stated in benchmarks/README.md):

* Raspberry Pi 3B: 3.62 GFLOPS, 0.72 GB/s, 1 GB (the figures of
  ``partitioner/data/edge-hub-cloud.toml``);
* Jetson Nano: 236 GFLOPS FP32 (472 FP16, NVIDIA datasheet), 25.6 GB/s, 4 GB;
* Jetson TX2: 665 GFLOPS FP32 (1.33 TFLOPS FP16, NVIDIA datasheet), 59.7 GB/s, 8 GB;
* Jetson AGX Xavier: 1.41 TFLOPS FP32 (512 Volta cores at 1.377 GHz), 136.5 GB/s, 32 GB.

Groups (our reconstruction of DISTREDGE's DA/DB/DC: from homogeneous to heterogeneous):
DA = 4 x Nano, DB = 2 x Nano + 2 x TX2, DC = Pi 3 + Nano + TX2 + Xavier, and a 16-device
case (4 of each kind). The image comes from the group's first device (the source, also
the destination). Bandwidth groups: every device's link at 50 / 100 / 200 / 300 Mbit/s
(1 ms per message), ``mix`` (devices in turn at 50, 100, 200, 300 Mbit/s, a pair at the
slower of its two) and ``wifi`` (40 Mbit/s effective, 3 ms).

For each (model, group, bandwidth): the latency (one image in flight, DISTREDGE's metric)
of the best layer-wise plan, of our spatial plan and of each baseline (offload, equal,
proportional, coedge, aofl), all estimated by :mod:`partitioner.analysis.spatial`.

VGG-16 runs every bandwidth group on DA/DB/DC and 100 Mbit/s + mix on 16 devices;
ResNet-50 and the YOLO-style model (at 320 x 320) run 100, 300, mix and wifi on DA/DB/DC
(planning time: about a minute per ResNet-50 case on the loaded host; 16 devices would
take over ten).

Usage: ``python benchmarks/spatial.py [--quick]``; writes ``results/spatial[_quick].json``
and ``.png``. ``--quick``: VGG-16 only, groups DA and DC, 100 Mbit/s and mix.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import result_paths, save_figure  # noqa: E402
from partitioner import ir, pipeline  # noqa: E402
from partitioner.analysis.costs import build_cost_table  # noqa: E402
from partitioner.analysis.profiles import write_json_atomic  # noqa: E402
from partitioner.solver.spatial_baselines import BASELINES, baseline_plan  # noqa: E402

SUSTAINED = 0.30
#: name -> (peak FP32 FLOPS, memory bandwidth B/s, memory B)
DEVICES = {
    "pi3": (3.62e9, 0.719e9, 1e9),
    "nano": (236e9, 25.6e9, 4e9),
    "tx2": (665e9, 59.7e9, 8e9),
    "xavier": (1410e9, 136.5e9, 32e9),
}
GROUPS = {
    "DA": ["nano"] * 4,
    "DB": ["nano", "nano", "tx2", "tx2"],
    "DC": ["pi3", "nano", "tx2", "xavier"],
    "D16": ["pi3", "nano", "tx2", "xavier"] * 4,
}
MBIT = 1e6 / 8
BANDWIDTHS: dict[str, tuple[list[float], float]] = {
    "50": ([50 * MBIT], 1e-3), "100": ([100 * MBIT], 1e-3), "200": ([200 * MBIT], 1e-3),
    "300": ([300 * MBIT], 1e-3),
    "mix": ([50 * MBIT, 100 * MBIT, 200 * MBIT, 300 * MBIT], 1e-3),
    "wifi": ([40 * MBIT], 3e-3),
}
MODELS = {"vgg16": 224, "resnet50": 224, "yolo_small": 320}


def system(group: str, bandwidth: str) -> ir.System:
    """The devices of ``group``, every pair linked at the bandwidth group's rates."""
    rates, latency = BANDWIDTHS[bandwidth]
    devices = []
    for k, kind in enumerate(GROUPS[group]):
        flops, mem_bw, memory = DEVICES[kind]
        devices.append(ir.Device(f"{kind}{k}", "edge", flops * SUSTAINED, mem_bw,
                                 rates[k % len(rates)], memory=memory))
    links = tuple(ir.Link(a.name, b.name, min(a.network_bandwidth, b.network_bandwidth),
                          latency)
                  for i, a in enumerate(devices) for b in devices[i + 1:])
    first = devices[0].name
    return ir.System(tuple(devices), links, ir.Application(source=first, destination=first))


def run_case(prepared: Any, group: str, bandwidth: str) -> dict[str, Any]:
    sys_ = system(group, bandwidth)
    layerwise = pipeline.plan(prepared, sys_).plan
    t0 = time.perf_counter()
    ours = pipeline.plan(prepared, sys_, spatial=True).plan
    seconds = time.perf_counter() - t0
    table = build_cost_table(prepared.graph, sys_)
    base = {b: baseline_plan(prepared.graph, table, b).estimate.latency for b in BASELINES}
    best_base = min(base, key=lambda b: base[b])
    split = [s for s in ours.stages if s.parts]
    return {"group": group, "bandwidth": bandwidth,
            "layerwise": layerwise.estimate.latency, "ours": ours.estimate.latency,
            "baselines": base, "best_baseline": best_base,
            "speedup_vs_best_baseline": base[best_base] / ours.estimate.latency,
            "speedup_vs_layerwise": layerwise.estimate.latency / ours.estimate.latency,
            "split_stages": len(split),
            "max_parts": max((len(s.parts or ()) for s in split), default=1),
            "plan_seconds": seconds}


def _figure(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(m, c) for m, cases in doc["models"].items() for c in cases]
    names = ["layerwise", *BASELINES]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(rows)), 4.8))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        ys = [(c["layerwise"] if name == "layerwise" else c["baselines"][name]) / c["ours"]
              for _, c in rows]
        ax.bar([i + (k - len(names) / 2) * width for i in range(len(rows))], ys, width,
               label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), [f"{m}\n{c['group']} {c['bandwidth']}" for m, c in rows],
                  fontsize=6, rotation=90)
    ax.set_ylabel("latency / our spatial plan (>1: ours faster)")
    ax.set_title("DISTREDGE cases, analytic (sustained 30 % of peak FLOPS)", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    save_figure(fig, path)


def _bandwidths(model: str, group: str, chosen: list[str]) -> list[str]:
    """Every bandwidth group for VGG-16; four for the deeper models and for 16 devices
    (the planner takes about a minute per ResNet-50 case on the loaded host)."""
    if group == "D16":
        return [b for b in chosen if b in ("100", "mix")]
    if model == "vgg16":
        return chosen
    return [b for b in chosen if b in ("100", "300", "mix", "wifi")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="results folder")
    args = parser.parse_args(argv)
    import tempfile

    import onnx

    import models

    chosen = {"vgg16": 224} if args.quick else MODELS
    groups = ["DA", "DC"] if args.quick else ["DA", "DB", "DC", "D16"]
    bws = ["100", "mix"] if args.quick else list(BANDWIDTHS)
    doc: dict[str, Any] = {
        "host": "loaded shared host (about 8 agents on 2 cores); figures are analytic",
        "sustained_fraction_of_peak": SUSTAINED, "devices": DEVICES, "groups": GROUPS,
        "bandwidths": {k: {"bytes_per_s": v[0], "latency_s": v[1]}
                       for k, v in BANDWIDTHS.items()},
        "models": {}}
    with tempfile.TemporaryDirectory(prefix="spatial-bench-") as tmp:
        for name, size in chosen.items():
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(models.build_model(name, image_size=size), path)
            prepared = pipeline._prepare(path, None, "major", None)
            cases = []
            for group in groups:
                if group == "D16" and name != "vgg16":
                    continue  # planning time grows with devices^2 (README says so)
                for bw in _bandwidths(name, group, bws):
                    case = run_case(prepared, group, bw)
                    print(f"{name} {group} {bw}: ours {case['ours'] * 1e3:.1f} ms, layer-wise "
                          f"{case['layerwise'] * 1e3:.1f} ms, best baseline "
                          f"{case['best_baseline']} "
                          f"{case['baselines'][case['best_baseline']] * 1e3:.1f} ms "
                          f"(x{case['speedup_vs_best_baseline']:.2f}), planned in "
                          f"{case['plan_seconds']:.1f} s", flush=True)
                    cases.append(case)
            doc["models"][name] = cases
    json_path, png_path = result_paths("spatial", args.quick, args.out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, doc)
    _figure(doc, png_path)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
