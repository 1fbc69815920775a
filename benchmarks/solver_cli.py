"""``partitioner plan`` at 200 layers x 4 devices x 3 frequencies, MBS = L (issue 16).

Builds a chain of 200 MatMul nodes (``--granularity node``: one layer each), a system of
4 devices with 3 frequencies each, and full profiles (every bundle of 1..200 layers at
every frequency: 241,200 entries in 4 files) from a random profiled-looking table; then
times the CLI end to end (a fresh process, as a user runs it) and, in one process, where
its time goes (model, profiles, cost table, solve).

Usage: ``python benchmarks/solver_cli.py [--quick] [--repeats 3]``; writes
``results/solver_cli[_quick].json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from partitioner.analysis.profiles import write_json_atomic
from partitioner.solver.synthetic import TableSpec, random_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import machine  # noqa: E402

FREQS = ("614MHz", "922MHz", "1300MHz")


def write_case(root: Path, layers: int) -> list[str]:
    """Model, system and profiles under ``root``; returns the CLI arguments."""
    nodes, inits = [], []
    for k in range(layers):
        inits.append(numpy_helper.from_array(np.eye(8, dtype=np.float32), f"w{k}"))
        nodes.append(helper.make_node("MatMul", [f"t{k}" if k else "x", f"w{k}"],
                                      [f"t{k + 1}" if k + 1 < layers else "y"],
                                      name=f"mm{k}"))
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = root / "chain.onnx"
    onnx.save(model, path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    names = [f"mm{k}" for k in range(layers)]
    table = random_table(TableSpec(layers=layers, devices=4, frequencies=3, mbs=layers,
                                   source=False, destination=False), 0)
    lines = []
    for d, cls in zip(table.device_names, ("edge", "hub", "cloud", "edge"), strict=True):
        lines += ["[[device]]", f'name = "{d}"', f'class = "{cls}"', "flops = 1e9",
                  "memory_bandwidth = 1e9", "network_bandwidth = 1e8",
                  f"frequencies = {json.dumps(list(FREQS))}", ""]
    devs = table.device_names
    for a in range(len(devs)):
        for b in range(a + 1, len(devs)):
            lines += ["[[link]]", f'between = ["{devs[a]}", "{devs[b]}"]',
                      "bandwidth = 1e7", ""]
    (root / "system.toml").write_text("\n".join(lines))
    args = [str(path), "--system", str(root / "system.toml"), "--granularity", "node"]
    for d in devs:
        bundles = [{"first": i, "last": j, "frequency": FREQS[q],
                    "latency": table.bundles[i, j, d, f"{600 + 300 * q}MHz"].compute}
                   for q in range(3) for i in range(layers) for j in range(i, layers)]
        doc = {"device": d, "model": {"sha256": sha, "granularity": "node", "layers": names},
               "runs": 10, "trim": 0.1, "host": {}, "bundles": bundles}
        (root / f"{d}.json").write_text(json.dumps(doc))
        args += ["--profiles", str(root / f"{d}.json")]
    return args


def breakdown(args: list[str]) -> dict[str, float]:
    """Where one in-process plan spends its time."""
    from partitioner.analysis.costs import build_cost_table
    from partitioner.analysis.profiles import load_profile
    from partitioner.analysis.system import load_system
    from partitioner.frontend import load_model
    from partitioner.solver import solve

    t = [time.perf_counter()]
    c = [time.process_time()]

    def mark() -> None:
        t.append(time.perf_counter())
        c.append(time.process_time())

    prepared = load_model(args[0], granularity="node")
    mark()
    system = load_system(args[2])
    profiles = [load_profile(p, prepared.graph)
                for k, p in enumerate(args) if args[k - 1] == "--profiles"]
    mark()
    table = build_cost_table(prepared.graph, system, profiles=profiles)
    mark()
    solve(table)
    mark()
    parts = ("model", "profiles", "cost_table", "solve")
    # CPU seconds too: on the loaded host wall time is several times the CPU time
    return {**dict(zip(parts, np.diff(t).tolist(), strict=True)),
            **{f"{k}_cpu": v for k, v in zip(parts, np.diff(c).tolist(), strict=True)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="50 layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ns = parser.parse_args(argv)
    layers = 50 if ns.quick else 200
    doc: dict[str, Any] = {"quick": ns.quick, "layers": layers, "devices": 4,
                           "frequencies": 3, "machine_before": machine()}
    # as an installed package runs: with compiled bytecode (the first, untimed run writes
    # it where PYTHONDONTWRITEBYTECODE had kept it from being written)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.TemporaryDirectory() as tmp:
        args = write_case(Path(tmp), layers)
        doc["profile_entries"] = layers * (layers + 1) // 2 * 4 * 3
        command = [sys.executable, "-m", "partitioner", "plan", *args, "--json"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
        walls, cpus = [], []
        for _ in range(ns.repeats):
            t0 = time.perf_counter()
            before = os.times()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
            walls.append(time.perf_counter() - t0)
            after = os.times()
            cpus.append(after.children_user - before.children_user
                        + after.children_system - before.children_system)
        doc["cli_s"] = walls
        doc["cli_median_s"] = statistics.median(walls)
        doc["cli_cpu_s"] = cpus
        doc["cli_cpu_median_s"] = statistics.median(cpus)
        doc["machine_after"] = machine()
        parts = [breakdown(args) for _ in range(ns.repeats)]
        doc["breakdown_median_s"] = {k: statistics.median(p[k] for p in parts)
                                     for k in parts[0]}
    print(json.dumps(doc, indent=1), file=sys.stderr)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "solver_cli_quick" if ns.quick else "solver_cli"
    write_json_atomic(out / f"{stem}.json", doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
