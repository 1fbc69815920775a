"""Live adaptation under drift: latency over time with and without ``runtime run --adapt``.

Three ``runtime serve --model`` workers (edge, hub, cloud), each in its own network
namespace, joined by a bridge in a fourth namespace; every device's link to the bridge is
shaped with ``tc`` (netem delay, then a token bucket) in both directions. The client
(``runtime run BUNDLE --hosts ... --repeat N --json``) runs in the edge's namespace: the
edge is the source and the destination. Each device's worker is in its own CPU cgroup
(v1 ``cpu.cfs_quota_us``), so the edge is a slow device and a CPU hog can slow the hub
without taking more than the hub's own share of this shared host.

While the requests stream, the schedule (seconds from the client's start) is

1. ``baseline``: the links and CPUs of the system file;
2. ``link drift``: the hub's link drops to ``--drift-mbps`` (and, with ``--delays``, its
   delay grows to ``--drift-delay-ms``: netem, which this host's kernel lacks);
3. ``hub CPU hog``: the link recovers; busy processes join the hub's cgroup;
4. ``recovered``: the hog ends.

The same scenario runs without and with ``--adapt`` (fresh workers each time). Written:
per-request latency and plan over time (one plot, both runs, phases shaded), the time
from a drift to the first switch, the mean latency per phase and the speed-up of the
adapted run after switching, the requests lost and duplicated (from the client's
summary: must be 0), and the number of switches.

Needs root (``ip netns``, ``tc``, cgroup v1 ``cpu``). Usage::

    python benchmarks/adaptation.py            # full: 20 s phases
    python benchmarks/adaptation.py --quick    # 8 s phases -> results/adaptation_quick.*

Every namespace, veth, cgroup and process is named ``mw-<pid>-*`` and removed in
``finally``. The host is shared (2 cores, other jobs): figures are from a loaded host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import result_paths, save_figure, spawn_worker, stop_processes  # noqa: E402
from benchmarks.partition_sweep import host_addresses, sh, whole_model_latency  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ("edge", "hub", "cloud")
CGROUP = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000
TOKEN = "adaptation-benchmark-token"
DELAYS = False  # netem delays (--delays); needs the kernel's sch_netem
PHASES = ("baseline", "link drift", "hub CPU hog", "recovered")


@dataclass(frozen=True)
class Link:
    """One device's link to the bridge (each direction): rate and one-way delay."""

    mbps: float
    delay_ms: float


@dataclass(frozen=True)
class Scenario:
    links: dict[str, Link]
    cpu: dict[str, float]  # cores of each device's cgroup quota
    drift: Link  # the hub's link during the drift
    hogs: int  # busy processes in the hub's cgroup during the hog phase
    phase_s: float


@dataclass
class Net:
    """One run's namespaces and addresses (``mw-<pid>-<device>``, bridge ``mw-<pid>-sw``)."""

    pid: int
    subnet: str  # "10.233.X"
    ips: dict[str, str] = field(default_factory=dict)

    def ns(self, dev: str) -> str:
        return f"mw-{self.pid}-{dev}"

    def veth(self, dev: str, bridge_side: bool) -> str:  # <= 15 characters
        return f"mw{self.pid % 100000}{dev[0]}{'b' if bridge_side else ''}"


def free_subnet(pid: int) -> str:
    used = {a.rsplit(".", 1)[0] for a in host_addresses()}
    for step in range(200):
        sub = f"10.233.{(pid + step) % 200 + 20}"
        if sub not in used:
            return sub
    raise RuntimeError("no free /24 in 10.233.0.0/16")


def _qdisc(dev: str, ns: str, link: Link, verb: str) -> None:
    """A token bucket at the root, with a netem delay above it when ``--delays`` is on
    (``verb``: add or change). This host's kernel has no ``sch_netem``: delays are off by
    default, and only the rate is shaped."""
    if not DELAYS:
        sh("tc", "qdisc", verb, "dev", dev, "root", "handle", "1:", "tbf", "rate",
           f"{link.mbps}mbit", "burst", "64kb", "latency", "5s", ns=ns)
        return
    sh("tc", "qdisc", verb, "dev", dev, "root", "handle", "1:", "netem", "delay",
       f"{link.delay_ms}ms", ns=ns)
    sh("tc", "qdisc", verb, "dev", dev, "parent", "1:1", "handle", "10:", "tbf", "rate",
       f"{link.mbps}mbit", "burst", "64kb", "latency", "5s", ns=ns)


def shape(net: Net, dev: str, link: Link, verb: str = "change") -> None:
    """Shape ``dev``'s link both ways: its own veth end and the bridge's."""
    _qdisc(net.veth(dev, False), net.ns(dev), link, verb)
    _qdisc(net.veth(dev, True), net.ns("sw"), link, verb)


