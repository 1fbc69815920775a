"""Partition-point sweep: estimated vs measured latency of every single cut (issue 6.1).

The plot the published work draws (DISS ch. 4), now measured. A two-device system:

* ``edge``: a ``runtime serve`` worker in this network namespace, ONNX Runtime limited to
  1 intra-op thread;
* ``cloud``: a worker in a network namespace this script creates (``ip netns``), 2 threads;
* the link: a veth pair shaped with ``tc`` token-bucket filters to ``--mbps`` in each
  direction (plus optional ``--delay-ms`` with netem).

For every cut ``k`` (layers ``0..k-1`` on the edge, ``k..L-1`` in the cloud; ``k = 0`` sends
the input to the cloud, ``k = L`` runs everything on the edge) it compiles the bundle, starts
the workers, runs ``--requests`` inferences (the executor sits on the edge: it is the source
and the destination) and records the mean latency, next to two estimates of the same plan:

* *analytic*: SPEC §3 with each device's FLOP/s calibrated once on this host (total FLOPs
  over the whole model's ONNX Runtime latency at that thread count) and the link bandwidth;
* *profiled*: bundles measured by the profiler (``partitioner profile``) at each thread count.

Needs root (``ip netns``, ``tc``). Usage::

    sudo python benchmarks/partition_sweep.py --model alexnet --mbps 50
    sudo python benchmarks/partition_sweep.py --quick   # tiny_cnn at 224x224, 5 requests

Each run has its own namespace, veth pair and /30 subnet (named after its pid), removed
when it ends, so two runs never collide. Writes ``results/partition_sweep.json`` and
``.png`` (``partition_sweep_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    result_paths,
    save_figure,
    spawn_worker,
    stop_processes,
)

QUICK_MODEL, QUICK_IMAGE = "tiny_cnn", 224  # cut tensors of 0.4-0.8 MB: well above the
# tc burst (64 kB), so the shaped link decides the cut (at 32x32 they fit in one burst)


@dataclass(frozen=True)
class LinkNames:
    """Names of one run's namespace, veth pair and addresses (unique per process)."""

    ns: str
    edge_if: str
    cloud_if: str
    edge_ip: str
    cloud_ip: str


def link_names(pid: int, taken: Iterable[str] = ()) -> LinkNames:
    """Names for the run of process ``pid``: two runs never share a namespace or device.

    The /30 subnet in 10.231.0.0/16 is chosen from the pid, skipping addresses in
    ``taken`` (those already on this host). Interface names stay within 15 characters.
    """
    used = set(taken)
    for step in range(16384):
        block = ((pid + step) % 16384) * 4
        edge_ip = f"10.231.{block >> 8}.{(block & 255) + 1}"
        cloud_ip = f"10.231.{block >> 8}.{(block & 255) + 2}"
        if edge_ip not in used and cloud_ip not in used:
            return LinkNames(f"psweep-{pid}", f"pswe{pid}", f"pswc{pid}", edge_ip, cloud_ip)
    raise RuntimeError("no free /30 subnet in 10.231.0.0/16")


def host_addresses() -> set[str]:
    """IPv4 addresses on this host's interfaces (``ip -o -4 addr``)."""
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True,
                         check=False).stdout
    return {f.split("/")[0] for line in out.splitlines() for f in line.split()[3:4]}


def sh(*cmd: str, ns: str | None = None) -> None:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    subprocess.run(full, check=True, capture_output=True)


