"""What one hop costs *inside* a worker, without the scheduler: the floor of the 3-stage chain.

For each model, the bundle is cut in three by FLOPs (as ``runtime_overhead.py`` does) and
the middle stage's worker (``hub``) runs in this process. One request's message is fed
straight to the worker's frame handler — the header checks, the inbox, the unit run by
ONNX Runtime, the outgoing message encoded and sent (``sendmsg``) to a draining sink in
another process — and timed, against the same unit run by ONNX Runtime alone. The
difference is the worker's own work per hop (Python and system calls); the receive side
(reading the frame) and waking the next process are not in it, so a chain's hop costs at
least this. Both are measured twice: back to back (warm caches), and with a 64 MiB buffer
swept between hops, as a stage's compute or another process leaves this core's caches in
a real chain (the interpreter then runs from memory: the cold figures). Also,
interleaved: the whole zoo model in one ONNX Runtime session against its three units
chained in this thread (what cutting the graph costs, with no transport).

Usage: ``python benchmarks/worker_hop.py [--quick] [--models a,b] [--runs 500]``; writes
``results/worker_hop[_quick].json`` (no plot: one figure per model).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    ROOT,
    chain_bundle,
    machine,
    result_paths,
    zoo_models,
)
from partitioner.analysis.profiles import write_json_atomic  # noqa: E402

EVICT_BYTES = 64 << 20  # larger than this host's last-level cache (32 MiB)
SINK = """
import socket, sys, threading
sys.path.insert(0, sys.argv[1])
from runtime.transport import ConnectionClosed, recv_frame
lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen()
print(lst.getsockname()[1], flush=True)
def drain(c):
    try:
        while True:
            recv_frame(c, max_body=1 << 31)
    except (ConnectionClosed, OSError):
        c.close()
while True:
    c, _ = lst.accept()
    threading.Thread(target=drain, args=(c,), daemon=True).start()
