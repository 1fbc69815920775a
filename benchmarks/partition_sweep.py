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
    python benchmarks/partition_sweep.py --quick        # tiny_cnn, 5 requests per cut
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

NS = "psweep-cloud"
EDGE_IF, CLOUD_IF = "psw-edge", "psw-cloud"
EDGE_IP, CLOUD_IP = "10.231.0.1", "10.231.0.2"
RESULTS = Path(__file__).with_name("results")


def sh(*cmd: str, ns: str | None = None) -> None:
    full = (["ip", "netns", "exec", ns] if ns else []) + list(cmd)
    subprocess.run(full, check=True, capture_output=True)


@contextlib.contextmanager
def shaped_link(mbps: float, delay_ms: float) -> Iterator[None]:
    """A veth pair into namespace NS, each direction shaped to ``mbps`` (tc tbf)."""
    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "link", "add", EDGE_IF, "type", "veth", "peer", "name", CLOUD_IF)
        sh("ip", "link", "set", CLOUD_IF, "netns", NS)
        sh("ip", "addr", "add", f"{EDGE_IP}/30", "dev", EDGE_IF)
        sh("ip", "link", "set", EDGE_IF, "up")
        sh("ip", "addr", "add", f"{CLOUD_IP}/30", "dev", CLOUD_IF, ns=NS)
        sh("ip", "link", "set", CLOUD_IF, "up", ns=NS)
        sh("ip", "link", "set", "lo", "up", ns=NS)
        rate = f"{mbps}mbit"
        for dev, ns in ((EDGE_IF, None), (CLOUD_IF, NS)):
            if delay_ms > 0:
                sh("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay",
                   f"{delay_ms}ms", ns=ns)
                sh("tc", "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "tbf",
                   "rate", rate, "burst", "64kb", "latency", "2s", ns=ns)
            else:
                sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
                   "64kb", "latency", "2s", ns=ns)
        yield
    finally:
        subprocess.run(["ip", "link", "del", EDGE_IF], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


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


def start_worker(bundle: Path, device: str, listen: str, token: Path, work: Path,
                 threads: int, ns: str | None, spin: bool) -> tuple[subprocess.Popen[bytes], str]:
    port_file = work / f"{device}.port.json"
    port_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "runtime.cli", "serve", str(bundle), "--device", device,
           "--listen", listen, "--token-file", str(token), "--threads", str(threads),
           "--port-file", str(port_file), "--quiet"] + (["--spin"] if spin else [])
    if ns:
        cmd = ["ip", "netns", "exec", ns] + cmd
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"worker {device} did not start")
        time.sleep(0.05)
    info = json.loads(port_file.read_text())
    return proc, f"{info['host']}:{info['port']}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="alexnet")
    ap.add_argument("--mbps", type=float, default=50.0, help="link rate each way (Mbit/s)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way link delay")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--profile-runs", type=int, default=20)
    ap.add_argument("--spin", action="store_true",
                    help="workers let idle ONNX Runtime threads spin (runtime serve --spin)")
    ap.add_argument("--quick", action="store_true", help="tiny_cnn, 5 requests, 10 runs")
    ap.add_argument("--out", default=str(RESULTS / "partition_sweep"))
    args = ap.parse_args()
    if args.quick:
        args.model, args.requests, args.profile_runs = "tiny_cnn", 5, 10
    if os.geteuid() != 0 or not shutil.which("tc"):
        print("partition_sweep: needs root and tc (ip netns, tc qdisc)", file=sys.stderr)
        return 2

    import models
    from partitioner.analysis.costs import build_cost_table
    from partitioner.analysis.profiles import load_profile
    from partitioner.analysis.system import load_system
    from partitioner.backend import compile_bundle
    from partitioner.frontend import load_model
    from partitioner.solver import solve
    from runtime.executor import RemoteExecutor

    threads = {"edge": 1, "cloud": 2}
    work = Path(tempfile.mkdtemp(prefix="psweep-"))
    try:
        model = work / f"{args.model}.onnx"
        models.save_model(args.model, model)
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
        with shaped_link(args.mbps, args.delay_ms):
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
                        ns, ip = (NS, CLOUD_IP) if d == "cloud" else (None, EDGE_IP)
                        proc, addr = start_worker(bundle, d, f"{ip}:0", token, work,
                                                  threads[d], ns, args.spin)
                        procs.append(proc)
                        hosts[d] = addr
                    ex = RemoteExecutor(bundle, hosts, token=token.read_text().strip(),
                                        listen=f"{EDGE_IP}:0", timeout=120.0)
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
                    for p in procs:
                        p.terminate()
                        p.wait(timeout=10)
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
    doc = {"benchmark": "partition_sweep", "model": args.model, "layers": n,
           "layer_names": [layer.name for layer in graph.layers],
           "link_mbps": args.mbps, "spin": args.spin, "delay_ms": args.delay_ms,
           "requests": args.requests,
           "threads": threads, "calibrated_flops": flops, "whole_model_latency": whole,
           "machine": {"cpu": platform.processor() or platform.machine(),
                       "cores": os.cpu_count(), "python": platform.python_version()},
           "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out.with_suffix(".png"))
    print(json.dumps({"json": str(out.with_suffix(".json")),
                      "png": str(out.with_suffix(".png"))}))
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