@contextlib.contextmanager
def shaped_link(mbps: float, delay_ms: float, names: LinkNames) -> Iterator[LinkNames]:
    """A veth pair into namespace ``names.ns``, each direction shaped to ``mbps`` (tc tbf).

    Everything it creates is removed on the way out, whatever ends the run.
    """
    sh("ip", "netns", "add", names.ns)  # fails if it exists: never take over another run's
    try:
        sh("ip", "link", "add", names.edge_if, "type", "veth", "peer", "name", names.cloud_if)
        sh("ip", "link", "set", names.cloud_if, "netns", names.ns)
        sh("ip", "addr", "add", f"{names.edge_ip}/30", "dev", names.edge_if)
        sh("ip", "link", "set", names.edge_if, "up")
        sh("ip", "addr", "add", f"{names.cloud_ip}/30", "dev", names.cloud_if, ns=names.ns)
        sh("ip", "link", "set", names.cloud_if, "up", ns=names.ns)
        sh("ip", "link", "set", "lo", "up", ns=names.ns)
        rate = f"{mbps}mbit"
        for dev, ns in ((names.edge_if, None), (names.cloud_if, names.ns)):
            if delay_ms > 0:
                sh("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay",
                   f"{delay_ms}ms", ns=ns)
                sh("tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "tbf",
                   "rate", rate, "burst", "64kb", "latency", "2s", ns=ns)
            else:
                sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
                   "64kb", "latency", "2s", ns=ns)
        yield names
    finally:
        subprocess.run(["ip", "link", "del", names.edge_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", names.ns], capture_output=True)


def whole_model_latency(path: Path, threads: int, runs: int = 20) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in i.shape])
             .astype(np.float32) for i in sess.get_inputs()}
    for _ in range(3):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def write_system(path: Path, flops: dict[str, float], mbps: float, delay_ms: float) -> None:
    bw = mbps * 1e6 / 8
    lines = []
    for name, cls in (("edge", "edge"), ("cloud", "cloud")):
        lines += ["[[device]]", f'name = "{name}"', f'class = "{cls}"',
                  f"flops = {flops[name]:.6e}", "memory_bandwidth = 2.0e10",
                  f"network_bandwidth = {bw:.6e}", ""]
    lines += ["[[link]]", 'between = ["edge", "cloud"]', f"bandwidth = {bw:.6e}",
              f"latency = {delay_ms / 1e3:.6f}", "", "[application]", 'source = "edge"',
              'destination = "edge"', ""]
    path.write_text("\n".join(lines))


