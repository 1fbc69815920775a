"""Early exit (DISS §6.4, Fig 6.4): latency with and without the exit vs bandwidth, and a
measured run on workers over a tc-shaped link.

Part 1 (analytic, DISS configuration C2): a Raspberry Pi 3B source/destination and a 1080
Ti cloud GPU with the published figures of ``partitioner/data/edge-hub-cloud.toml``
(Pi 3.62 GFLOP/s, 719 MB/s memory; 1080 Ti 11.3 TFLOP/s, 484.4 GB/s), their NIC caps
lifted so that the swept link is the bandwidth. For each bandwidth: the latency plan of
plain AlexNet (``alexnet``), and the expected-latency plan of BranchyNet AlexNet
(``branchy_alexnet``, exit after conv2, ``--exit exit1=0.656``) with its worst case, and
the share of FLOPs on the cloud.

Part 2 (measured, needs root): BranchyNet AlexNet split as DISS's low-bandwidth optimum
(conv1, conv2 and the branch on the edge worker; the rest on a cloud worker in network
namespace ``exits-<pid>`` behind a tc-shaped veth pair), the exit a softmax threshold set
on calibration inputs for a ~0.656 exit rate. Mean latency over a set of other inputs,
measured, against the expected latency the analytic model (device speeds calibrated on
this host, the link's rate) predicts from the measured exit rate:
``r * T_exit + (1 - r) * T_continue``.

Usage::

    python benchmarks/exits.py [--quick] [--no-measured] [--mbps 8] [--requests 40]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_figure, spawn_worker, stop_processes, write_results  # noqa: E402

P_EXIT = 0.656  # DISS §6.4
C2 = """
[[device]]
name = "pi3"
class = "edge"
flops = 3.62e9
memory_bandwidth = 719e6
network_bandwidth = 1e12
memory = 1.0e9
power = 3.7

[[device]]
name = "gpu1080ti"
class = "cloud"
flops = 11300e9
memory_bandwidth = 484.4e9
network_bandwidth = 1e12
memory = 11.0e9
power = 250.0

[[link]]
between = ["pi3", "gpu1080ti"]
bandwidth = 1e6

