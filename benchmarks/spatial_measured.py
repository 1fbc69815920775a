"""Spatial split measured (issue 11): one spatial plan run for real on 4 workers over
tc-shaped links, estimate vs measured, against the best layer-wise plan.

Four devices: ``hub`` (source and destination, in this namespace) and ``w1``..``w3``, each
``runtime serve`` worker of ``w<k>`` in its own network namespace ``sp2-<k>-<pid>`` behind a
veth pair whose two ends are shaped by ``tc tbf`` to that device's rate (the partition
sweep's method, with a bridge ``sp2b<pid>`` joining the veths so that the namespaces reach
each other too). The system file says the same: ``w<k>``'s network bandwidth is its
shaped rate, the hub's is not capped, every link's latency 0. The devices' FLOPS are
calibrated on this host (all four are its CPU): the best layer-wise plan (the whole model
on the hub: identical devices, slow links) is compiled and measured first, every device's
FLOPS set to the model's FLOPs over that measured mean, then both plans are recompiled on
the calibrated system and measured (the layer-wise estimate then equals its measurement up
to run-to-run noise: it is the calibration point).

Both plans are compiled with ``partitioner compile`` (``--spatial`` for the spatial one);
the benchmark then runs one image in flight (DISTREDGE's metric), ``--requests`` times,
and reports mean measured latency next to the plan's estimate.

**This host has 2 CPU cores shared by all four workers (and by other jobs: it is
loaded)**, so a split stage's parts do not compute in parallel here. Besides the estimate
(parts in parallel, as on four real devices) the output gives the *serial* estimate: the
same plan with every split stage's parts computing one after the other (its critical
part's transfers plus the sum of its parts' compute), the figure a 1-core host would
reach; with 2 cores the measurement can fall between the two.

Usage::

    python benchmarks/spatial_measured.py [--quick] [--model vgg16] [--image 224]
        [--mbps 300,200,100] [--requests 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, save_figure, spawn_worker, stop_processes, write_results  # noqa: E402
from benchmarks.partition_sweep import host_addresses, sh, whole_model_latency  # noqa: E402

WORKERS = ("w1", "w2", "w3")


def _names(pid: int) -> dict[str, Any]:
    """Namespace, interface names (<= 15 characters) and a free /24 for this run."""
    used = host_addresses()
    for step in range(200):
        net = f"10.232.{(pid + step) % 200 + 20}"
        if not any(a.startswith(net + ".") for a in used):
            break
    else:
        raise RuntimeError("no free /24 in 10.232.0.0/16")
    tag = str(pid)[-6:]
    return {"bridge": f"sp2b{tag}", "hub_ip": f"{net}.1",
            "workers": {w: {"ns": f"sp2-{k}-{tag}", "host_if": f"sp2h{k}{tag}",
                            "ns_if": f"sp2n{k}{tag}", "ip": f"{net}.{k + 1}"}
                        for k, w in enumerate(WORKERS, start=1)}}


@contextlib.contextmanager
def shaped_star(names: dict[str, Any], mbps: dict[str, float]) -> Iterator[None]:
    """A bridge here with the hub's address; per worker a namespace and a veth pair on the
    bridge, both ends shaped (tc tbf) to the worker's rate. Removed whatever ends the run."""
    made_ns: list[str] = []
    made_if: list[str] = []
    try:
        sh("ip", "link", "add", names["bridge"], "type", "bridge")
        made_if.append(names["bridge"])
        sh("ip", "addr", "add", f"{names['hub_ip']}/24", "dev", names["bridge"])
        sh("ip", "link", "set", names["bridge"], "up")
        for w, n in names["workers"].items():
            sh("ip", "netns", "add", n["ns"])
            made_ns.append(n["ns"])
            sh("ip", "link", "add", n["host_if"], "type", "veth", "peer", "name", n["ns_if"])
            made_if.append(n["host_if"])
            sh("ip", "link", "set", n["ns_if"], "netns", n["ns"])
            sh("ip", "link", "set", n["host_if"], "master", names["bridge"])
            sh("ip", "link", "set", n["host_if"], "up")
            sh("ip", "addr", "add", f"{n['ip']}/24", "dev", n["ns_if"], ns=n["ns"])
            sh("ip", "link", "set", n["ns_if"], "up", ns=n["ns"])
            sh("ip", "link", "set", "lo", "up", ns=n["ns"])
            for dev, ns in ((n["host_if"], None), (n["ns_if"], n["ns"])):
                sh("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbps[w]}mbit",
                   "burst", "64kb", "latency", "2s", ns=ns)
        yield
    finally:
        for dev in reversed(made_if):
            subprocess.run(["ip", "link", "del", dev], capture_output=True)
        for ns in made_ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def write_system(path: Path, flops: float, mbps: dict[str, float]) -> None:
    """The shaped star as a system file: the workers' NICs at their tc rates."""
    lines: list[str] = []
    rates = {"hub": 1e12, **{w: mbps[w] * 1e6 / 8 for w in WORKERS}}
    for name, rate in rates.items():
        lines += ["[[device]]", f'name = "{name}"', 'class = "edge"', f"flops = {flops:.6e}",
                  "memory_bandwidth = 1.0e12", f"network_bandwidth = {rate:.6e}",
                  "memory = 8.0e9", ""]
    names = list(rates)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            lines += ["[[link]]", f'between = ["{a}", "{b}"]', "bandwidth = 1.0e12",
                      "latency = 0.0", ""]
    lines += ["[application]", 'source = "hub"', 'destination = "hub"', ""]
    path.write_text("\n".join(lines))


