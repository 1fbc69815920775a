"""Link drift for real: a ``tc`` shaper inside a network namespace, then a plan switch.

The namespace (``adapt-<pid>-<n>``, removed in teardown) has only its loopback, with a
second address 127.0.0.2 for the hub's worker and an ``htb`` root qdisc. The client
(``runtime run --adapt``) and the edge's worker use 127.0.0.1. While requests stream, a
class limiting traffic *to* 127.0.0.2 to 2 Mbit/s is added: the executor's input sends
to the hub (timed until the hub's answer) slow down, the calibration's edge-hub link
factor grows, and the plan moves off the hub. Skipped where namespaces or ``htb`` are
not available (not root, no ``ip``/``tc``, a kernel without the qdisc).
"""
# ruff: noqa: F811  (pytest fixtures)

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.test_adapt_fixtures import Workers, build_solved
from tests.test_runtime_fixtures import ROOT, Built, reference, sample

_names = itertools.count()


def _sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def namespace() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("needs root, ip and tc")
    ns = f"adapt-{os.getpid()}-{next(_names)}"
    try:
        setup = [("ip", "netns", "add", ns),
                 ("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"),
                 ("ip", "netns", "exec", ns, "ip", "addr", "add", "127.0.0.2/8", "dev", "lo"),
                 ("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root",
                  "handle", "1:", "htb", "default", "10"),
                 ("ip", "netns", "exec", ns, "tc", "class", "add", "dev", "lo", "parent",
                  "1:", "classid", "1:10", "htb", "rate", "10gbit")]
        for cmd in setup:
            done = _sh(*cmd)
            if done.returncode != 0:
                pytest.skip(f"{' '.join(cmd)}: {done.stderr.strip()}")
        yield ns
    finally:
        _sh("ip", "netns", "del", ns)


def _shape_hub(ns: str, rate: str) -> None:
    """Traffic to the hub's address (127.0.0.2) at ``rate`` from now on."""
    x = ("ip", "netns", "exec", ns, "tc")
    for cmd in ((*x, "class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb",
                 "rate", rate),
                (*x, "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio",
                 "1", "u32", "match", "ip", "dst", "127.0.0.2/32", "flowid", "1:20")):
        done = _sh(*cmd)
        assert done.returncode == 0, done.stderr


def _hub_requests(ns: str, workers: Workers) -> int:
    """Requests the hub's unit ran, from its Prometheus endpoint inside the namespace."""
    port = workers.info["hub"]["metrics_port"]
    code = ("import urllib.request as u, sys; t = u.urlopen("
            f"'http://127.0.0.2:{port}/metrics', timeout=5).read().decode(); "
            "print(sum(float(l.split()[-1]) for l in t.splitlines() "
            "if l.startswith('runtime_unit_compute_seconds_count')))")
    done = _sh("ip", "netns", "exec", ns, sys.executable, "-c", code)
    return int(float(done.stdout.strip() or 0))


@pytest.fixture
def built(tmp_path: Path) -> Built:
    return build_solved(tmp_path / "b")


def test_shaped_link_to_the_hub_is_replanned_away_from(namespace, built, tmp_path) -> None:
    prefix = ("ip", "netns", "exec", namespace)
    workers = Workers(built, tmp_path, prefix=prefix)
    try:
        workers.start("edge", host="127.0.0.1")
        workers.start("hub", host="127.0.0.2")
        np.save(tmp_path / "x.npy", sample(3))
        hosts = ",".join(f"{d}={a}" for d, a in workers.hosts.items())
        n = 8000
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "runtime.cli", "run", str(built.bundle),
             "--hosts", hosts, "--input", f"input={tmp_path / 'x.npy'}", "--token-file",
             str(built.token_file), "-o", str(tmp_path / "out.npz"), "--json", "--quiet",
             "--repeat", str(n), "--concurrency", "2", "--adapt", "--model",
             str(built.model), "--system", str(built.system), "--adapt-window", "0.3",
             "--adapt-windows", "2", "--adapt-min-interval", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        shaped: list[int] = []

        def drift() -> None:
            while proc.poll() is None and _hub_requests(namespace, workers) == 0:
                time.sleep(0.1)
            start = time.monotonic()
            # at the latest half-way through the stream, however fast the host serves it
            while proc.poll() is None and time.monotonic() - start < 1.2 \
                    and _hub_requests(namespace, workers) < n // 2:
                time.sleep(0.05)
            if proc.poll() is None:
                _shape_hub(namespace, "2mbit")
                shaped.append(_hub_requests(namespace, workers))

        injector = threading.Thread(target=drift, daemon=True)
        injector.start()
        out, err = proc.communicate(timeout=600)
        injector.join(30)
    finally:
        workers.stop()
    assert proc.returncode == 0, err[-3000:]
    assert shaped and shaped[0] < n, "the requests were done before the drift"
    doc = json.loads(out)
    assert doc["summary"] == {"ok": n, "failed": 0, "lost": 0, "duplicated": 0}
    assert len(doc["switches"]) == 1, doc["switches"]
    sw = doc["switches"][0]
    assert (sw["from"], sw["to"]) == ("p0", "p1"), sw
    assert "links edge-hub" in sw["reason"], sw  # the executor's timed sends to the hub
    at = sw["at_request"]
    assert all("hub" not in {t["device"] for t in r["stages"]} for r in doc["runs"][at:])
    with np.load(tmp_path / "out.npz") as z:
        np.testing.assert_allclose(z["logits"], reference(built.model, sample(3)),
                                   rtol=1e-5, atol=1e-5)
