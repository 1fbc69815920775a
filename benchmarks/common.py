"""Helpers every benchmark shares: where results go, worker processes, /proc samples.

Result files (the project rule): a full run writes ``results/<name>.json`` and ``.png``; a
``--quick`` run writes ``results/<name>_quick.json`` and ``.png`` and never touches the full
files, which are the ones ``benchmarks/README.md`` quotes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().with_name("results")

__all__ = ["ROOT", "RESULTS", "result_paths", "write_results", "save_figure", "split_by_flops",
           "chain_plan", "ChainBundle", "chain_bundle", "spawn_worker", "stop_processes",
           "rss_bytes", "peak_rss_bytes", "open_fds", "linear_slope", "machine", "zoo_model",
           "zoo_models"]


def machine() -> dict[str, Any]:
    """The measuring host, for a result file: CPU model, cores, memory, Python, and the
    load average now (``loaded``: above half the cores, i.e. other work shared them)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    load = os.getloadavg()
    cores = os.cpu_count() or 1
    return {"cpu": cpu, "cores": cores, "memory_gib": None if mem_gib is None
            else round(mem_gib, 1), "python": platform.python_version(),
            "load_average": list(load), "loaded": load[0] > cores / 2}


def zoo_model(name: str) -> str:
    """An ``argparse`` type: ``name`` if it is a zoo model, else a one-line usage error."""
    import argparse

    import models

    if name not in models.list_models():
        raise argparse.ArgumentTypeError(
            f"unknown model {name!r} (known: {', '.join(models.list_models())})")
    return name


def zoo_models(text: str) -> list[str]:
    """An ``argparse`` type: comma-separated zoo models, each checked by :func:`zoo_model`."""
    import argparse

    names = [m for m in text.split(",") if m]
    if not names:
        raise argparse.ArgumentTypeError("names no model")
    return [zoo_model(m) for m in names]


def result_paths(name: str, quick: bool, out: str | Path | None = None) -> tuple[Path, Path]:
    """``(json, png)`` of benchmark ``name``: ``<name>_quick.*`` for a ``--quick`` run.

    Args:
        name: the benchmark's name (its script's stem).
        quick: a ``--quick`` run (written beside, never over, the full results).
        out: the results folder (default ``benchmarks/results``).
    """
    folder = RESULTS if out is None else Path(out)
    stem = f"{name}_quick" if quick else name
    return folder / f"{stem}.json", folder / f"{stem}.png"