def forced(table: Any, placement: list[str]) -> Any:
    """The cost table with every position pinned to ``placement`` (to price one cut)."""
    positions = tuple(replace(p, allowed=(d,)) for p, d in zip(table.positions, placement,
                                                                strict=True))
    return replace(table, positions=positions)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--mbps", type=float, default=50.0, help="link rate each way (Mbit/s)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way link delay")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--profile-runs", type=int, default=20)
    ap.add_argument("--spin", action="store_true",
                    help="workers let idle ONNX Runtime threads spin (runtime serve --spin)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="input size of the zoo model (default: the model's own)")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_MODEL} at {QUICK_IMAGE}x{QUICK_IMAGE}, 5 requests, 10 runs")
    ap.add_argument("--out", default=None, help="results folder")
    args = ap.parse_args()
    if args.quick:
        args.model, args.requests, args.profile_runs = QUICK_MODEL, 5, 10
        args.image_size = args.image_size or QUICK_IMAGE
    if os.geteuid() != 0 or not shutil.which("tc"):
        print("partition_sweep: needs root and tc (ip netns, tc qdisc)", file=sys.stderr)
        return 2
    # SIGTERM/SIGHUP end the run through `finally`: the namespace and veth go with it
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(128 + 15))
    names = link_names(os.getpid(), host_addresses())

    import models
    from partitioner.analysis.costs import build_cost_table
    from partitioner.analysis.profiles import load_profile, write_json_atomic
    from partitioner.analysis.system import load_system
    from partitioner.backend import compile_bundle
    from partitioner.frontend import load_model
    from partitioner.solver import solve
    from runtime.executor import RemoteExecutor

    threads = {"edge": 1, "cloud": 2}
    work = Path(tempfile.mkdtemp(prefix="psweep-"))
    try:
        model = work / f"{args.model}.onnx"
        models.save_model(args.model, model, **({"image_size": args.image_size}
                                                 if args.image_size else {}))
        prepared = load_model(model)
        graph = prepared.graph
        n = len(graph.layers)
        total_flops = sum(layer.flops for layer in graph.layers)
        whole = {d: whole_model_latency(model, t) for d, t in threads.items()}
        flops = {d: total_flops / whole[d] for d in threads}
        system_path = work / "system.toml"
        write_system(system_path, flops, args.mbps, args.delay_ms)
        system = load_system(system_path)
        profiles = []
        for d, t in threads.items():
            out = work / f"{d}.profile.json"
            print(f"[sweep] profiling {d} ({t} thread(s), {n * (n + 1) // 2} bundles)",
                  file=sys.stderr)
            subprocess.run([sys.executable, "-m", "partitioner", "profile", str(model),
                            "--device", d, "--threads", str(t), "--runs",
                            str(args.profile_runs), "--warmup", "3", "-o", str(out),
                            "--quiet"], check=True)
            profiles.append(load_profile(out, graph))
        analytic = build_cost_table(graph, system, preload=False)
        profiled = build_cost_table(graph, system, profiles=profiles, preload=False)
        token = work / "token"
        token.write_text("sweep-" + os.urandom(8).hex())
        rng = np.random.default_rng(0)
        inputs = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in graph.inputs}
        rows = []
        with shaped_link(args.mbps, args.delay_ms, names):
            for k in range(n + 1):
                placement = []
                for p in analytic.positions:
                    if p.kind == "layer":
                        placement.append("edge" if p.layer < k else "cloud")
                    else:
                        placement.append("edge")
                est_a = solve(forced(analytic, placement))
                est_p = solve(forced(profiled, placement))
                bundle = work / f"bundle{k}"
                compile_bundle(prepared, est_a, system, bundle, force=True)
                devices = sorted({s.device for s in est_a.stages})
                procs, hosts = [], {}
                try:
                    for d in devices:
                        ns, ip = ((names.ns, names.cloud_ip) if d == "cloud"
                                  else (None, names.edge_ip))
                        proc, addr = spawn_worker(
                            bundle, d, work / f"{d}.port.json", threads=threads[d],
                            listen=f"{ip}:0", timeout=60.0,
                            extra=["--token-file", str(token)] + (["--spin"] if args.spin
                                                                  else []),
                            prefix=["ip", "netns", "exec", ns] if ns else [])
                        procs.append(proc)
                        hosts[d] = addr
                    ex = RemoteExecutor(bundle, hosts, token=token.read_text().strip(),
                                        listen=f"{names.edge_ip}:0", timeout=120.0)
                    try:
                        for _ in range(3):
                            ex.infer(inputs)
                        lat = []
                        for _ in range(args.requests):
                            ex.infer(inputs)
                            lat.append(ex.records[-1]["latency"])
                    finally:
                        ex.close()
                finally:
                    stop_processes(procs, grace=10.0)
                shutil.rmtree(bundle, ignore_errors=True)
                cut = graph.cuts[k].nbytes  # cuts[k]: live tensors before layer k
                row = {"cut": k, "edge_layers": k, "cut_bytes": cut,
                       "analytic": est_a.estimate.latency, "profiled": est_p.estimate.latency,
                       "measured_mean": float(np.mean(lat)),
                       "measured_std": float(np.std(lat)),
                       "measured_p50": float(np.median(lat))}
                rows.append(row)
                print(f"[sweep] cut {k:>2}: analytic {row['analytic'] * 1e3:8.2f} ms  "
                      f"profiled {row['profiled'] * 1e3:8.2f} ms  measured "
                      f"{row['measured_mean'] * 1e3:8.2f} ms", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"benchmark": "partition_sweep", "quick": args.quick, "model": args.model,
           "image_size": args.image_size, "layers": n,
           "layer_names": [layer.name for layer in graph.layers],
           "link_mbps": args.mbps, "spin": args.spin, "delay_ms": args.delay_ms,
           "requests": args.requests,
           "threads": threads, "calibrated_flops": flops, "whole_model_latency": whole,
           "machine": {"cpu": platform.processor() or platform.machine(),
                       "cores": os.cpu_count(), "python": platform.python_version()},
           "rows": rows}
    json_path, png_path = result_paths("partition_sweep", args.quick, args.out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, doc)
    plot(doc, png_path)
    print(json.dumps({"json": str(json_path), "png": str(png_path)}))
    return 0


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    k = [r["cut"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(k, [r["analytic"] * 1e3 for r in rows], "s--", label="estimated (analytic)")
    ax.plot(k, [r["profiled"] * 1e3 for r in rows], "o--", label="estimated (profiled)")
    ax.errorbar(k, [r["measured_mean"] * 1e3 for r in rows],
                yerr=[r["measured_std"] * 1e3 for r in rows], fmt="^-", capsize=3,
                label="measured (2 workers, tc-shaped veth)")
    ax.set_xlabel("layers on the edge (cut after layer k-1; 0 = all in the cloud)")
    ax.set_ylabel("latency per inference (ms)")
    ax.set_title(f"{doc['model']}: edge (1 thread) -> cloud (2 threads) over "
                 f"{doc['link_mbps']:g} Mbit/s")
    ax.set_xticks(k)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
