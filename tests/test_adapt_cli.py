"""``runtime run --repeat N --concurrency C --adapt --json`` on real workers."""
# ruff: noqa: F811  (pytest fixtures)

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from tests.test_adapt_fixtures import (  # noqa: F401  (fixtures)
    Workers,
    built,
    workers,
)
from tests.test_runtime_fixtures import ROOT, Built, reference, sample


def _run(built: Built, workers: Workers, tmp_path: Path, *extra: str
         ) -> subprocess.Popen[str]:
    np.save(tmp_path / "x.npy", sample(3))
    hosts = ",".join(f"{d}={a}" for d, a in workers.hosts.items())
    return subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "run", str(built.bundle), "--hosts", hosts,
         "--input", f"input={tmp_path / 'x.npy'}", "--token-file", str(built.token_file),
         "-o", str(tmp_path / "out.npz"), "--json", "--quiet", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _hub_count(workers: Workers) -> int:
    units = workers.frame("hub", {"type": "metrics"})["units"]
    return sum(u["count"] for u in units)


def test_cli_adapt_switches_at_a_request_boundary(built, workers, tmp_path) -> None:
    n = 6000
    proc = _run(built, workers, tmp_path, "--repeat", str(n), "--concurrency", "2",
                "--adapt", "--model", str(built.model), "--system", str(built.system),
                "--adapt-window", "0.3", "--adapt-windows", "2",
                "--adapt-min-interval", "0")

    def drift() -> None:
        # once the client has been calibrating for a while (the reference windows of
        # the hub are taken at the start: 2 windows of 0.3 s), the hub becomes slow but
        # stays alive; at the latest half-way through the stream, however fast the host
        # serves it
        while proc.poll() is None and _hub_count(workers) == 0:
            time.sleep(0.05)
        start = time.monotonic()
        while proc.poll() is None and time.monotonic() - start < 1.5 \
                and _hub_count(workers) < n // 2:
            time.sleep(0.05)
        if proc.poll() is None:
            workers.slow_down("hub", 100.0)
            slowed.append(_hub_count(workers))

    slowed: list[int] = []

    injector = threading.Thread(target=drift, daemon=True)
    injector.start()
    out, err = proc.communicate(timeout=600)
    injector.join(10)
    assert proc.returncode == 0, err[-3000:]
    doc = json.loads(out)
    # today's keys stay, INTERFACES' are added
    assert {"mode", "output", "requests", "wall", "latency", "runs", "switches",
            "summary"} <= set(doc)
    assert slowed and slowed[0] < n, "the requests were done before the drift"
    assert doc["summary"] == {"ok": n, "failed": 0, "lost": 0, "duplicated": 0}
    assert doc["requests"] == len(doc["runs"]) == n
    for run in doc["runs"]:
        assert {"id", "ok", "latency", "plan", "exit", "error", "attempts", "retries",
                "stages"} <= set(run)
    assert len({r["id"] for r in doc["runs"]}) == n
    assert len(doc["switches"]) == 1, doc["switches"]
    sw = doc["switches"][0]
    assert set(sw) == {"at_request", "from", "to", "reason"}
    assert (sw["from"], sw["to"]) == ("p0", "p1") and "hub" in sw["reason"]
    at = sw["at_request"]
    plans = [r["plan"] for r in doc["runs"]]
    assert set(plans[:at]) == {"p0"} and set(plans[at:]) == {"p1"}
    assert all("hub" not in {t["device"] for t in r["stages"]} for r in doc["runs"][at:])
    with np.load(tmp_path / "out.npz") as z:
        np.testing.assert_allclose(z["logits"], reference(built.model, sample(3)),
                                   rtol=1e-5, atol=1e-5)


def test_cli_adapt_needs_the_model_and_system(built, workers, tmp_path) -> None:
    # ... when the bundle does not record them (compiled without the pipeline's
    # planning record; with it, the bundle alone is enough: tests/test_model_worker.py)
    manifest = built.bundle / "manifest.json"
    doc = json.loads(manifest.read_text())
    del doc["planning"]
    manifest.write_text(json.dumps(doc))
    proc = _run(built, workers, tmp_path, "--adapt")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == ""
    assert err.strip().splitlines()[-1] == (
        "runtime run: error: --adapt needs workers (not --local), --model and --system")