def write_results(name: str, quick: bool, out: str | Path | None, doc: Any,
                  plot: Callable[[Any, Path], None]) -> int:
    """Write ``doc`` as the benchmark's JSON (atomically) and ``plot(doc, png)``, print the
    two paths as one JSON line on stdout and return 0 (the script's exit code)."""
    from partitioner.analysis.profiles import write_json_atomic

    json_path, png_path = result_paths(name, quick, out)
    write_json_atomic(json_path, doc)
    plot(doc, png_path)
    print(json.dumps({"json": str(json_path), "png": str(png_path)}))
    return 0


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure atomically (a temporary file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def split_by_flops(flops: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cut layers with these FLOPs into ``parts`` contiguous ``(first, last)`` runs of
    about equal FLOPs (every run non-empty; fewer runs when there are fewer layers)."""
    weights = [max(1, f) for f in flops]
    parts = max(1, min(parts, len(weights)))
    total, cum, cuts = sum(weights), 0, []
    for i, w in enumerate(weights[:-1]):
        cum += w
        left = len(weights) - 1 - i  # layers after i, each run needs one
        if len(cuts) < parts - 1 and (cum >= total * (len(cuts) + 1) / parts
                                      or left == parts - 1 - len(cuts)):
            cuts.append(i)
    bounds, first = [], 0
    for c in cuts:
        bounds.append((first, c))
        first = c + 1
    bounds.append((first, len(weights) - 1))
    return bounds


def chain_plan(flops: Sequence[int], devices: Sequence[str]
               ) -> tuple[Any, list[tuple[int, int]]]:
    """A latency plan of one stage per device, in order, cut by :func:`split_by_flops`
    (fewer stages when there are fewer layers), and its ``(first, last)`` bounds."""
    from partitioner import ir

    bounds = split_by_flops(flops, len(devices))
    stages = tuple(ir.Stage(d, None, a, b)
                   for d, (a, b) in zip(devices, bounds, strict=False))
    return ir.Plan("optimal", "latency", stages, ir.Estimate(0.0, 0.0, 0.0, 0.0, 0.0),
                   0.0), bounds


@dataclass(frozen=True)
class ChainBundle:
    """A zoo model compiled as a chain (:func:`chain_bundle`)."""

    model: Path  # the whole model's .onnx
    layers: int
    bounds: list[tuple[int, int]]  # each stage's (first, last) layer
    bundle: Path
    view: Any  # runtime.stages.BundleView
    feeds: dict[str, Any]  # seeded N(0, 1) model inputs


def chain_bundle(name: str, folder: Path, devices: Sequence[str], *, verify: bool,
                 bundle_name: str = "bundle") -> ChainBundle:
    """Zoo model ``name`` saved in ``folder``, compiled to ``folder/bundle_name`` as one
    stage per device (:func:`chain_plan`), opened as the runtime opens it, with inputs."""
    import numpy as np
    import onnx

    import models
    from partitioner.backend import compile_bundle
    from partitioner.frontend import load_model
    from runtime.stages import open_bundle

    path = folder / f"{name}.onnx"
    onnx.save(models.build_model(name), str(path))
    prepared = load_model(path)
    plan, bounds = chain_plan([layer.flops for layer in prepared.graph.layers], devices)
    bundle = compile_bundle(prepared, plan, None, folder / bundle_name, verify=verify)
    view = open_bundle(bundle)
    feeds = {t.name: np.random.default_rng(0).standard_normal(t.shape).astype(t.dtype)
             for t in view.inputs}
    return ChainBundle(path, len(prepared.graph.layers), bounds, bundle, view, feeds)


def spawn_worker(bundle: str | Path, device: str, port_file: Path, *, threads: int = 1,
                 listen: str = "127.0.0.1:0", log: Path | None = None,
                 extra: Sequence[str] = (), prefix: Sequence[str] = (),
                 timeout: float = 120.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``runtime serve BUNDLE --device DEVICE --listen LISTEN``; ``(process, host:port)``.

    Waits for the worker's ``--port-file``; its stderr goes to ``log`` (else discarded).
    ``extra`` are more ``runtime serve`` options; ``prefix`` runs the command under another
    (e.g. ``ip netns exec NS``).

    Raises:
        RuntimeError: the worker exited or did not listen within ``timeout`` seconds.
    """
    port_file.unlink(missing_ok=True)
    sink = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    cmd = [*prefix, sys.executable, "-m", "runtime.cli", "serve", str(bundle), "--device",
           device, "--threads", str(threads), "--listen", listen, "--port-file",
           str(port_file), "--quiet", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sink)
    if log is not None:
        sink.close()  # type: ignore[union-attr]  # the child holds its own descriptor
    end = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None:
            tail = log.read_text()[-800:] if log is not None else ""
            raise RuntimeError(f"runtime serve --device {device} exited "
                               f"({proc.returncode}): {tail}")
        if time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"runtime serve --device {device}: not listening after "
                               f"{timeout:.0f} s")
        time.sleep(0.05)
    info: dict[str, Any] = json.loads(port_file.read_text())
    return proc, f"{info['host']}:{info['port']}"


def stop_processes(procs: Sequence[subprocess.Popen[Any]], grace: float = 5.0) -> None:
    """Terminate each process (these ids only), then kill what is left after ``grace``."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _status_bytes(pid: int | str, field: str) -> int | None:
    """Field ``field`` (in kB) of ``/proc/PID/status``, in bytes; None where absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (``VmRSS`` in ``/proc/PID/status``)."""
    return _status_bytes(pid, "VmRSS") or 0


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """Peak resident set of process ``pid`` so far (``VmHWM``), None where unknown.

    ``VmHWM`` belongs to the address space, so it starts afresh at ``exec``; ``getrusage``'s
    ``ru_maxrss`` does not (Linux carries the forking parent's over).
    """
    try:
        return _status_bytes(pid, "VmHWM")
    except OSError:  # not Linux, or the process is gone
        return None


def open_fds(pid: int) -> int:
    """Open file descriptors of process ``pid`` (entries of ``/proc/PID/fd``)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def linear_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs`` (0 with fewer than two distinct xs)."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