def compile_cli(model: Path, system: Path, out: Path, spatial: bool) -> dict[str, Any]:
    """``partitioner compile`` (the command line), then the bundle's explain document."""
    cmd = [str(Path(sys.executable).with_name("partitioner")), "compile", str(model), "--system",
           str(system), "-o", str(out), "--force", "--quiet"] + (["--spatial"] if spatial else [])
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])}: {run.stderr.strip()[-600:]}")
    from partitioner.backend.explain import explain
    from partitioner.backend.manifest import load_bundle

    return explain(load_bundle(out))


def serial_estimate(doc: dict[str, Any]) -> float:
    """The estimate with each split stage's parts computing one after the other (a 1-core
    host): its critical part's transfers + the sum of its parts' compute."""
    latency = float(doc["estimate"]["latency"])
    for s in doc["stages"]:
        figs = s["estimate"] or {}
        if s["split"] and figs.get("parts"):
            crit = next(p for p in figs["parts"] if p["critical"])
            latency += sum(p["compute"] for p in figs["parts"]) - crit["compute"]
    return latency


def measure(bundle: Path, devices: Sequence[str], names: dict[str, Any], work: Path,
            feeds: Sequence[dict[str, Any]], warmup: int
            ) -> tuple[list[float], list[list[dict[str, Any]]]]:
    """One image in flight on the workers of ``devices`` (those the plan uses); per
    request its latency and timings."""
    from runtime.executor import RemoteExecutor

    token = work / "token"
    token.write_text("sp2-" + os.urandom(8).hex())
    token.chmod(0o600)
    procs, hosts = [], {}
    try:
        for dev in devices:
            n = names["workers"].get(dev)
            ip = names["hub_ip"] if n is None else n["ip"]
            proc, addr = spawn_worker(bundle, dev, work / f"{dev}.port", threads=1,
                                      listen=f"{ip}:0", timeout=180.0, log=work / f"{dev}.log",
                                      extra=["--token-file", str(token)],
                                      prefix=[] if n is None else ["ip", "netns", "exec", n["ns"]])
            procs.append(proc)
            hosts[dev] = addr
        lat: list[float] = []
        timings: list[list[dict[str, Any]]] = []
        with RemoteExecutor(bundle, hosts, token=token.read_text(),
                            listen=f"{names['hub_ip']}:0", timeout=180.0) as ex:
            for x in feeds[:warmup]:
                ex.infer(x)
            for x in feeds:
                ex.infer(x)
                lat.append(ex.records[-1]["latency"])
                timings.append(list(ex.records[-1].get("timings", [])))
        return lat, timings
    finally:
        stop_processes(procs, grace=10.0)


