"""Worker monitoring: per-unit and per-link figures, /proc figures, Prometheus text."""
# ruff: noqa: F811  (pytest fixtures)

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.executor import RemoteExecutor
from runtime.metrics import LINK_SAMPLE, MIN_LINK_BYTES, WorkerMetrics, prometheus_text
from runtime.transport import connect, recv_frame, send_frame
from tests.test_adapt_fixtures import Workers
from tests.test_runtime_fixtures import TOKEN, Built, build, sample


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The runtime tests' hand-made 3-stage chain (edge -> hub -> cloud)."""
    return build(tmp_path_factory.mktemp("metrics-bundle"), fallbacks=False)


@pytest.fixture(scope="module")
def workers(chain: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    w = Workers(chain, tmp_path_factory.mktemp("metrics-workers")).start_all(
        ("edge", "hub", "cloud"))
    yield w
    w.stop()


def _families(text: str) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """Prometheus text -> family -> (sample name, sorted labels) -> value."""
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(fam.name, {})[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _probe(addr: tuple[str, int], header: dict[str, object]) -> dict[str, object]:
    with connect(addr, 5.0) as sock:
        send_frame(sock, header)
        return dict(recv_frame(sock, max_body=0, frame_timeout=10.0).header)


def test_metrics_endpoint_parses_and_counts_what_ran(chain, workers) -> None:
    n = 12
    with RemoteExecutor(chain.bundle, workers.hosts, token=TOKEN, timeout=30) as ex:
        ex.time_links = True  # as live adaptation does: workers time some sends
        for i in range(n):
            ex.infer({"input": sample(i)})
        records = list(ex.records)
    port = workers.info["hub"]["metrics_port"]
    assert isinstance(port, int) and port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    fams = _families(text)
    unit = (("device", "hub"), ("plan", "main"), ("unit", "1"))
    assert fams["runtime_unit_compute_seconds"][
        ("runtime_unit_compute_seconds_count", unit)] == n
    # the compute the hub reports is the compute the results carried, request by request
    carried = sum(t["compute"] for r in records for t in r["timings"] if t["device"] == "hub")
    assert fams["runtime_unit_compute_seconds"][
        ("runtime_unit_compute_seconds_sum", unit)] == pytest.approx(carried, rel=0.1)
    # the hub sends `flatten` to the cloud once per request: exactly its bytes
    view = ex.views["main"]
    nbytes = sum(t.nbytes for t in view.unit_map["2"].receives)
    link = (("device", "hub"), ("peer", "cloud"))
    assert fams["runtime_link_sent_bytes"][("runtime_link_sent_bytes_total", link)] == n * nbytes
    assert fams["runtime_link_transfers"][("runtime_link_transfers_total", link)] == n
    # one transfer in LINK_SAMPLE (the first included) waited for the cloud's answer
    acked = fams["runtime_link_acked_transfer_seconds"][
        ("runtime_link_acked_transfer_seconds", link)]
    assert 0 < acked < 30
    snap = workers.frame("hub", {"type": "metrics"})
    (to_cloud,) = [k for k in snap["links"] if k["peer"] == "cloud"]
    assert to_cloud["acked"] == (n + LINK_SAMPLE - 1) // LINK_SAMPLE
    assert to_cloud["acked_bytes"] == pytest.approx(nbytes)
    # the cloud's results go to the destination device's executor: link cloud -> edge
    cloud = workers.frame("cloud", {"type": "metrics"})
    assert [k["peer"] for k in cloud["links"]] == ["edge"]
    assert cloud["links"][0]["count"] == n
    assert fams["runtime_host_cpus"][("runtime_host_cpus", (("device", "hub"),))] >= 1
    assert fams["runtime_process_resident_memory_bytes"][
        ("runtime_process_resident_memory_bytes", (("device", "hub"),))] > 10e6
    assert fams["runtime_requests"][
        ("runtime_requests_total", (("device", "hub"), ("outcome", "completed")))] >= n
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/secret", timeout=10)


def test_health_carries_metrics_only_with_the_token(chain, workers) -> None:
    addr = ("127.0.0.1", int(workers.info["cloud"]["port"]))
    assert "metrics" not in _probe(addr, {"type": "health"})
    assert "metrics" not in _probe(addr, {"type": "health", "token": "wrong"})
    snap = _probe(addr, {"type": "health", "token": TOKEN})["metrics"]
    assert isinstance(snap, dict) and snap["device"] == "cloud"
    assert snap["host"]["mem_total"] > snap["host"]["mem_available"] > 0
    assert snap["process"]["threads"] >= 2
    # the authenticated metrics frame says the same; without the token it is refused
    assert _probe(addr, {"type": "metrics", "token": TOKEN})["device"] == "cloud"
    assert _probe(addr, {"type": "metrics"})["type"] == "error"


def test_debug_frames_need_a_worker_started_for_them(chain, tmp_path) -> None:
    from runtime.worker import Worker

    w = Worker(chain.bundle, "cloud", token=TOKEN).start()
    try:
        reply = _probe(w.address, {"type": "debug", "slowdown": 5, "token": TOKEN})
        assert reply["type"] == "error" and "--debug-slowdown" in str(reply["message"])
        assert w.slowdown is None
    finally:
        w.close()


def test_slowdown_shows_in_the_measured_compute(chain, workers) -> None:
    with RemoteExecutor(chain.bundle, workers.hosts, token=TOKEN, timeout=30) as ex:
        x = {"input": sample(1)}
        for _ in range(5):
            ex.infer(x)
        base = np.median([t["compute"] for r in ex.records for t in r["timings"]
                          if t["device"] == "edge"])
        workers.slow_down("edge", 20.0)
        try:
            for _ in range(5):
                ex.infer(x)
        finally:
            workers.slow_down("edge", 1.0)
        slow = np.median([t["compute"] for r in list(ex.records)[-5:]
                          for t in r["timings"] if t["device"] == "edge"])
    assert slow > 5 * base


def test_prometheus_text_escapes_labels_and_skips_unknowns() -> None:
    m = WorkerMetrics('dev"ice\\x\n')
    m.record_unit("fallback/without-hub", "3.1", 0.5, 0.25, 0.125)
    m.record_unit("fallback/without-hub", "3.1", 1.5, 0.75, 0.125)
    m.record_send("peer", MIN_LINK_BYTES, 0.5)
    m.record_send("peer", 10, 0.5)  # too small for the throughput figure
    snap = m.snapshot({"completed": 2})
    snap["host"]["load1"] = None  # a figure /proc did not give is left out, not 0
    text = prometheus_text(snap)
    fams = _families(text)
    unit = (("device", 'dev"ice\\x\n'), ("plan", "fallback/without-hub"), ("unit", "3.1"))
    assert fams["runtime_unit_compute_seconds"][("runtime_unit_compute_seconds_sum", unit)] == 2.0
    assert fams["runtime_unit_queue_seconds"][("runtime_unit_queue_seconds_count", unit)] == 2
    link = (("device", 'dev"ice\\x\n'), ("peer", "peer"))
    assert fams["runtime_link_throughput_bytes_per_second"][
        ("runtime_link_throughput_bytes_per_second", link)] == MIN_LINK_BYTES / 0.5
    assert fams["runtime_link_sent_bytes"][("runtime_link_sent_bytes_total", link)] == \
        MIN_LINK_BYTES + 10
    assert "runtime_host_load1{" not in text
    json.dumps(snap)  # what health/metrics frames carry is plain JSON


def test_port_file_names_the_metrics_port(workers) -> None:
    info = json.loads(Path(workers.work / "hub.port.json").read_text())
    assert info["metrics_port"] == workers.info["hub"]["metrics_port"]
