"""Where a chained request's time goes between the computes, step by step (issue 16).

Three ``runtime serve`` workers run a 3-stage bundle (FLOP-balanced, as in
``runtime_overhead.py``) and a :class:`runtime.executor.RemoteExecutor` sends one request at
a time. Every process time-stamps a few points of the message path with
``time.monotonic()`` (one clock on one host): a frame's header parsed, its body read, the
worker's handler and admission check, the unit's run, the forwarding and its send, and on
the executor the request's submit, the result's arrival and the caller woken. The marks go
into preallocated arrays (no Python object per mark, so the collector has nothing more to
walk). Each step is the median over the requests of the time between two consecutive
marks, so the steps add up to the request's median wall time to within the spread.

The second part times a worker's admission check (``Worker._admit``: the checks of one
message against the manifest and its inbox) in this process: back to back (the
interpreter's code and data in the CPU caches), after a 4 ms sleep, and after 64 MiB were
written (as another process's ORT run evicts the caches on a shared host). Inside a chain
the check runs cold, which is why each message's Python steps cost several times what they
cost in a loop.

    python benchmarks/message_path.py [--models alexnet,resnet18,mobilenet_v2]
        [--requests 300] [--out DIR] [--quick]

A worker under measurement is started as ``message_path.py --marks FILE -- <runtime serve
command>`` (the marks are written to FILE when it stops).
"""

from __future__ import annotations

import argparse
import atexit
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402  (after the path)
    chain_bundle,
    machine,
    save_figure,
    spawn_worker,
    stop_processes,
    write_results,
    zoo_models,
)

__all__ = ["Marks", "install_marks", "step_medians", "admission_times"]

DEVICES = ("edge", "hub", "cloud")
SHORT = {"executor": "ex", "edge": "edge", "hub": "hub", "cloud": "cloud"}
_UNORDERED = {"ex:request1"}


class Marks:
    """Time stamps with a tag each, in preallocated arrays (``capacity`` of them)."""

    def __init__(self, capacity: int = 1 << 18) -> None:
        self.times = np.zeros(capacity)
        self.codes = np.zeros(capacity, np.int32)
        self.tags: dict[str, int] = {}
        self.n = 0

    def mark(self, tag: str) -> None:
        if self.n < len(self.times):
            code = self.tags.setdefault(tag, len(self.tags))
            self.times[self.n], self.codes[self.n] = time.monotonic(), code
            self.n += 1

    def clear(self) -> None:
        self.n = 0

    def to_json(self) -> list[tuple[float, str]]:
        names = {c: t for t, c in self.tags.items()}
        return [(float(t), names[int(c)]) for t, c in
                zip(self.times[:self.n], self.codes[:self.n], strict=True)]