def _plan_summary(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for s in doc["stages"]:
        row: dict[str, Any] = {"id": s["id"], "layers": s["layers"], "split": s["split"],
                               "estimate": s["estimate"]}
        row["units"] = [{"device": u["device"], "rows": u["rows"]} for u in s["units"]]
        out.append(row)
    return out


def _network_messages(doc: dict[str, Any]) -> int:
    """Messages per request that cross a link (each costs a runtime hop not in the model)."""
    sends = [*doc["input_sends"], *(x for s in doc["stages"] for u in s["units"]
                                    for x in u["sends"])]
    return sum(1 for x in sends if x["network"])


def _measured_plan(kind: str, doc: dict[str, Any], lat: Sequence[float],
                   timings: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    est = doc["estimate"]
    p = {"estimate": est["latency"], "serial_estimate": serial_estimate(doc),
         "measured_mean": float(np.mean(lat)), "measured_std": float(np.std(lat)),
         "measured_min": float(np.min(lat)), "latencies": list(lat),
         "estimate_breakdown": {k: est[k] for k in ("compute", "communication",
                                                    "weight_loading")},
         "stages": _plan_summary(doc), "devices": doc["devices"],
         "network_messages": _network_messages(doc),
         # the workers' own compute per request, summed over units (on this host the
         # parts share 2 cores and time-slice, so each part's own figure is inflated)
         "measured_unit_compute_mean": float(np.mean(
             [sum(t.get("compute", 0.0) for t in ts) for ts in timings])),
         "last_timings": list(timings[-1]) if timings else []}
    split = [s for s in doc["stages"] if s["split"]]
    print(f"[spatial_measured] {kind}: {len(doc['stages'])} stages on "
          f"{', '.join(doc['devices'])}; split stages: " + ("; ".join(
              f"layers {s['layers'][0]}..{s['layers'][1]} rows " + ", ".join(
                  f"{u['device']} {u['rows'][0]}..{u['rows'][1]}" for u in s["units"])
              for s in split) or "none"), file=sys.stderr)
    print(f"[spatial_measured] {kind:9s}: estimate {p['estimate'] * 1e3:8.1f} ms "
          f"(serial {p['serial_estimate'] * 1e3:8.1f} ms), measured "
          f"{p['measured_mean'] * 1e3:8.1f} +- {p['measured_std'] * 1e3:.1f} ms; "
          f"{p['network_messages']} network messages per request; workers' compute "
          f"{p['measured_unit_compute_mean'] * 1e3:.1f} ms summed", file=sys.stderr)
    return p


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Calibrate, compile, measure: the layer-wise plan first (one device: it calibrates
    the devices' FLOPS through the runtime), then both plans recompiled on the calibrated
    system, and the spatial plan measured."""
    import models

    mbps = dict(zip(WORKERS, (float(v) for v in args.mbps.split(",")), strict=True))
    path = models.save_model(args.model, work / f"{args.model}.onnx", image_size=args.image)
    from partitioner.frontend import load_model

    graph = load_model(path).graph
    total_flops = sum(layer.flops for layer in graph.layers)
    whole = whole_model_latency(path, 1, runs=5 if args.quick else 15)
    print(f"[spatial_measured] {args.model} {args.image}x{args.image}: {total_flops / 1e9:.2f} "
          f"GFLOP, whole model {whole * 1e3:.1f} ms single-thread (ONNX Runtime) here",
          file=sys.stderr)
    system = work / "star.toml"
    write_system(system, total_flops / whole, mbps)
    names = _names(os.getpid())
    plans: dict[str, Any] = {}
    with shaped_star(names, mbps):
        first = compile_cli(path, system, work / "b_first", False)
        rng = np.random.default_rng(7)
        shape = [int(d) for d in first["model"]["inputs"][0]["shape"]]
        name = first["model"]["inputs"][0]["name"]
        feeds = [{name: rng.standard_normal(shape).astype(np.float32)}
                 for _ in range(args.requests)]
        lat, _ = measure(work / "b_first", first["devices"], names, work, feeds, warmup=2)
        if len(first["devices"]) != 1:
            raise RuntimeError(f"the layer-wise plan uses {first['devices']}: expected one "
                               "device (identical devices, shaped links)")
        # calibration: the single-device run through the runtime sets every device's FLOPS
        flops = total_flops / float(np.mean(lat))
        write_system(system, flops, mbps)
        print(f"[spatial_measured] calibrated on the single-device plan's measured mean "
              f"{np.mean(lat) * 1e3:.1f} ms -> {flops / 1e9:.2f} GFLOP/s per device",
              file=sys.stderr)
        for kind, spatial in (("layerwise", False), ("spatial", True)):
            doc = compile_cli(path, system, work / f"b_{kind}", spatial)
            lat, timings = measure(work / f"b_{kind}", doc["devices"], names, work, feeds,
                                   warmup=2)
            plans[kind] = _measured_plan(kind, doc, lat, timings)
    return {"model": args.model, "image_size": args.image, "total_flops": total_flops,
            "whole_model_latency_ort": whole, "device_flops": flops, "link_mbps": mbps,
            "requests": args.requests, "plans": plans}


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    m = doc.get("measured")
    if m:
        kinds = list(m["plans"])
        x = np.arange(len(kinds))
        get = [[m["plans"][k][f] * 1e3 for k in kinds]
               for f in ("estimate", "serial_estimate", "measured_mean")]
        for off, vals, label in zip((-0.27, 0, 0.27), get, (
                "estimate (parts in parallel)", "serial estimate (parts one after another)",
                "measured mean (this 2-core host)"), strict=True):
            ax.bar(x + off, vals, 0.26, label=label)
        ax.errorbar(x + 0.27, get[2], yerr=[m["plans"][k]["measured_std"] * 1e3 for k in kinds],
                    fmt="none", ecolor="k", capsize=3)
        ax.set_xticks(x, kinds)
        ax.set_ylabel("latency, one image in flight (ms)")
        ax.set_title(f"{m['model']} {m['image_size']}x{m['image_size']}, hub + 3 workers "
                     f"({', '.join(f'{v:g}' for v in m['link_mbps'].values())} Mbit/s, tc)",
                     fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        for k, style in zip(kinds, ("o-", "s-"), strict=False):
            ax2.plot(np.array(m["plans"][k]["latencies"]) * 1e3, style, label=k, ms=3)
        ax2.set_xlabel("request")
        ax2.set_ylabel("measured latency (ms)")
        ax2.set_title("per request (loaded shared host)", fontsize=9)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, doc.get("skipped", "not measured"), ha="center")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="vgg11 at 32x32, 5 requests (a smoke run; writes *_quick)")
    ap.add_argument("--model", default="vgg16")
    ap.add_argument("--image", type=int, default=224,
                    help="input height = width (VGG: 32 or a multiple of 224)")
    ap.add_argument("--mbps", default="300,200,100", help="w1,w2,w3 shaped rates (Mbit/s)")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--out", default=None, help="results folder")
    args = ap.parse_args()
    if args.quick:
        args.model, args.image, args.requests = "vgg11", 32, 5
    for sig in (signal.SIGTERM, signal.SIGHUP):  # `finally` removes namespaces and veths
        signal.signal(sig, lambda *_: sys.exit(128 + 15))
    doc: dict[str, Any] = {
        "benchmark": "spatial_measured", "quick": args.quick,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "python": platform.python_version(),
                    "loaded": "shared host, about 8 agents on 2 cores"},
        "note": "all four workers share this host's 2 CPU cores: a split stage's parts do "
                "not compute in parallel here; compare the measurement with the serial "
                "estimate (parts one after another) as well as the estimate (parallel, as "
                "on four devices)"}
    work = Path(tempfile.mkdtemp(prefix="sp2-"))
    try:
        if os.geteuid() == 0 and shutil.which("tc") is not None:
            doc["measured"] = run(args, work)
        else:
            doc["skipped"] = "needs root and tc"
            print("[spatial_measured] skipped: needs root and tc", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_results("spatial_measured", args.quick, args.out, doc, plot)


if __name__ == "__main__":
    sys.exit(main())
