"""Reliability: killing a worker mid-stream, restarting it, re-planning without a device."""
# ruff: noqa: F811  (pytest fixtures are imported from tests.test_runtime_fixtures)

from __future__ import annotations

import os
import signal
import socket
import time

import numpy as np
import pytest

from runtime.executor import RemoteExecutor, RequestError
from runtime.replan import Replanner
from tests.test_runtime_fixtures import (  # noqa: F401  (fixtures)
    TOKEN,
    build,
    built,
    reference,
    sample,
    start_cluster,
)


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def _state(pid: int) -> str:
    """The process state letter from /proc (``T``: stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait(cond, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_kill_worker_mid_stream_then_restart(built, tmp_path) -> None:
    cluster = start_cluster(built, tmp_path)
    try:
        xs = [sample(200 + i) for i in range(40)]
        hub_port = int(cluster.info["hub"]["port"])  # type: ignore[call-overload]
        with RemoteExecutor(built.bundle, cluster.hosts, token=TOKEN, timeout=20,
                            probe_interval=0.1) as ex:
            futs = []
            for i, x in enumerate(xs):
                futs.append(ex.submit({"input": x}))
                if i == 15:
                    cluster.kill("hub")  # requests are queued at / in flight to the hub
                time.sleep(0.004)
            done = 0
            for fut, x in zip(futs, xs, strict=True):
                try:
                    out = fut.result(40)
                except RequestError as err:  # allowed, but it must say which request
                    assert fut.request_id in str(err)
                    continue
                np.testing.assert_allclose(out["logits"], reference(built.model, x),
                                           rtol=1e-5, atol=1e-5)
                done += 1
            # the fallback without the hub exists, so no request may be lost
            assert done == len(xs)
            ids = [r["id"] for r in ex.records]
            assert sorted(ids) == sorted(f.request_id for f in futs)  # each answered once
            plans = [r["plan"] for r in ex.records]
            assert plans[0] == "main" and "fallback/without-hub" in plans
            assert "hub" in ex.down
            rerouted = [r for r in ex.records if r["plan"] != "main"]
            assert all(t["device"] == "edge" for r in rerouted for t in r["timings"])

            # a restarted worker is picked up without restarting anything else
            cluster.start("hub", port=hub_port)
            assert _wait(lambda: "hub" not in ex.down), "the restarted hub was not noticed"
            x = sample(999)
            out = ex.infer({"input": x})
            assert ex.records[-1]["plan"] == "main"
            np.testing.assert_allclose(out["logits"], reference(built.model, x), rtol=1e-5,
                                       atol=1e-5)
    finally:
        cluster.stop()


def test_no_live_plan_fails_fast_naming_the_request(built) -> None:
    hosts = {d: f"127.0.0.1:{_free_port()}" for d in ("edge", "hub", "cloud")}
    with RemoteExecutor(built.bundle, hosts, timeout=10, probe_interval=0.1) as ex:
        fut = ex.submit({"input": sample(0)}, request_id="req-dead-1")
        t0 = time.monotonic()
        with pytest.raises(RequestError, match="request req-dead-1: no plan avoids"):
            fut.result(15)
        assert time.monotonic() - t0 < 5  # not the 10 s timeout: every host refused
        # main (edge, hub, cloud) and the fallbacks (hub only; edge only) were all tried
        assert {"edge", "hub"} <= ex.down


def test_replan_on_demand_with_solver_and_backend(tmp_path) -> None:
    fresh = build(tmp_path / "b", fallbacks=False)  # the bundle carries no fallback
    cluster = start_cluster(fresh, tmp_path)
    try:
        replanner = Replanner(fresh.bundle, fresh.model, fresh.system, token=TOKEN)
        with RemoteExecutor(fresh.bundle, cluster.hosts, token=TOKEN, timeout=30,
                            probe_interval=0.1, replanner=replanner) as ex:
            replanner.bind(ex)
            x = sample(5)
            ex.infer({"input": x})
            cluster.kill("cloud")
            out = ex.infer({"input": x})
            rec = ex.records[-1]
            assert rec["plan"] == "fallback/without-cloud"
            assert "cloud" not in {t["device"] for t in rec["timings"]}
            assert (fresh.bundle / "fallback" / "without-cloud" / "manifest.json").is_file()
            np.testing.assert_allclose(out["logits"], reference(fresh.model, x), rtol=1e-5,
                                       atol=1e-5)
    finally:
        cluster.stop()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc and SIGSTOP")
def test_stalled_worker_is_routed_around_and_late_results_dropped(built, tmp_path) -> None:
    cluster = start_cluster(built, tmp_path)
    hub = cluster.procs["hub"]
    try:
        with RemoteExecutor(built.bundle, cluster.hosts, token=TOKEN, timeout=20,
                            probe_interval=0.1) as ex:
            ex.infer({"input": sample(0)})
            os.kill(hub.pid, signal.SIGSTOP)  # alive but answering nothing: "too slow"
            assert _wait(lambda: _state(hub.pid) == "T"), "the hub did not stop"
            xs = [sample(300 + i) for i in range(6)]
            futs = [ex.submit({"input": x}) for x in xs]
            outs = [f.result(30) for f in futs]
            for x, out in zip(xs, outs, strict=True):
                np.testing.assert_allclose(out["logits"], reference(built.model, x),
                                           rtol=1e-5, atol=1e-5)
            assert "hub" in ex.down
            assert [r["plan"] for r in list(ex.records)[-6:]] == ["fallback/without-hub"] * 6, [
                (r["plan"], r["attempts"], r["retries"]) for r in ex.records]
            stuck = sum(r["attempts"] > 1 for r in list(ex.records)[-6:])
            os.kill(hub.pid, signal.SIGCONT)
            # the hub finishes what it had queued; those answers come too late and are
            # dropped, never delivered twice
            assert _wait(lambda: "hub" not in ex.down)
            if stuck:
                assert _wait(lambda: ex.duplicates >= 1)
            assert len({r["id"] for r in ex.records}) == len(ex.records) == 7
    finally:
        if hub.poll() is None:
            os.kill(hub.pid, signal.SIGCONT)
        cluster.stop()


def test_cli_run_failure_exits_3_naming_the_request(built, tmp_path, capsys) -> None:
    from runtime.cli import main

    np.save(tmp_path / "x.npy", sample(0))
    hosts = ",".join(f"{d}=127.0.0.1:{_free_port()}" for d in ("edge", "hub", "cloud"))
    code = main(["run", str(built.bundle), "--hosts", hosts, "--input",
                 f"input={tmp_path / 'x.npy'}", "--timeout", "5", "-o",
                 str(tmp_path / "o.npz"), "--json"])
    captured = capsys.readouterr()
    assert code == 3 and captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("runtime run: error: request ") and "no plan avoids" in last
    assert not (tmp_path / "o.npz").exists()