"""


def measure(name: str, runs: int, work: Path, sink: str) -> dict[str, Any]:
    from runtime.protocol import Frame
    from runtime.stages import StageRunner
    from runtime.worker import Worker

    chain = chain_bundle(name, work, ("edge", "hub", "cloud"), verify=False,
                         bundle_name=f"{name}-bundle")
    path, bundle, view, feeds = chain.model, chain.bundle, chain.view, chain.feeds
    first, middle = list(view.units())[:2]
    produced = StageRunner(first, view.root, threads=1).run(feeds)
    tensors = {t.name: produced[t.name] for t in middle.inputs}
    worker = Worker(bundle, "hub", token="bench", threads=1)
    route = {d: sink for d in ("edge", "hub", "cloud")}

    def hop(k: int) -> None:
        header = {"type": "infer", "id": f"r{k}", "attempt": 0, "plan": "main",
                  "unit": middle.key, "from": first.key, "route": route, "reply": sink,
                  "budget": 30.0, "rows": {n: None for n in tensors}, "timings": [],
                  "token": "bench", "timed": False}
        reply = worker._handle(Frame(header, tensors), "bench")
        reply[1]()  # the idle unit runs in the receiving thread (Worker.inline)

    runner = worker.runners[("main", middle.key)]
    feed = {n: tensors[n] for n in runner.input_names}
    for k in range(20):
        hop(k)
    hops, ort_runs = [], []
    for k in range(runs):  # interleaved, so the host's load hits both alike
        t0 = time.perf_counter()
        hop(100 + k)
        t1 = time.perf_counter()
        runner.run(feed)
        t2 = time.perf_counter()
        hops.append(t1 - t0)
        ort_runs.append(t2 - t1)
    # the same, with this core's caches swept between hops (as a stage's compute, or
    # another process, leaves them in a chain): what the worker's own work costs cold
    sweep = np.ones(EVICT_BYTES // 8)
    cold_hops, cold_ort = [], []
    for k in range(max(20, runs // 5)):
        sweep += 1.0
        t0 = time.perf_counter()
        hop(50_000 + k)
        t1 = time.perf_counter()
        sweep += 1.0
        t2 = time.perf_counter()
        runner.run(feed)
        t3 = time.perf_counter()
        cold_hops.append(t1 - t0)
        cold_ort.append(t3 - t2)
    prof = cProfile.Profile()
    prof.enable()
    for k in range(min(runs, 200)):
        hop(10_000 + k)
    prof.disable()
    stats = pstats.Stats(prof)
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:8]  # type: ignore[attr-defined]
    hop_ms, ort_ms = statistics.median(hops) * 1e3, statistics.median(ort_runs) * 1e3
    whole_ms, chain_ms = _split_cost(path, view, feeds, runs)
    return {"model": name, "whole_ms": whole_ms, "chained_units_ms": chain_ms,
            "split_ratio": chain_ms / whole_ms,
            "tensor_bytes": int(sum(a.nbytes for a in tensors.values())),
            "hop_ms": hop_ms, "ort_ms": ort_ms, "worker_ms": hop_ms - ort_ms,
            "cold_hop_ms": statistics.median(cold_hops) * 1e3,
            "cold_ort_ms": statistics.median(cold_ort) * 1e3,
            "cold_worker_ms": (statistics.median(cold_hops) - statistics.median(cold_ort)) * 1e3,
            "profiled_top_tottime": [
                {"function": f"{Path(f).name}:{line}({fn})", "ms_per_hop":
                 v[2] / min(runs, 200) * 1e3} for (f, line, fn), v in top]}


def _split_cost(path: Path, view: Any, feeds: dict[str, np.ndarray], runs: int
                ) -> tuple[float, float]:
    """Median ms of the whole model (one session) and of its units chained, interleaved."""
    import onnxruntime as ort

    from runtime.stages import StageRunner

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    whole = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    runners = [StageRunner(u, view.root, threads=1) for u in view.units()]

    def chained() -> None:
        have = dict(feeds)
        for r in runners:
            have.update(r.run({n: have[n] for n in r.input_names}))

    times: tuple[list[float], list[float]] = ([], [])
    for k in range(runs // 2 + 10):
        for f, out in ((lambda: whole.run(None, feeds), times[0]), (chained, times[1])):
            t0 = time.perf_counter()
            f()
            if k >= 10:  # warm-up
                out.append(time.perf_counter() - t0)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny_cnn only, 100 runs")
    parser.add_argument("--models", type=zoo_models,
                        default="tiny_cnn,alexnet,resnet18,mobilenet_v2")
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--out", default=None)
    ns = parser.parse_args(argv)
    names = ["tiny_cnn"] if ns.quick else ns.models
    runs = 100 if ns.quick else ns.runs
    doc: dict[str, Any] = {"quick": ns.quick, "runs": runs, "machine_before": machine()}
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(ROOT)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert sink.stdout is not None
        address = f"127.0.0.1:{int(sink.stdout.readline())}"
        with tempfile.TemporaryDirectory(prefix="worker-hop-") as tmp:
            doc["models"] = [measure(n, runs, Path(tmp), address) for n in names]
    finally:
        sink.kill()
        sink.wait(10)
    doc["machine_after"] = machine()
    for m in doc["models"]:
        print(f"{m['model']:>14}: {m['tensor_bytes'] / 1e3:8.1f} kB in, hop {m['hop_ms']:.3f} ms"
              f" = ORT {m['ort_ms']:.3f} + worker {m['worker_ms']:.3f} ms (caches swept: "
              f"{m['cold_ort_ms']:.3f} + {m['cold_worker_ms']:.3f} ms); whole model "
              f"{m['whole_ms']:.2f} ms, 3 units chained {m['chained_units_ms']:.2f} ms "
              f"({m['split_ratio']:.3f}x)")
    out, _ = result_paths("worker_hop", ns.quick, ns.out)
    write_json_atomic(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