[application]
source = "pi3"
destination = "pi3"
"""


def _cloud_share(plan: Any, graph: Any, cloud: str) -> float:
    flops = [layer.flops for layer in graph.layers]
    on = sum(flops[k] for s in plan.stages if s.device == cloud
             for k in range(s.first, s.last + 1))
    return on / sum(flops)


def analytic(work: Path, bandwidths: list[float]) -> list[dict[str, Any]]:
    """DISS Fig 6.4 with the analytic model: one row per bandwidth."""
    import models
    from partitioner import pipeline
    from partitioner.analysis.system import load_system
    from partitioner.frontend import load_model

    system_path = work / "c2.toml"
    system_path.write_text(C2)
    base = load_system(system_path)
    plain_model = load_model(models.save_model("alexnet", work / "alexnet.onnx"))
    branchy = load_model(models.save_model("branchy_alexnet", work / "branchy.onnx"))
    names = [layer.name for layer in branchy.graph.layers]
    rows = []
    for bw in bandwidths:
        system = replace(base, links=tuple(replace(k, bandwidth=bw) for k in base.links))
        plain = pipeline.plan(plain_model, system).plan
        early = pipeline.plan(branchy, system, exits=[f"exit1={P_EXIT}"]).plan
        row = {"bandwidth": bw, "plain_latency": plain.estimate.latency,
               "exit_expected_latency": early.estimate.expected_latency,
               "exit_worst_latency": early.estimate.latency,
               "plain_cloud_flops_share": _cloud_share(plain, plain_model.graph, "gpu1080ti"),
               "exit_cloud_flops_share": _cloud_share(early, branchy.graph, "gpu1080ti"),
               "exit_pi_layers": [names[k] for s in early.stages if s.device == "pi3"
                                  for k in range(s.first, s.last + 1)]}
        rows.append(row)
        print(f"[exits] {bw:9.3g} B/s: plain {row['plain_latency'] * 1e3:9.2f} ms, exit "
              f"expected {row['exit_expected_latency'] * 1e3:9.2f} ms (worst "
              f"{row['exit_worst_latency'] * 1e3:9.2f}), cloud FLOPs "
              f"{row['plain_cloud_flops_share']:.2f} -> {row['exit_cloud_flops_share']:.2f}",
              file=sys.stderr)
    return rows


def measured(work: Path, model_name: str, image: int | None, mbps: float,
             requests: int) -> dict[str, Any]:
    """Part 2: the exit plan on two workers over a shaped link (see the module doc)."""
    import models
    from benchmarks.partition_sweep import (
        LinkNames,
        forced,
        host_addresses,
        link_names,
        shaped_link,
        whole_model_latency,
        write_system,
    )
    from partitioner import pipeline
    from partitioner.analysis.exits import price_chain
    from partitioner.backend import compile_bundle
    from runtime.executor import RemoteExecutor
    from stagebundle.exits import confidence

    pid = os.getpid()
    ips = link_names(pid, host_addresses())
    names = LinkNames(f"exits-{pid}", f"exe{pid}", f"exc{pid}", ips.edge_ip, ips.cloud_ip)
    threads = {"edge": 1, "cloud": 2}
    path = models.save_model(model_name, work / f"{model_name}.onnx",
                             **({"image_size": image} if image else {}))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    shape = sess.get_inputs()[0].shape
    rng = np.random.default_rng(11)
    calib = rng.standard_normal((24, *shape)).astype(np.float32)
    tests = rng.standard_normal((requests, *shape)).astype(np.float32)
    conf = [confidence(sess.run(["exit1"], {"input": x})[0]) for x in calib]
    threshold = float(np.quantile(conf, 1.0 - P_EXIT))
    np.savez(work / "calibration.npz", input=calib)
    whole = {d: whole_model_latency(path, t) for d, t in threads.items()}
    system_path = work / "host.toml"
    first = pipeline.plan(path, _dummy_system(work))  # the layer graph, for the FLOPs
    total = sum(layer.flops for layer in first.prepared.graph.layers)
    write_system(system_path, {d: total / whole[d] for d in threads}, mbps, 0.0)
    result = pipeline.plan(first.prepared, system_path, exits=[f"exit1@{threshold!r}"],
                           calibration=work / "calibration.npz")
    table = result.table
    head_pos = table.exits[0][0]
    # DISS's low-bandwidth optimum: everything up to the exit head on the edge
    placement = ["edge" if (p.kind != "layer" or p.index <= head_pos) else "cloud"
                 for p in table.positions]
    plan = pipeline.planner()(forced(table, placement))
    from partitioner.analysis.exits import route_exits
    from partitioner.analysis.routing import route_plan

    graph = result.prepared.graph
    plan = route_exits(graph, table, route_plan(graph, table, plan))
    bundle = compile_bundle(result.prepared, plan, result.system, work / "bundle", force=True,
                            table=table)
    outcomes = price_chain(table, plan.placement, plan.frequencies).outcomes
    t_exit, t_cont = outcomes[0][2], outcomes[1][2]
    token = work / "token"
    token.write_text("exits-" + os.urandom(8).hex())
    lat: list[float] = []
    exits: list[str | None] = []
    with shaped_link(mbps, 0.0, names):
        procs, hosts = [], {}
        try:
            for d in ("edge", "cloud"):
                ns, ip = (names.ns, names.cloud_ip) if d == "cloud" else (None, names.edge_ip)
                proc, addr = spawn_worker(bundle, d, work / f"{d}.port", threads=threads[d],
                                          listen=f"{ip}:0", timeout=120.0,
                                          extra=["--token-file", str(token)],
                                          prefix=["ip", "netns", "exec", ns] if ns else [])
                procs.append(proc)
                hosts[d] = addr
            with RemoteExecutor(bundle, hosts, token=token.read_text(),
                                listen=f"{names.edge_ip}:0", timeout=120.0) as ex:
                for x in tests[:3]:  # warm-up
                    ex.infer({"input": x})
                for x in tests:
                    ex.infer({"input": x})
                    lat.append(ex.records[-1]["latency"])
                    exits.append(ex.records[-1]["exit"])
        finally:
            stop_processes(procs, grace=10.0)
    rate = sum(e is not None for e in exits) / len(exits)
    left = [t for t, e in zip(lat, exits, strict=True) if e is not None]
    went = [t for t, e in zip(lat, exits, strict=True) if e is None]
    return {"model": model_name, "image_size": image, "link_mbps": mbps,
            "requests": requests, "threads": threads, "whole_model_latency": whole,
            "threshold": threshold, "calibration_probability": table.exits[0][1].probability,
            "stages": [s.to_json() for s in plan.stages],
            "measured_exit_rate": rate, "measured_mean": float(np.mean(lat)),
            "measured_exited_mean": float(np.mean(left)) if left else None,
            "measured_continued_mean": float(np.mean(went)) if went else None,
            "predicted_exit": t_exit, "predicted_continue": t_cont,
            "predicted_expected_at_measured_rate": rate * t_exit + (1 - rate) * t_cont,
            "planned_expected": plan.estimate.expected_latency, "latencies": lat,
            "exits": exits}


def _dummy_system(work: Path) -> Path:
    path = work / "dummy.toml"
    path.write_text(C2)
    return path


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["analytic"]
    bw = [r["bandwidth"] for r in rows]
    panels = 3 if doc.get("measured") else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.3))
    ax = axes[0]
    ax.loglog(bw, [r["plain_latency"] for r in rows], "s-", label="AlexNet, no exit")
    ax.loglog(bw, [r["exit_expected_latency"] for r in rows], "o-",
              label=f"BranchyNet AlexNet, expected (p={P_EXIT})")
    ax.loglog(bw, [r["exit_worst_latency"] for r in rows], "x--", alpha=0.6,
              label="BranchyNet AlexNet, worst case")
    ax.set_xlabel("Pi3 - 1080 Ti bandwidth (B/s)")
    ax.set_ylabel("latency (s)")
    ax.set_title("DISS Fig 6.4, C2, analytic")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.semilogx(bw, [r["plain_cloud_flops_share"] for r in rows], "s-", label="no exit")
    ax.semilogx(bw, [r["exit_cloud_flops_share"] for r in rows], "o-", label="with exit")
    ax.set_xlabel("Pi3 - 1080 Ti bandwidth (B/s)")
    ax.set_ylabel("share of FLOPs on the cloud")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if panels == 3:
        m = doc["measured"]
        ax = axes[2]
        lat = np.array(m["latencies"]) * 1e3
        left = np.array([e is not None for e in m["exits"]])
        ax.plot(np.flatnonzero(left), lat[left], "o", label="left at exit1")
        ax.plot(np.flatnonzero(~left), lat[~left], "s", label="continued")
        ax.axhline(m["measured_mean"] * 1e3, color="k", label="measured mean")
        ax.axhline(m["predicted_expected_at_measured_rate"] * 1e3, color="r", ls="--",
                   label=f"predicted at r={m['measured_exit_rate']:.2f}")
        ax.set_xlabel("request")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{m['model']}, workers over {m['link_mbps']:g} Mbit/s (tc)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="8 bandwidths; measured part on tiny_branchy at 224x224, 12 requests")
    ap.add_argument("--no-measured", action="store_true", help="only the analytic part")
    ap.add_argument("--mbps", type=float, default=8.0, help="shaped link rate (Mbit/s)")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--out", default=None, help="results folder")
    args = ap.parse_args()
    points = 8 if args.quick else 26
    # DISS's two quoted points (5e5 and 1e8 B/s) are always in the sweep
    bandwidths = sorted({float(b) for b in np.logspace(4, 9, points)} | {5e5, 1e8})
    for sig in (signal.SIGTERM, signal.SIGHUP):  # `finally` removes namespace and veth
        signal.signal(sig, lambda *_: sys.exit(128 + 15))
    work = Path(tempfile.mkdtemp(prefix="exits-"))
    doc: dict[str, Any] = {
        "benchmark": "exits", "quick": args.quick, "p_exit": P_EXIT,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version(),
                    "loaded": "shared host, about 8 agents on 2 cores"}}
    try:
        doc["analytic"] = analytic(work, bandwidths)
        can = os.geteuid() == 0 and shutil.which("tc") is not None
        if not args.no_measured and can:
            model, image, n = (("tiny_branchy", 224, 12) if args.quick
                               else ("branchy_alexnet", None, args.requests))
            doc["measured"] = measured(work, model, image, args.mbps, n)
            m = doc["measured"]
            print(f"[exits] measured: exit rate {m['measured_exit_rate']:.2f}, mean "
                  f"{m['measured_mean'] * 1e3:.1f} ms, predicted "
                  f"{m['predicted_expected_at_measured_rate'] * 1e3:.1f} ms",
                  file=sys.stderr)
        elif not args.no_measured:
            print("[exits] measured part skipped: needs root and tc", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_results("exits", args.quick, args.out, doc, plot)


if __name__ == "__main__":
    sys.exit(main())