@contextlib.contextmanager
def network(links: dict[str, Link]) -> Iterator[Net]:
    """A bridge namespace and one namespace per device, each on a shaped veth pair."""
    net = Net(os.getpid(), free_subnet(os.getpid()))
    made: list[str] = []
    try:
        sw = net.ns("sw")
        sh("ip", "netns", "add", sw)
        made.append(sw)
        sh("ip", "link", "add", "mwbr", "type", "bridge", ns=sw)
        sh("ip", "link", "set", "mwbr", "up", ns=sw)
        for i, dev in enumerate(links):
            ns, inner, outer = net.ns(dev), net.veth(dev, False), net.veth(dev, True)
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer, ns=sw)
            sh("ip", "link", "set", inner, "netns", ns, ns=sw)
            sh("ip", "link", "set", outer, "master", "mwbr", ns=sw)
            sh("ip", "link", "set", outer, "up", ns=sw)
            net.ips[dev] = f"{net.subnet}.{i + 2}"
            sh("ip", "addr", "add", f"{net.ips[dev]}/24", "dev", inner, ns=ns)
            sh("ip", "link", "set", inner, "up", ns=ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
            shape(net, dev, links[dev], "add")
        yield net
    finally:
        for ns in reversed(made):  # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def cpu_groups(pid: int, cores: dict[str, float]) -> Iterator[dict[str, Path]]:
    """One cgroup (v1 ``cpu``) per device, its quota ``cores`` CPUs."""
    groups: dict[str, Path] = {}
    try:
        for dev, n in cores.items():
            g = CGROUP / f"mw-{pid}-{dev}"
            g.mkdir()
            groups[dev] = g
            (g / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (g / "cpu.cfs_quota_us").write_text(str(int(n * PERIOD_US)))
        yield groups
    finally:
        for g in groups.values():
            for p in (g / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (CGROUP / "cgroup.procs").write_text(p)
            with contextlib.suppress(OSError):
                g.rmdir()


def join(group: Path, pid: int) -> None:
    (group / "cgroup.procs").write_text(str(pid))


def system_toml(s: Scenario, core_flops: float) -> str:
    """The system file the plan is solved for: each device's FLOP/s is its cgroup's cores
    times ``core_flops`` (measured on this host); each pair's link is the slower of the
    two devices' links, delays added."""
    flops = {d: s.cpu[d] * core_flops for d in DEVICES}
    out = []
    for d in DEVICES:
        out.append(f'[[device]]\nname = "{d}"\nclass = "{d}"\nflops = {flops[d]:g}\n'
                   f'memory_bandwidth = 10e9\nnetwork_bandwidth = 1.25e9\n')
    for i, a in enumerate(DEVICES):
        for b in DEVICES[i + 1:]:
            la, lb = s.links[a], s.links[b]
            bw = min(la.mbps, lb.mbps) * 1e6 / 8
            delay = (la.delay_ms + lb.delay_ms) / 1e3 if DELAYS else 0.0  # as shaped
            out.append(f'[[link]]\nbetween = ["{a}", "{b}"]\nbandwidth = {bw:g}\n'
                       f'latency = {delay:g}\n')
    out.append('[application]\nsource = "edge"\ndestination = "edge"\n')
    return "\n".join(out)


def compile_scenario(work: Path, s: Scenario, image: int) -> tuple[Path, Path, float]:
    import models
    from partitioner import pipeline
    from partitioner.frontend import load_model

    model = models.save_model("tiny_cnn", work / "tiny_cnn.onnx", image_size=image)
    # one core's FLOP/s on this (loaded) host: the model's FLOPs over its ORT latency
    total = sum(layer.flops for layer in load_model(model).graph.layers)
    core_flops = total / whole_model_latency(model, threads=1)
    system = work / "system.toml"
    system.write_text(system_toml(s, core_flops))
    result = pipeline.compile(model, system, work / "bundle", force=True)
    return model, Path(str(result.bundle)), core_flops


def hog_processes(group: Path, n: int) -> list[subprocess.Popen[bytes]]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    for p in procs:
        join(group, p.pid)
    return procs


def schedule(net: Net, s: Scenario, groups: dict[str, Path], start: threading.Event,
             stop: threading.Event, events: list[dict[str, Any]], delay: float) -> None:
    """Apply the phases at their times, counted from ``delay`` s after ``start`` is set
    (the client's start-up: the stream begins then)."""
    start.wait()
    t0 = time.monotonic() + delay
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        for k, phase in enumerate(PHASES[1:], start=1):
            if stop.wait(max(0.0, t0 + k * s.phase_s - time.monotonic())):
                return
            if phase == "link drift":
                shape(net, "hub", s.drift)
            elif phase == "hub CPU hog":
                shape(net, "hub", s.links["hub"])
                hogs = hog_processes(groups["hub"], s.hogs)
            else:
                stop_processes(hogs)
                hogs = []
            events.append({"phase": phase, "at": time.monotonic() - t0})
    finally:
        stop_processes(hogs)


def run_scenario(work: Path, s: Scenario, model: Path, bundle: Path, adapt: bool,
                 requests: int | None, x: Path, adapt_args: list[str]) -> dict[str, Any]:
    """Fresh namespaces, cgroups and workers; one streaming client; the schedule.

    ``requests``: how many the client sends; None: enough to outlast the schedule at the
    latency of a 10-request warm-up (which also has the workers build their stages).
    """
    token = work / "token"
    token.write_text(TOKEN + "\n")
    os.chmod(token, 0o600)
    procs: list[subprocess.Popen[bytes]] = []
    events: list[dict[str, Any]] = []
    with network(s.links) as net, cpu_groups(net.pid, s.cpu) as groups:
        start, stop = threading.Event(), threading.Event()
        timer: threading.Thread | None = None
        try:
            hosts = {}
            for d in DEVICES:
                proc, hosts[d] = spawn_worker(
                    f"--model={model}", d, work / f"{d}.port", listen=f"{net.ips[d]}:0",
                    log=work / f"{d}-{'adapt' if adapt else 'fixed'}.log",
                    extra=["--token-file", str(token)],
                    prefix=["ip", "netns", "exec", net.ns(d)])
                procs.append(proc)
                join(groups[d], proc.pid)
            base = ["ip", "netns", "exec", net.ns("edge"), sys.executable, "-m",
                    "runtime.cli", "run", str(bundle), "--hosts",
                    ",".join(f"{d}={a}" for d, a in hosts.items()), "--input",
                    f"input={x}", "--token-file", str(token), "--listen",
                    f"{net.ips['edge']}:0", "--json", "-o", str(work / "out.npz"),
                    "--quiet"]
            for _ in range(2):  # the first has the workers build their stages
                began = time.monotonic()
                warm = subprocess.run([*base, "--repeat", "10"], capture_output=True,
                                      text=True, timeout=300, cwd=ROOT)
                warm_wall = time.monotonic() - began
            if warm.returncode != 0:
                raise RuntimeError(f"warm-up run failed: {warm.stderr.strip()[-600:]}")
            warm_latency = float(np.median([r["latency"] for r in
                                            json.loads(warm.stdout)["runs"]]))
            if requests is None:
                requests = int(len(PHASES) * s.phase_s / warm_latency)
            # the client's start-up (imports, connections): the warm-up's wall time less
            # its requests
            startup = max(0.0, warm_wall - sum(r["latency"] for r in
                                               json.loads(warm.stdout)["runs"]))
            timer = threading.Thread(target=schedule,
                                     args=(net, s, groups, start, stop, events, startup))
            cmd = [*base, "--repeat", str(requests)] + (["--adapt", *adapt_args] if adapt
                                                         else [])
            timer.start()
            t0 = time.time()
            client = subprocess.Popen(cmd, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
            start.set()
            out, err = client.communicate(timeout=60 * s.phase_s)
            wall = time.time() - t0
        finally:
            start.set()
            stop.set()
            if timer is not None and timer.is_alive():
                timer.join()
            stop_processes(procs)
    try:
        doc = json.loads(out)
    except json.JSONDecodeError:
        raise RuntimeError(f"runtime run{' --adapt' if adapt else ''} failed "
                           f"({client.returncode}): {err.strip()[-600:]}") from None
    doc["returncode"] = client.returncode
    doc["stderr_tail"] = err.strip().splitlines()[-20:]
    return {"adapt": adapt, "wall": wall, "t0": t0 + startup, "events": events, "client": doc,
            "requests": requests, "warm_latency": warm_latency}


def request_times(runs: list[dict[str, Any]], wall: float, t0: float) -> list[float]:
    """When each request finished, s after the client started (when the schedule
    starts, wall clock ``t0``).

    From the workers' own stamps when the client reports them (``stages[].start``: the
    wall clock each unit started, the same clock here, every worker on this host): the
    first unit's start plus the latency. Otherwise the running sum of the latencies
    (requests are sent one after another) after the client's start-up, taken as its
    wall time less the requests' total (which misplaces requests by the client's own
    time between them).
    """
    lat = [float(r["latency"] or 0.0) for r in runs]
    starts = [min((st["start"] for st in r.get("stages") or ()
                   if isinstance(st.get("start"), (int, float))), default=None)
              for r in runs]
    if runs and all(x is not None for x in starts):
        return [float(x or 0.0) - t0 + la for x, la in zip(starts, lat, strict=True)]
    startup = max(0.0, wall - sum(lat))
    return [startup + t for t in np.cumsum(lat)]


def summarise(run: dict[str, Any], s: Scenario) -> dict[str, Any]:
    runs = run["client"]["runs"]
    times = request_times(runs, run["wall"], run["t0"])
    lat = [r["latency"] for r in runs]
    phase_of = [min(max(0, int(t // s.phase_s)), len(PHASES) - 1) for t in times]
    per_phase = {}
    for k, name in enumerate(PHASES):
        mine = [la for la, p in zip(lat, phase_of, strict=True) if p == k]
        per_phase[name] = {"requests": len(mine),
                           "mean": float(np.mean(mine)) if mine else None,
                           "p90": float(np.percentile(mine, 90)) if mine else None}
    switches = run["client"].get("switches", [])
    switch_times = [{"at": times[sw["at_request"]] if sw["at_request"] < len(times) else None,
                     **sw} for sw in switches]
    summary = run["client"].get("summary") or {}
    windows = (run["client"].get("adaptation") or {}).get("windows") or []
    t0 = run["t0"]
    return {"adaptation": [{**w, "time": w["time"] - t0} for w in windows],
            "failed_switches": (run["client"].get("adaptation") or {}).get(
                "failed_switches", []),
            "client_log": run["client"].get("stderr_tail", []),
            "requests": len(runs), "per_phase": per_phase, "switches": switch_times,
            "n_switches": len(switches),
            "lost": summary.get("lost"), "duplicated": summary.get("duplicated"),
            "failed": summary.get("failed", sum(1 for r in runs if r.get("ok") is False)),
            "plans": sorted({str(r.get("plan")) for r in runs}),
            "series": [{"t": t, "latency": la, "plan": r.get("plan")}
                       for t, la, r in zip(times, lat, runs, strict=True)]}


def time_to_switch(summary: dict[str, Any], s: Scenario) -> dict[str, float | None]:
    """Per drift phase: seconds from its start to the first switch inside it."""
    out: dict[str, float | None] = {}
    for k, name in enumerate(PHASES[1:], start=1):
        begin, end = k * s.phase_s, (k + 1) * s.phase_s
        inside = [sw["at"] for sw in summary["switches"]
                  if sw["at"] is not None and begin <= sw["at"] < end]
        out[name] = min(inside) - begin if inside else None
    return out


def after_switches(results: dict[str, Any], s: Scenario) -> list[dict[str, Any]]:
    """Per switch of the adapted run: its mean latency from the switch to the end of that
    phase against the fixed plan's over the same seconds (the speed-up of switching)."""
    out = []
    for sw in results["adapt"]["switches"]:
        if sw["at"] is None:
            continue
        end = (int(sw["at"] // s.phase_s) + 1) * s.phase_s

        def mean(key: str, begin: float = sw["at"], stop: float = end) -> float | None:
            xs = [p["latency"] for p in results[key]["series"] if begin <= p["t"] < stop]
            return float(np.mean(xs)) if xs else None
        a, f = mean("adapt"), mean("fixed")
        out.append({"at": sw["at"], "until": end, "to": sw["to"], "adapt_mean": a,
                    "fixed_mean": f, "speedup": f / a if a and f else None})
    return out


def plot(results: dict[str, Any], s: Scenario, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2))
    for k, name in enumerate(PHASES):
        ax.axvspan(k * s.phase_s, (k + 1) * s.phase_s, color=f"C{k}", alpha=0.07)
        ax.text((k + 0.5) * s.phase_s, 1.0, name, transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8)
    for key, style in (("fixed", "o"), ("adapt", "x")):
        if key not in results:
            continue
        series = results[key]["series"]
        ax.plot([p["t"] for p in series], [p["latency"] * 1e3 for p in series], style,
                ms=3, alpha=0.7, label=f"{'--adapt' if key == 'adapt' else 'fixed plan'}")
        for sw in results[key]["switches"]:
            if sw["at"] is not None:
                ax.axvline(sw["at"], color="k", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("time since the stream started (s)")
    ax.set_ylabel("request latency (ms)")
    ax.set_title(title, fontsize=9, pad=14)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    save_figure(fig, png)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 s phases (results *_quick)")
    ap.add_argument("--phase", type=float, default=None, help="seconds per phase")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--drift-mbps", type=float, default=20.0,
                    help="the hub's link during the drift (at 4 Mbit/s the probes queue "
                         "behind a request's input for over a second: the executor takes "
                         "the hub for dead)")
    ap.add_argument("--drift-delay-ms", type=float, default=40.0)
    ap.add_argument("--hogs", type=int, default=3)
    ap.add_argument("--delays", action="store_true",
                    help="also shape one-way delays with netem (needs sch_netem)")
    ap.add_argument("--no-adapt-only", action="store_true",
                    help="only the fixed-plan run (the client without --adapt)")
    ap.add_argument("--out", default=None, help="results folder")
    ap.add_argument("--adapt-min-interval", type=float, default=None,
                    help="runtime run --adapt-min-interval (default: the client's; --quick: "
                         "5 s, its phases being 8 s)")
    args = ap.parse_args(argv)
    interval = args.adapt_min_interval if args.adapt_min_interval is not None else \
        (5.0 if args.quick else None)
    adapt_args = [] if interval is None else ["--adapt-min-interval", str(interval)]
    global DELAYS
    DELAYS = args.delays
    if os.geteuid() != 0:
        print("adaptation: needs root (ip netns, tc, cgroups)", file=sys.stderr)
        return 2
    s = Scenario(links={"edge": Link(400, 1), "hub": Link(200, 2), "cloud": Link(150, 15)},
                 cpu={"edge": 0.15, "hub": 1.0, "cloud": 1.0},
                 drift=Link(args.drift_mbps, args.drift_delay_ms), hogs=args.hogs,
                 phase_s=args.phase or (8.0 if args.quick else 20.0))
    json_path, png_path = result_paths("adaptation", args.quick, args.out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mw-adaptation-") as tmp:
        work = Path(tmp)
        model, bundle, core_flops = compile_scenario(work, s, args.image_size)
        x = work / "x.npy"
        np.save(x, np.random.default_rng(0).standard_normal(
            (1, 3, args.image_size, args.image_size)).astype(np.float32))
        requests: int | None = None  # set by the first run's warm-up, then the same
        modes = [False] if args.no_adapt_only else [False, True]
        for adapt in modes:
            run = run_scenario(work, s, model, bundle, adapt, requests, x, adapt_args)
            requests = run["requests"]
            summary = summarise(run, s)
            summary["warm_latency"] = run["warm_latency"]
            summary["wall"] = run["wall"]
            summary["time_to_switch"] = time_to_switch(summary, s)
            summary["events"] = run["events"]
            results["adapt" if adapt else "fixed"] = summary
        plan = json.loads((bundle / "manifest.json").read_text())["plan"]
    speedup: dict[str, float | None] = {}
    after: list[dict[str, Any]] = []
    if "adapt" in results:
        after = after_switches(results, s)
        for name in PHASES:
            a = results["adapt"]["per_phase"][name]["mean"]
            f = results["fixed"]["per_phase"][name]["mean"]
            speedup[name] = f / a if a and f else None
    doc = {"benchmark": "adaptation", "quick": args.quick,
           "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                    "loaded": "shared host, other jobs running"},
           "scenario": {"links": {d: vars(v) for d, v in s.links.items()},
                        "cpu_cores": s.cpu, "drift": vars(s.drift), "hogs": s.hogs,
                        "phase_s": s.phase_s, "image_size": args.image_size,
                        "model": "tiny_cnn", "core_flops": core_flops},
           "initial_plan": [{"device": st["device"], "layers": st["layers"]}
                            for st in plan["stages"]],
           "adapt_args": adapt_args, "speedup_per_phase": speedup,
           "after_switches": after, "results": results}
    tmp_json = json_path.with_name(f".{json_path.name}.tmp")
    tmp_json.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp_json, json_path)
    plot(results, s, png_path, "tiny_cnn, 3 workers in network namespaces (tc-shaped); "
         "loaded 2-core host")
    for key, r in results.items():
        print(f"{key}: {r['requests']} requests, switches {r['n_switches']}, lost "
              f"{r['lost']}, duplicated {r['duplicated']}; mean ms per phase "
              + ", ".join(f"{n}: {v['mean'] * 1e3:.1f}" if v["mean"] else f"{n}: -"
                          for n, v in r["per_phase"].items()))
    for a in after:
        print(f"after the switch at {a['at']:.1f} s to {a['to']}: {a['adapt_mean'] * 1e3:.1f} "
              f"ms vs the fixed plan's {a['fixed_mean'] * 1e3:.1f} ms "
              f"(x{a['speedup']:.2f}) until {a['until']:.0f} s")
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
