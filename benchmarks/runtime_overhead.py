"""Runtime overhead: per-hop transport cost, chained latency, pipelined throughput.

Three measurements, written to ``benchmarks/results/runtime_overhead.json`` and ``.png``:

1. **Per hop** (transport alone): a tensor is sent to an echo process and back on loopback;
   one hop = half the round trip (median). Framed TCP (this runtime's transport) against
   raw sockets (``sendall``/``recv_into`` of the bare bytes into a reused buffer: the
   floor) and a gRPC unary call carrying the same bytes (its best case: raw bytes, no
   protobuf tensor fields), for several tensor sizes including 1x3x224x224 float32;
   interleaved rounds, medians. ``--hops-only`` runs this part alone (``hops.py``).
2. **End to end**: zoo models split into 3 stages by FLOPs (edge / hub / cloud), compiled by
   the real back end, served by three ``runtime serve`` processes on loopback; latency of
   one request (median) against one ONNX Runtime session of the whole model, and against
   the stages chained in one process (``LocalExecutor``) and against the same stages in
   three processes that pass tensors with the least framing Python does (``chain_floor.py``:
   what any chain of Python processes pays here, apart from the runtime's own work), and
   the same processes with the runtime's transport (its framing, without a worker's logic).
3. **Pipelined throughput**: requests kept in flight (a window of 8); images/s against the
   bottleneck bound ``1 / max(stage compute)`` (stages measured alone, same thread count).
   Note that the three workers share this host's cores, so on a machine with fewer cores
   than stages the bound cannot be reached; ``cpu_bound`` (``cores / sum(stage compute)``)
   is reported too.

Usage::

    python benchmarks/runtime_overhead.py [--quick] [--models tiny_cnn,resnet18] [--out DIR]
    python benchmarks/runtime_overhead.py --hops-only [--repeats 9]   # part 1 alone
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.chain_floor import FloorChain  # noqa: E402  (after the path)
from benchmarks.common import chain_bundle, machine, zoo_models  # noqa: E402
from benchmarks.hops import SIZES, bench_hops, median_time, spawn  # noqa: E402

# --------------------------------------------------------------------------- models


def _interleaved(fns: list[Any], n: int) -> list[float]:
    """Median time of each function, calling them in turn ``n`` times (after warm-up)."""
    for _ in range(3):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _busy_overlap(records: list[dict[str, Any]]) -> float:
    """Total stage compute time over the length of the union of the stage intervals."""
    spans = sorted((t["start"], t["start"] + t["compute"]) for r in records
                   for t in r["timings"] if "start" in t)
    if not spans:
        return float("nan")
    busy, (cur_a, cur_b) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > cur_b:
            busy += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    busy += cur_b - cur_a
    return sum(b - a for a, b in spans) / busy if busy > 0 else float("nan")


def bench_model(name: str, iters: int, work: Path, threads: int,
                window: int = 8) -> dict[str, Any]:
    import onnxruntime as ort

    from runtime.executor import LocalExecutor, RemoteExecutor
    from runtime.stages import StageRunner

    mdir = work / name
    mdir.mkdir()
    devices = ("edge", "hub", "cloud")
    chain = chain_bundle(name, mdir, devices, verify=True)
    path, bounds, bundle, view, feeds = (chain.model, chain.bounds, chain.bundle, chain.view,
                                         chain.feeds)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    full = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    units = list(view.units())
    runners = [StageRunner(u, view.root, threads=threads) for u in units]
    available, stage_t = dict(feeds), []
    for r in runners:  # a chain: each stage's inputs were produced by earlier ones
        inp = {n: available[n] for n in r.input_names}
        stage_t.append(median_time(lambda r=r, inp=inp: r.run(inp), iters))
        available.update(r.run(inp))
    ref = full.run(None, feeds)
    lx = LocalExecutor(bundle, threads=threads)

    procs, hosts = [], {}
    try:
        for d in devices:
            pf = mdir / f"{d}.port.json"
            procs.append(spawn(["-m", "runtime.cli", "serve", str(bundle), "--device", d,
                                 "--threads", str(threads), "--port-file", str(pf),
                                 "--quiet"], pf))
            hosts[d] = f"127.0.0.1:{json.loads(pf.read_text())['port']}"
        with RemoteExecutor(bundle, hosts, timeout=60) as rx, \
                FloorChain(bundle, threads=threads) as floor, \
                FloorChain(bundle, threads=threads, framing="runtime") as framed:
            for out in (rx.infer(feeds), floor.infer(feeds), framed.infer(feeds)):
                for o, r in zip(view.outputs, ref, strict=True):
                    np.testing.assert_allclose(out[o.name], r, rtol=1e-4, atol=1e-4)
            # interleaved, so a change in the host's load hits them alike
            t_full, t_local, t_remote, t_floor, t_framed = _interleaved(
                [lambda: full.run(None, feeds), lambda: lx.infer(feeds),
                 lambda: rx.infer(feeds), lambda: floor.infer(feeds),
                 lambda: framed.infer(feeds)], iters)
            recs = list(rx.records)[-iters:]
            served = [statistics.median(t["compute"] for r in recs
                                        for t in r["timings"] if t["stage"] == u.key)
                      for u in units]
            served_compute = sum(served)
            breakdown = _breakdown(recs)
            n_pipe = max(2 * iters, 40)
            t0 = time.perf_counter()
            inflight: list[Any] = []
            for _ in range(n_pipe):
                if len(inflight) >= window:
                    inflight.pop(0).result(60)
                inflight.append(rx.submit(feeds))
            for f in inflight:
                f.result(60)
            pipe_wall = time.perf_counter() - t0
            overlap = _busy_overlap(list(rx.records)[-n_pipe:])
    finally:
        lx.close()
        for p in procs:
            p.kill()
            p.wait()
    cut_bytes = [sum(view.receives(send.to)[p.name].nbytes for send in u.sends
                     if send.to != "output" for p in send.tensors) for u in units[:-1]]
    row = {
        "model": name, "layers": chain.layers,
        "stages": [{"device": s.device, "layers": list(b), "compute_ms": t * 1e3}
                   for s, b, t in zip(units, bounds, stage_t, strict=True)],
        "cut_bytes": cut_bytes,
        "full_ms": t_full * 1e3, "local_chain_ms": t_local * 1e3,
        "remote_chain_ms": t_remote * 1e3,
        "remote_overhead_ms": (t_remote - t_full) * 1e3,
        # the same stages in the least a chain of Python processes does (chain_floor.py):
        # what any Python transport on this host pays, against the runtime's own share
        "floor_chain_ms": t_floor * 1e3,
        "floor_chain_over_full": t_floor / t_full,
        "remote_over_floor_chain": t_remote / t_floor,
        # the same processes with the runtime's transport and a worker-like header, but
        # none of a worker's logic: the framing's share of the runtime's overhead
        "framed_floor_chain_ms": t_framed * 1e3,
        "framed_floor_over_floor": t_framed / t_floor,
        "remote_over_framed_floor": t_remote / t_framed,
        # hops: executor -> stage 0 -> ... -> last stage -> executor
        "remote_overhead_per_hop_ms": (t_remote - t_full) * 1e3 / (len(units) + 1),
        "served_compute_ms": served_compute * 1e3,
        # where a served request's time goes, from the workers' own timing records (one
        # host, one clock): each stage's compute as served against the same unit alone,
        # the hops between stages (sender's work after its compute to the receiver's
        # compute start) and the executor's two ends (send the input, take the result;
        # each apart, from the record's "sent" / "answered")
        "served_compute_per_stage_ms": [t * 1e3 for t in served],
        "alone_compute_per_stage_ms": [t * 1e3 for t in stage_t],
        **breakdown,
        "pipelined_images_per_s": n_pipe / pipe_wall,
        "bottleneck_bound_images_per_s": 1.0 / max(stage_t),
        "cpu_bound_images_per_s": min(os.cpu_count() or 1, len(stage_t)) / sum(stage_t),
        "serial_images_per_s": 1.0 / t_remote,
        # sum of stage compute / time any stage was busy, while pipelined: above 1 means
        # stages of different requests ran at the same time
        "pipelined_stage_overlap": overlap,
    }
    print(f"{name}: served compute {served_compute * 1e3:.2f} ms (stages alone "
          f"{sum(stage_t) * 1e3:.2f}), hops between stages "
          f"{', '.join(f'{g:.3f}' for g in breakdown['inner_hop_ms'])} ms, executor's ends "
          f"{breakdown['executor_ends_ms']:.3f} ms (its sends to the first compute "
          f"{breakdown['executor_to_first_stage_ms']:.3f}, the last compute to the result "
          f"filed {breakdown['last_stage_to_executor_ms']:.3f})", file=sys.stderr)
    print(f"{name}: full {row['full_ms']:.2f} ms, local chain {row['local_chain_ms']:.2f} ms,"
          f" remote chain {row['remote_chain_ms']:.2f} ms, floor chain "
          f"{row['floor_chain_ms']:.2f} ms ({row['floor_chain_over_full']:.3f}x full; with the "
          f"runtime's framing {row['framed_floor_chain_ms']:.2f} ms); pipelined "
          f"{row['pipelined_images_per_s']:.1f}/s (bound "
          f"{row['bottleneck_bound_images_per_s']:.1f}/s, cpu bound "
          f"{row['cpu_bound_images_per_s']:.1f}/s, overlap {overlap:.2f})", file=sys.stderr)
    return row


def _breakdown(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over requests: each hop between consecutive stages (one stage's compute end
    to the next one's compute start, wall clock) and the executor's two ends together
    (latency minus first compute start to last compute end)."""
    inner: list[list[float]] = []
    ends: list[float] = []
    to_first: list[float] = []  # the executor's sends began -> the first compute start
    from_last: list[float] = []  # the last compute end -> the result filed by the executor
    for r in records:
        ts = sorted(r["timings"], key=lambda t: t["start"])
        gaps = [b["start"] - (a["start"] + a["compute"]) for a, b in zip(ts, ts[1:], strict=False)]
        inner.append(gaps)
        ends.append(r["latency"] - (ts[-1]["start"] + ts[-1]["compute"] - ts[0]["start"]))
        if r.get("sent") is not None and r.get("answered") is not None:
            to_first.append(ts[0]["start"] - r["sent"])
            from_last.append(r["answered"] - (ts[-1]["start"] + ts[-1]["compute"]))
    n = min(map(len, inner)) if inner else 0

    def ms(xs: list[float]) -> float:
        return statistics.median(xs) * 1e3 if xs else float("nan")

    return {"inner_hop_ms": [statistics.median(g[k] for g in inner) * 1e3 for k in range(n)],
            "executor_ends_ms": ms(ends), "executor_to_first_stage_ms": ms(to_first),
            "last_stage_to_executor_ms": ms(from_last)}