def _around(marks: Marks, cls: type, name: str, undo: list[Callable[[], None]],
            only: Callable[..., bool] | None = None) -> None:
    """Mark ``name`` + 0 / 1 before and after every call of ``cls.name``; ``undo`` gets
    what puts the method back."""
    orig = cls.__dict__.get(name)
    inherited = getattr(cls, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        if only is not None and not only(*args, **kwargs):
            return inherited(*args, **kwargs)
        marks.mark(name + "0")
        try:
            return inherited(*args, **kwargs)
        finally:
            marks.mark(name + "1")

    setattr(cls, name, timed)
    undo.append(lambda: setattr(cls, name, orig) if orig is not None else delattr(cls, name))


def install_marks(marks: Marks) -> Callable[[], None]:
    """Time-stamp the message path of this process's runtime (worker or executor); the
    function returned takes the marks out again.

    A body under 16 KiB is read together with its header (``runtime.transport``), so for
    such a frame "header" and "body" come together."""
    import runtime.executor as executor
    import runtime.pool as pool
    import runtime.server as server
    import runtime.stages as stages
    import runtime.worker as worker
    from runtime.sending import Sending

    recv = server.recv_frame

    def recv_frame(conn: Any, **kwargs: Any) -> Any:
        check = kwargs.get("check_header")

        def checked(header: dict[str, Any], body_len: int) -> None:
            if header.get("type") in ("infer", "result"):
                marks.mark("header")
            if check is not None:
                check(header, body_len)

        kwargs["check_header"] = checked
        frame = recv(conn, **kwargs)
        if frame.header.get("type") in ("infer", "result"):
            marks.mark("body")
        return frame

    server.recv_frame = recv_frame  # type: ignore[assignment]
    undo: list[Callable[[], None]] = [lambda: setattr(server, "recv_frame", recv)]
    _around(marks, worker.Worker, "_handle", undo,
            only=lambda self, frame, peer: frame.header.get("type") == "infer")
    _around(marks, worker.Worker, "_admit", undo)
    _around(marks, stages.StageRunner, "run", undo)
    _around(marks, Sending, "_forward", undo)
    _around(marks, pool.ConnectionPool, "send", undo)
    _around(marks, pool.ConnectionPool, "request", undo)
    _around(marks, executor.RemoteExecutor, "_gather", undo)

    def uninstall() -> None:
        for step in reversed(undo):
            step()

    return uninstall


def _worker_main(marks_path: Path, command: Sequence[str]) -> int:
    """Run ``command`` (``python -m runtime.cli serve ...``) here, with marks."""
    if list(command[1:3]) != ["-m", "runtime.cli"]:
        sys.exit(f"--marks: expected a 'python -m runtime.cli ...' command, got {command!r}")
    from runtime.cli import main

    marks = Marks()
    install_marks(marks)
    atexit.register(lambda: marks_path.write_text(json.dumps(marks.to_json())))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the CLI replaces it: it returns
    return main(list(command[3:]))


def step_medians(streams: dict[str, list[tuple[float, str]]]) -> dict[str, Any]:
    """The steps of the requests in ``streams`` (per process: its marks), in time order.

    A request is the executor's ``infer0`` to ``infer1``; a step is two consecutive marks
    of the merged streams, named ``process:tag -> process:tag``; only requests whose marks
    come in the most common order are used. The first stage's ``accepted`` answer reaches
    the executor while that stage computes, at no fixed point of the others' marks, so
    its mark is left out.
    """
    merged = sorted((t, f"{SHORT[p]}:{tag}") for p, marks in streams.items()
                    for t, tag in marks if f"{SHORT[p]}:{tag}" not in _UNORDERED)
    requests, current = [], None
    for t, tag in merged:
        if tag == "ex:infer0":
            current = [(t, tag)]
        elif current is not None:
            current.append((t, tag))
            if tag == "ex:infer1":
                requests.append(current)
                current = None
    orders: dict[tuple[str, ...], list[list[tuple[float, str]]]] = {}
    for r in requests:
        orders.setdefault(tuple(tag for _, tag in r), []).append(r)
    order, used = max(orders.items(), key=lambda kv: len(kv[1]))
    steps = []
    for i in range(len(order) - 1):
        gaps = [(r[i + 1][0] - r[i][0]) * 1e6 for r in used]
        steps.append({"from": order[i], "to": order[i + 1],
                      "median_us": statistics.median(gaps)})
    walls = [(r[-1][0] - r[0][0]) * 1e3 for r in used]
    return {"requests": len(requests), "used": len(used), "steps": steps,
            "wall_ms": statistics.median(walls)}


def _group(step: dict[str, Any]) -> str:
    """What a step is, for the summary: a unit's compute, a transfer (a send, the wire, a
    wake-up, a body read: where two processes' steps overlap in a large send they cannot
    be told apart, so they are one group), or a process's own Python steps."""
    a, b = step["from"].split(":", 1), step["to"].split(":", 1)
    if a[0] == b[0] and a[1] == "run0" and b[1] == "run1":
        return "compute"
    if a[0] != b[0] or a[1] in ("send0", "request0", "header") or b[1] in ("header", "body",
                                                                          "send1"):
        return "transfer"
    if a[1] == "_admit0":
        return "admission check"
    if a[0] == "ex":
        return "executor, other"
    if a[1] == "_handle1" and b[1] == "run0":
        return "to the unit (+ accepted answer)"
    if a[1] in ("run1", "_forward0", "send1"):
        return "forwarding"
    return "server and handler"


def admission_times(bundle: Path, repeats: int = 400) -> dict[str, float]:
    """Median ``Worker._admit`` of one message to the second unit (microseconds): back to
    back, after a 4 ms sleep, after 64 MiB were written."""
    from runtime.stages import open_bundle
    from runtime.worker import Worker

    view = open_bundle(bundle)
    first, second = list(view.units())[:2]
    worker = Worker(bundle, second.device)
    try:
        tensors = {t.name: np.zeros(t.shape, t.dtype)
                   for t in view.receives(second.key).values()}
        route = {d: f"127.0.0.1:{9000 + i}" for i, d in enumerate(DEVICES)}
        ids = iter(range(10**9))

        def header() -> dict[str, Any]:
            return {"type": "infer", "id": f"r-{next(ids)}", "attempt": 1, "plan": "main",
                    "from": first.key, "unit": second.key, "route": route,
                    "rows": {n: None for n in tensors}, "reply": "127.0.0.1:9009",
                    "budget": 30.0, "token": None, "timed": False,
                    "timings": [{"stage": first.key, "device": first.device, "wait": 0.0,
                                 "queue": 0.0, "compute": 0.003, "start": 1.0}]}

        junk = np.ones(64 << 20, np.uint8)

        def timed(before: Callable[[], Any] | None) -> float:
            heads = [header() for _ in range(repeats)]
            out = []
            for h in heads:
                if before is not None:
                    before()
                t = time.perf_counter()
                worker._admit(h, tensors)
                out.append(time.perf_counter() - t)
            return statistics.median(out) * 1e6

        timed(None)  # warm-up
        return {"back_to_back_us": timed(None),
                "after_4ms_sleep_us": timed(lambda: time.sleep(0.004)),
                "after_64MiB_written_us": timed(lambda: np.add(junk, 1, out=junk))}
    finally:
        worker.close()


def bench_model(name: str, n_requests: int, work: Path) -> dict[str, Any]:
    from runtime.executor import RemoteExecutor

    mdir = work / name
    mdir.mkdir()
    chain = chain_bundle(name, mdir, DEVICES, verify=True)
    bundle, feeds = chain.bundle, chain.feeds
    marks = Marks()
    uninstall = install_marks(marks)
    procs, hosts = [], {}
    try:
        for d in DEVICES:
            proc, host = spawn_worker(
                bundle, d, mdir / f"{d}.port", prefix=[
                    sys.executable, str(Path(__file__).resolve()), "--marks",
                    str(mdir / f"{d}.marks.json"), "--"])
            procs.append(proc)
            hosts[d] = host
        with RemoteExecutor(bundle, hosts, timeout=60) as rx:
            for _ in range(20):
                rx.infer(feeds)
            marks.clear()
            for _ in range(n_requests):
                marks.mark("infer0")
                rx.infer(feeds)
                marks.mark("infer1")
    finally:
        uninstall()  # so the next model's executor is marked once, not twice
        stop_processes(procs)
    streams = {"executor": marks.to_json()}
    for d in DEVICES:
        streams[d] = json.loads((mdir / f"{d}.marks.json").read_text())
    result = step_medians(streams)
    groups: dict[str, float] = {}
    for s in result["steps"]:
        s["group"] = _group(s)
        groups[s["group"]] = groups.get(s["group"], 0.0) + s["median_us"]
    result["groups_us"] = groups
    result["admission"] = admission_times(bundle)
    return {"model": name, **result}


def plot(doc: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["models"]
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.6 * len(rows)))
    names = sorted({g for r in rows for g in r["groups_us"] if g != "compute"})
    for i, r in enumerate(rows):
        left = 0.0
        for j, g in enumerate(names):
            width = r["groups_us"].get(g, 0.0) / 1e3
            ax.barh(i, width, left=left, color=f"C{j}", label=g if i == 0 else None)
            left += width
    ax.set_yticks(range(len(rows)), [r["model"] for r in rows])
    ax.set_xlabel("ms of one request outside the stages' computes (medians of steps)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"message path, 3 workers on one host ({doc['host']['cpu']})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, png)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--marks"]:
        if len(argv) < 4 or argv[2] != "--":
            sys.exit("usage: message_path.py --marks FILE -- <runtime serve command>")
        return _worker_main(Path(argv[1]), argv[3:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=zoo_models, default="alexnet,resnet18,mobilenet_v2")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="alexnet, 40 requests")
    args = p.parse_args(argv)
    names = ["alexnet"] if args.quick else args.models
    n = 40 if args.quick else args.requests
    if n < 1:
        p.error("--requests must be at least 1")
    host = machine()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in names:
            row = bench_model(name, n, Path(tmp))
            rows.append(row)
            outside = sum(v for g, v in row["groups_us"].items() if g != "compute")
            adm = row["admission"]
            print(f"{name}: {row['wall_ms']:.2f} ms per request, {outside / 1e3:.2f} ms "
                  f"outside the computes: " + ", ".join(
                      f"{g} {v:.0f} us" for g, v in row["groups_us"].items()
                      if g != "compute") +
                  f"; one admission {adm['back_to_back_us']:.1f} us back to back, "
                  f"{adm['after_4ms_sleep_us']:.1f} after 4 ms asleep, "
                  f"{adm['after_64MiB_written_us']:.1f} after 64 MiB written",
                  file=sys.stderr)
    doc = {"benchmark": "message_path", "quick": args.quick, "host": host,
           "requests": n, "threads": 1, "models": rows}
    return write_results("message_path", args.quick, args.out, doc, plot)


if __name__ == "__main__":
    sys.exit(main())
