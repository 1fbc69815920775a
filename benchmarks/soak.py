"""Soak: real workers on loopback for a bounded time; outputs bit-identical, memory flat.

A zoo model is split into ``--stages`` stages of about equal FLOPs, compiled by the real back
end (verified against the whole model), and each stage is served by its own ``runtime
serve`` process on 127.0.0.1. For ``--minutes`` the executor (:class:`RemoteExecutor`, the
public client API) keeps ``--window`` requests in flight, cycling through ``--inputs``
distinct seeded inputs, and closes and reopens itself every ``--reconnect-every`` seconds so
the workers see clients come and go. It checks:

* **bit-identical outputs**: the first answer for each input is its reference (itself
  checked against one ONNX Runtime session of the whole model, and against the stages
  chained in this process); every later answer must equal it byte for byte;
* **no failures**: every request is answered (errors are counted and the first kept);
* **flat memory and descriptors**: every ``--sample-every`` seconds the RSS and open file
  descriptors of each worker and of this client are read from ``/proc``; the least-squares
  slope over the run after the warm-up (the first ``--warmup-fraction``) is reported per
  hour, with the drift it implies over the measured span.

Bounded: the run stops at ``--minutes`` whatever happens, and the workers are always
stopped. Usage::

    python benchmarks/soak.py                      # 30 minutes, resnet18, 2 stages
    python benchmarks/soak.py --quick              # tiny_cnn, 1 minute

Writes ``results/soak.json`` and ``.png`` (``soak_quick.*`` with ``--quick``); exits 1 when an
output differed, a request failed or memory/descriptors were not flat.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    chain_plan,
    linear_slope,
    open_fds,
    result_paths,
    rss_bytes,
    save_figure,
    spawn_worker,
    stop_processes,
)

DEVICES = ("edge", "hub", "cloud", "dev3", "dev4", "dev5")
MIB = 1024 * 1024
# latency histogram edges, 10 us .. 1000 s log-spaced: percentiles without keeping every
# sample, so the client's own memory stays flat however long it runs
EDGES = np.logspace(-5, 3, 801)


def build_bundle(model: str, stages: int, work: Path) -> tuple[Path, Any, list[tuple[int, int]]]:
    """Compile ``model`` into ``stages`` stages of about equal FLOPs (verified)."""
    import models
    from partitioner.backend import compile_bundle
    from partitioner.frontend import load_model

    path = work / f"{model}.onnx"
    models.save_model(model, path)
    prepared = load_model(path)
    plan, bounds = chain_plan([layer.flops for layer in prepared.graph.layers],
                              DEVICES[:stages])
    bundle = compile_bundle(prepared, plan, None, work / "bundle", verify=True)
    return bundle, prepared, bounds


def references(path: Path, bundle: Path, inputs: list[dict[str, np.ndarray]],
               threads: int) -> dict[str, Any]:
    """Whole-model ORT outputs and in-process chained outputs of every input."""
    import onnxruntime as ort

    from runtime.executor import LocalExecutor

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    whole = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in whole.get_outputs()]
    with LocalExecutor(bundle, threads=threads) as local:
        chained = [local.infer(x) for x in inputs]
    full = [dict(zip(names, whole.run(names, x), strict=True)) for x in inputs]
    return {"whole": full, "chained": chained}


def same_bytes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Every output present in both, with the same dtype, shape and bytes."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a)


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
               for k in b)


def series_summary(times: list[float], values: list[float], warmup_fraction: float
                   ) -> dict[str, Any]:
    """First/last/min/max, and the slope per hour over the samples after the warm-up."""
    start = times[0] + warmup_fraction * (times[-1] - times[0]) if times else 0.0
    steady = [(t, v) for t, v in zip(times, values, strict=True) if t >= start]
    ts, vs = [t for t, _ in steady], [v for _, v in steady]
    slope = linear_slope(ts, vs)  # per second
    span = (ts[-1] - ts[0]) if len(ts) > 1 else 0.0
    return {"first": values[0] if values else None, "last": values[-1] if values else None,
            "min": min(values, default=None), "max": max(values, default=None),
            "steady_min": min(vs, default=None), "steady_max": max(vs, default=None),
            "steady_median": statistics.median(vs) if vs else None,
            "slope_per_hour": slope * 3600.0, "steady_span_s": span,
            "drift_over_span": slope * span}


class Soak:
    """The request loop, the samples and the checks of one run."""

    def __init__(self, bundle: Path, hosts: dict[str, str], inputs: list[dict[str, np.ndarray]],
                 args: argparse.Namespace, pids: dict[str, int]) -> None:
        self.bundle, self.hosts, self.inputs, self.args = bundle, hosts, inputs, args
        self.pids = pids
        self.reference: dict[int, dict[str, np.ndarray]] = {}
        self.histogram = np.zeros(len(EDGES) + 1, dtype=np.int64)
        self.recent: collections.deque[float] = collections.deque(maxlen=2000)
        self.slowest = 0.0
        self.answered = self.mismatches = self.errors = self.reconnects = 0
        self.first_error: str | None = None
        self.first_mismatch: dict[str, Any] | None = None
        self.samples: list[dict[str, Any]] = []

    def sample(self, t: float) -> None:
        row: dict[str, Any] = {"t": t, "answered": self.answered,
                               "load_average": os.getloadavg()[0]}
        for name, pid in self.pids.items():
            try:
                row[name] = {"rss": rss_bytes(pid), "fds": open_fds(pid)}
            except OSError:  # the process is gone: recorded as missing
                row[name] = None
        row["p50_ms"] = 1e3 * statistics.median(self.recent) if self.recent else None
        self.samples.append(row)

    def record(self, seconds: float) -> None:
        self.histogram[np.searchsorted(EDGES, seconds)] += 1
        self.recent.append(seconds)
        self.slowest = max(self.slowest, seconds)

    def percentile(self, q: float) -> float | None:
        """The upper edge of the histogram bin holding quantile ``q`` (seconds)."""
        total = int(self.histogram.sum())
        if total == 0:
            return None
        i = int(np.searchsorted(np.cumsum(self.histogram), q * total))
        return float(EDGES[min(i, len(EDGES) - 1)])

    def check(self, k: int, out: dict[str, np.ndarray], n: int) -> None:
        ref = self.reference.setdefault(k, out)
        if ref is out or same_bytes(ref, out):
            return
        self.mismatches += 1
        if self.first_mismatch is None:
            self.first_mismatch = {"request": n, "input": k,
                                   "max_abs_diff": max_abs_diff(out, ref)}

    def run(self) -> float:
        """Stream requests until the deadline; returns the seconds it ran."""
        from runtime.executor import RemoteExecutor

        a = self.args
        t0 = time.monotonic()
        deadline = t0 + a.minutes * 60.0
        next_sample = t0
        n = 0
        while time.monotonic() < deadline:
            reopen = min(deadline, time.monotonic() + a.reconnect_every)
            # generous probes: a loaded host must not get a worker marked down
            with RemoteExecutor(self.bundle, self.hosts, timeout=a.request_timeout,
                                probe_interval=1.0, probe_timeout=10.0,
                                probe_strikes=5) as rx:
                inflight: dict[cf.Future[Any], tuple[int, int, float]] = {}
                while time.monotonic() < reopen or inflight:
                    while len(inflight) < a.window and time.monotonic() < reopen:
                        k = n % len(self.inputs)
                        inflight[rx.submit(self.inputs[k])] = (k, n, time.perf_counter())
                        n += 1
                    done, _ = cf.wait(list(inflight), timeout=a.request_timeout + 10,
                                      return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        k, i, started = inflight.pop(fut)
                        try:
                            out = fut.result()
                        except Exception as err:  # noqa: BLE001 - counted, run goes on
                            self.errors += 1
                            self.first_error = self.first_error or f"request {i}: {err}"
                            continue
                        self.record(time.perf_counter() - started)
                        self.answered += 1
                        self.check(k, out, i)
                    if not done:  # nothing came back in time: those are failures
                        self.errors += len(inflight)
                        self.first_error = self.first_error or "no answer within the timeout"
                        inflight.clear()
                    if time.monotonic() >= next_sample:
                        self.sample(time.monotonic() - t0)
                        next_sample += a.sample_every
            self.reconnects += 1
        self.sample(time.monotonic() - t0)
        return time.monotonic() - t0


def report(soak: Soak, seconds: float, refs: dict[str, Any], args: argparse.Namespace,
           meta: dict[str, Any]) -> dict[str, Any]:
    times = [s["t"] for s in soak.samples]
    processes: dict[str, Any] = {}
    flat = True
    for name in soak.pids:
        rows = [(s["t"], s[name]) for s in soak.samples if s.get(name)]
        ts = [t for t, _ in rows]
        rss = series_summary(ts, [r["rss"] / MIB for _, r in rows], args.warmup_fraction)
        fds = series_summary(ts, [float(r["fds"]) for _, r in rows], args.warmup_fraction)
        # flat: the steady slope predicts less than max(8 MiB, 3 %) of growth over the
        # span, and fewer than 4 descriptors (a few pooled sockets come and go)
        rss_flat = abs(rss["drift_over_span"]) <= max(8.0, 0.03 * (rss["steady_median"] or 0))
        fds_flat = abs(fds["drift_over_span"]) < 4.0
        processes[name] = {"pid": soak.pids[name], "rss_mib": rss, "fds": fds,
                           "rss_flat": rss_flat, "fds_flat": fds_flat,
                           "alive_at_end": len(rows) == len(soak.samples)}
        flat = flat and rss_flat and fds_flat and processes[name]["alive_at_end"]
    p50, p99 = soak.percentile(0.5), soak.percentile(0.99)
    whole_diff = max((max_abs_diff(soak.reference[k], refs["whole"][k])
                      for k in soak.reference), default=None)
    chained_same = all(same_bytes(soak.reference[k], refs["chained"][k])
                       for k in soak.reference)
    ok = soak.mismatches == 0 and soak.errors == 0 and flat and soak.answered > 0
    return {
        "benchmark": "soak", "quick": args.quick, "ok": ok,
        "settings": {k: getattr(args, k) for k in ("model", "stages", "minutes", "window",
                                                   "inputs", "threads", "sample_every",
                                                   "reconnect_every", "warmup_fraction")},
        **meta,
        "seconds": seconds, "answered": soak.answered, "errors": soak.errors,
        "first_error": soak.first_error, "mismatches": soak.mismatches,
        "first_mismatch": soak.first_mismatch, "reconnects": soak.reconnects,
        "requests_per_s": soak.answered / seconds if seconds else 0.0,
        # p50/p99: upper edges of 2.3 %-wide histogram bins
        "latency_ms": {"p50": None if p50 is None else 1e3 * p50,
                       "p99": None if p99 is None else 1e3 * p99,
                       "max": 1e3 * soak.slowest},
        "reference_vs_whole_model_max_abs_diff": whole_diff,
        "reference_bit_identical_to_chained_in_process": chained_same,
        "processes": processes, "flat": flat,
        "load_average_after": os.getloadavg(),
        "samples": soak.samples, "sample_times": times,
    }


def plot(doc: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    samples = doc["samples"]
    for name in doc["processes"]:
        rows = [(s["t"] / 60, s[name]) for s in samples if s.get(name)]
        axes[0].plot([t for t, _ in rows], [r["rss"] / MIB for _, r in rows], label=name)
        axes[1].plot([t for t, _ in rows], [r["fds"] for _, r in rows], label=name)
    rows = [(s["t"] / 60, s["p50_ms"]) for s in samples if s.get("p50_ms") is not None]
    axes[2].plot([t for t, _ in rows], [v for _, v in rows], color="k")
    axes[0].set_ylabel("RSS (MiB)")
    axes[1].set_ylabel("open fds")
    axes[2].set_ylabel("p50 latency (ms)\nlast 2000 requests")
    axes[2].set_xlabel("minutes")
    axes[0].legend(fontsize=8)
    s = doc["settings"]
    fig.suptitle(f"soak: {s['model']}, {s['stages']} workers on loopback, "
                 f"{doc['answered']} requests, {doc['mismatches']} differing, "
                 f"{doc['errors']} failed", fontsize=10)
    fig.tight_layout()
    save_figure(fig, png)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="zoo model (default resnet18; quick tiny_cnn)")
    ap.add_argument("--stages", type=int, default=2, help="stages = worker processes")
    ap.add_argument("--minutes", type=float, default=None, help="run time (default 30; quick 1)")
    ap.add_argument("--window", type=int, default=2, help="requests in flight")
    ap.add_argument("--inputs", type=int, default=4, help="distinct inputs cycled through")
    ap.add_argument("--threads", type=int, default=1, help="ORT threads per worker")
    ap.add_argument("--sample-every", type=float, default=None,
                    help="seconds between /proc samples (default 10; quick 2)")
    ap.add_argument("--reconnect-every", type=float, default=None,
                    help="seconds between executor re-opens (default 120; quick 20)")
    ap.add_argument("--warmup-fraction", type=float, default=0.1,
                    help="leading fraction of the run left out of the slopes")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--quick", action="store_true", help="tiny_cnn for 1 minute")
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    args = ap.parse_args(argv)
    args.model = args.model or ("tiny_cnn" if args.quick else "resnet18")
    args.minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 30.0)
    args.sample_every = args.sample_every or (2.0 if args.quick else 10.0)
    args.reconnect_every = args.reconnect_every or (20.0 if args.quick else 120.0)
    if args.stages < 1 or args.stages > len(DEVICES) or args.window < 1 or args.inputs < 1:
        ap.error("--stages must be 1..6, --window and --inputs at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    json_path, png_path = result_paths("soak", args.quick, args.out)
    # SIGTERM (a bounded run cut short) still stops the workers in `finally`
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from partitioner.analysis.profiler import host_info
    from partitioner.analysis.profiles import write_json_atomic

    procs = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        bundle, prepared, bounds = build_bundle(args.model, args.stages, work)
        rng = np.random.default_rng(0)
        inputs = [{t.name: rng.standard_normal(t.shape).astype(t.dtype)
                   for t in prepared.graph.inputs} for _ in range(args.inputs)]
        refs = references(work / f"{args.model}.onnx", bundle, inputs, args.threads)
        try:
            hosts, pids = {}, {"client": os.getpid()}
            for d, _ in zip(DEVICES, bounds, strict=False):
                proc, hosts[d] = spawn_worker(bundle, d, work / f"{d}.port.json",
                                              threads=args.threads, log=work / f"{d}.log")
                procs.append(proc)
                pids[f"worker {d}"] = proc.pid
            soak = Soak(bundle, hosts, inputs, args, pids)
            print(f"[soak] {args.model}: {len(bounds)} workers, {args.minutes:g} min",
                  file=sys.stderr)
            seconds = soak.run()
        finally:
            stop_processes(procs)
        logs = {d: (work / f"{d}.log").read_text()[-2000:] for d in hosts}
    meta = {"host": host_info(args.threads), "layers": len(prepared.graph.layers),
            "bounds": bounds, "worker_log_tails": {d: t for d, t in logs.items() if t},
            "loaded_host_note": "run on the shared 2-core dev host at nice 19 while other "
                                "work ran: latencies are indicative only"}
    doc = report(soak, seconds, refs, args, meta)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, doc)
    plot(doc, png_path)
    summary = {k: doc[k] for k in ("ok", "answered", "errors", "mismatches", "flat",
                                   "requests_per_s", "latency_ms")}
    summary["processes"] = {n: {"rss_mib_per_hour": round(p["rss_mib"]["slope_per_hour"], 2),
                                "rss_mib": [round(p["rss_mib"]["first"], 1),
                                            round(p["rss_mib"]["last"], 1)],
                                "fds_per_hour": round(p["fds"]["slope_per_hour"], 2),
                                "fds": [p["fds"]["first"], p["fds"]["last"]]}
                            for n, p in doc["processes"].items()}


    print(json.dumps(summary, indent=1))
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