# --------------------------------------------------------------------------- report


def plot(doc: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = doc["models"]
    fig, axes = plt.subplots(1, 3 if ms else 1, figsize=(16 if ms else 6.5, 4.5),
                             squeeze=False)
    axes = axes[0]
    hops = doc["hops"]
    x = np.arange(len(hops))
    ax = axes[0]
    for k, (key, label) in enumerate((("raw_hop_ms", "raw sockets (floor)"),
                                      ("py_min_hop_ms", "least framing in Python"),
                                      ("tcp_hop_ms", "framed TCP (runtime)"),
                                      ("grpc_hop_ms", "gRPC unary (raw bytes)"))):
        ax.bar(x + (k - 1.5) * 0.2, [h.get(key, np.nan) for h in hops], 0.2, label=label)
    ax.set_xticks(x, [h["tensor"] for h in hops], rotation=20, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("one hop, ms (median, loopback)")
    load = doc["host"].get("load_average_before")
    ax.set_title("Transport alone, float32 tensors" + (
        f"\n(load average {load[0]:.0f} on {doc['host']['cpus']} cores: a loaded host)"
        if load and load[0] > 1 else ""), fontsize=10)
    ax.legend(fontsize=8)
    if not ms:
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        return
    x = np.arange(len(ms))
    ax = axes[1]
    for k, (key, label) in enumerate((("full_ms", "one ORT session"),
                                      ("local_chain_ms", "3 stages, one process"),
                                      ("floor_chain_ms", "3 processes, least framing"),
                                      ("framed_floor_chain_ms",
                                       "3 processes, the runtime's framing"),
                                      ("remote_chain_ms", "3 workers, loopback"))):
        ax.bar(x + (k - 2) * 0.16, [m.get(key, np.nan) for m in ms], 0.16, label=label)
    ax.set_xticks(x, [m["model"] for m in ms])
    ax.set_ylabel("latency, ms (median)")
    ax.set_title("End to end, batch 1")
    ax.legend(fontsize=8)
    ax = axes[2]
    for k, (key, label) in enumerate((("serial_images_per_s", "serial"),
                                      ("pipelined_images_per_s",
                                       f"pipelined ({doc['window']} in flight)"),
                                      ("cpu_bound_images_per_s", "CPU bound"),
                                      ("bottleneck_bound_images_per_s", "bottleneck bound"))):
        ax.bar(x + (k - 1.5) * 0.2, [m[key] for m in ms], 0.2, label=label)
    ax.set_xticks(x, [m["model"] for m in ms])
    ax.set_yscale("log")
    ax.set_ylabel("images / s")
    ax.set_title(f"Throughput ({doc['host']['cpus']} CPU cores shared by 3 workers)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer runs and models")
    p.add_argument("--models", type=zoo_models, help="comma-separated zoo models")
    p.add_argument("--threads", type=int, default=1, help="ORT threads per session")
    p.add_argument("--window", type=int, default=8, help="requests in flight when pipelined")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--hops-only", action="store_true",
                   help="only the per-hop transport part (to runtime_overhead_hops.json)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per hop size")
    p.add_argument("--sizes", help=f"comma-separated hop tensors (of {', '.join(SIZES)})")
    args = p.parse_args(argv)
    iters = 30 if args.quick else 100
    names = (args.models if args.models else
             ["tiny_cnn", "resnet18"] if args.quick else
             ["tiny_cnn", "resnet18", "mobilenet_v2", "alexnet"])
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="rt-bench-") as tmp:
        work = Path(tmp)
        doc: dict[str, Any] = {
            "command": "python benchmarks/runtime_overhead.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "host": {"cpus": os.cpu_count(), "machine": platform.machine(),
                     "cpu": machine()["cpu"],
                     "python": platform.python_version(), "onnxruntime": ort.__version__,
                     # other processes share this host: the load says how noisy it was
                     "load_average_before": list(os.getloadavg())},
            "iterations": iters, "threads": args.threads, "repeats": args.repeats,
            "hops": bench_hops(iters * 2, work, args.repeats,
                               args.sizes.split(",") if args.sizes else None,
                               warm_up=50 if args.quick else 500),
            "window": args.window,
            "models": [] if args.hops_only else
                      [bench_model(n, iters, work, args.threads, args.window) for n in names],
        }
        doc["host"]["load_average_after"] = list(os.getloadavg())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "runtime_overhead" + ("_hops" if args.hops_only else "") + (
        "_quick" if args.quick else "")
    tmp_json = out / f".{stem}.json.tmp"
    tmp_json.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp_json, out / f"{stem}.json")
    plot(doc, out / f"{stem}.png")
    print(json.dumps({"json": str(out / f"{stem}.json"), "png": str(out / f"{stem}.png")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
