"""``partitioner demo``: the whole flow on an embedded default, with no arguments needed.

Builds a zoo model (AlexNet, the model of the published experiments), plans it for the
packaged edge-hub-cloud system (Raspberry Pi 3B, Jetson Nano, 1080 Ti), compiles the
bundle (verified against the whole model), starts one real ``runtime serve`` worker process
per device on loopback, runs inferences through the chain, checks every result against
ONNX Runtime on the whole model, and prints the plan, the estimated latency (for the
modelled devices and links) next to the latency measured here, and where the time went.

The measured figures are this host's: all three "devices" are worker processes on this
machine talking over loopback, so they show the runtime's real cost, not the Pi's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from partitioner.cli.common import check_writable, print_json
from partitioner.errors import fail

if TYPE_CHECKING:
    from partitioner.pipeline import PlanResult

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="alexnet",
                        help="zoo model to build (default alexnet; see `python -m models list`)")
    parser.add_argument("--system", default=None,
                        help="system file (default: the packaged edge-hub-cloud example)")
    parser.add_argument("--objective", default="latency",
                        choices=("latency", "throughput"), help="what the plan minimises")
    parser.add_argument("--requests", type=int, default=20, help="inferences to run (20)")
    parser.add_argument("--workdir", default=None,
                        help="where to write the model and the bundle (default: a temp dir)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(f"[demo] {text}", file=sys.stderr, flush=True)


def _start_workers(bundle: Path, devices: list[str], workdir: Path
                   ) -> tuple[dict[str, str], list[subprocess.Popen[bytes]]]:
    """One ``runtime serve`` process per device on 127.0.0.1, any free port."""
    procs: list[subprocess.Popen[bytes]] = []
    port_files = {d: workdir / f"{d}.port.json" for d in devices}
    for d in devices:
        port_files[d].unlink(missing_ok=True)
        log = open(workdir / f"{d}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "serve", str(bundle), "--device", d,
             "--listen", "127.0.0.1:0", "--port-file", str(port_files[d]), "--quiet"],
            stdout=log, stderr=subprocess.STDOUT))
    hosts: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while len(hosts) < len(devices):
        for d, p in zip(devices, procs, strict=True):
            if d not in hosts and port_files[d].exists():
                info = json.loads(port_files[d].read_text())
                hosts[d] = f"{info['host']}:{info['port']}"
            if p.poll() is not None:
                _stop(procs)
                fail(f"worker for device {d} exited early; see {workdir / (d + '.log')}")
        if time.monotonic() > deadline:
            _stop(procs)
            fail("workers did not start within 60 s")
        time.sleep(0.05)
    return hosts, procs


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def _whole_model(path: Path, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    sess.run(names, inputs)  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        out = sess.run(names, inputs)
        times.append(time.perf_counter() - t0)
    return dict(zip(names, out, strict=True)), float(np.median(times))


def run(args: argparse.Namespace) -> int:
    import models
    from partitioner import pipeline
    from partitioner.data import example_system_path
    from partitioner.ir import Objective
    from runtime.executor import RemoteExecutor

    if args.requests < 1:
        fail("--requests must be at least 1")
    if args.model not in models.list_models():
        fail(f"--model {args.model!r}: not a zoo model ({', '.join(models.list_models())})")
    system = Path(args.system) if args.system else example_system_path()
    tmp = None
    if args.workdir:
        workdir = check_writable(args.workdir, "--workdir")
        if workdir.exists() and not workdir.is_dir():
            fail(f"--workdir {args.workdir!r} exists and is not a directory")
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="partitioner-demo-")
        workdir = Path(tmp.name)
    try:
        model_path = workdir / f"{args.model}.onnx"
        _say(args, f"building {args.model} -> {model_path}")
        models.save_model(args.model, model_path)
        bundle = workdir / "bundle"
        _say(args, f"planning for {system.name} (objective {args.objective}), compiling "
                   f"and verifying the bundle -> {bundle}")
        result = pipeline.compile(model_path, system, bundle, force=True,
                                  objective=Objective(kind=args.objective))
        devices = sorted({d for s in result.plan.stages for d in s.devices})
        _say(args, f"starting {len(devices)} workers on loopback: {', '.join(devices)}")
        hosts, procs = _start_workers(bundle, devices, workdir)
        try:
            report = _infer(args, model_path, bundle, hosts, result, RemoteExecutor)
        finally:
            _stop(procs)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        print_json(report)
    else:
        _print(report)
    return 0 if report["verified"] else 1


def _infer(args: argparse.Namespace, model_path: Path, bundle: Path, hosts: dict[str, str],
           result: PlanResult, executor_cls: Any) -> dict[str, Any]:
    graph = result.prepared.graph
    rng = np.random.default_rng(0)
    inputs = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in graph.inputs}
    reference, whole_latency = _whole_model(model_path, inputs)
    executor = executor_cls(bundle, hosts, timeout=60.0)
    latencies: list[float] = []
    worst = 0.0
    stage_time: dict[str, dict[str, Any]] = {}
    try:
        executor.infer(inputs)  # warm-up: connections, first ORT runs
        _say(args, f"running {args.requests} inferences through the chain")
        for _ in range(args.requests):
            out = executor.infer(inputs)
            rec = executor.records[-1]
            latencies.append(rec["latency"])
            for t in rec.get("timings", []):
                acc = stage_time.setdefault(t["stage"], {"device": t["device"], "compute": 0.0,
                                                         "queue": 0.0})
                acc["compute"] += t["compute"] / args.requests
                acc["queue"] += t["queue"] / args.requests
            worst = max(worst, max(float(np.max(np.abs(out[k] - reference[k])))
                                   for k in reference))
    finally:
        executor.close()
    mean = float(np.mean(latencies))
    compute = sum(v["compute"] for v in stage_time.values())
    layers = graph.layers
    return {
        "model": graph.name, "layers": len(layers), "system": str(result.system.path),
        "plan": result.plan.to_json(),
        "stage_names": [[layers[s.first].name, layers[s.last].name]
                        for s in result.plan.stages],
        "estimated": result.plan.estimate.to_json(),
        "measured": {"requests": args.requests, "latency_mean": mean,
                     "latency_min": float(np.min(latencies)),
                     "latency_max": float(np.max(latencies)),
                     "whole_model_latency": whole_latency,
                     "stages": stage_time,
                     "runtime_overhead": max(mean - compute, 0.0)},
        "max_abs_diff": worst, "verified": bool(worst <= 1e-3),
        "note": "estimated = modelled devices and links of the system file; measured = "
                "worker processes on this host over loopback",
    }


def _print(r: dict[str, Any]) -> None:
    plan, est, meas = r["plan"], r["estimated"], r["measured"]
    print(f"model {r['model']} ({r['layers']} layers) on {Path(r['system']).name}: "
          f"plan {plan['status']}, solved in {plan['solve_seconds'] * 1e3:.1f} ms")
    print(f"{'stage':>5}  {'device':<12} {'layers':<10} {'first .. last':<40}")
    for i, (s, names) in enumerate(zip(plan["stages"], r["stage_names"], strict=True)):
        first, last = s["layers"]
        print(f"{i:>5}  {s['device']:<12} {f'{first}..{last}':<10} {names[0]} .. {names[1]}")
    pseudo = ", ".join(f"{k} on {v}" for k, v in plan.get("pseudo", {}).items())
    if pseudo:
        print(f"pseudo layers: {pseudo}")
    print(f"estimated latency on the modelled devices: {est['latency'] * 1e3:.2f} ms "
          f"(compute {est['compute'] * 1e3:.2f}, communication {est['communication'] * 1e3:.2f}, "
          f"weight loading {est['weight_loading'] * 1e3:.2f})")
    print(f"measured on this host over loopback: mean {meas['latency_mean'] * 1e3:.2f} ms "
          f"(min {meas['latency_min'] * 1e3:.2f}, max {meas['latency_max'] * 1e3:.2f}) over "
          f"{meas['requests']} requests; whole model in one ONNX Runtime session "
          f"{meas['whole_model_latency'] * 1e3:.2f} ms")
    print("where the measured time went:")
    for sid, t in meas["stages"].items():
        print(f"  stage {sid} on {t['device']:<12} compute {t['compute'] * 1e3:7.2f} ms  "
              f"queue {t['queue'] * 1e3:6.2f} ms")
    print(f"  transport and runtime overhead   {meas['runtime_overhead'] * 1e3:7.2f} ms")
    ok = "OK" if r["verified"] else "MISMATCH"
    print(f"outputs vs the whole model: max |diff| = {r['max_abs_diff']:.2e}  {ok}")

