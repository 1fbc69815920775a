"""The runtime on the stage graph, on real `runtime serve` processes over loopback TCP.

Hand-built schema-2 bundles (tests/test_runtime_graph_fixtures.py): a skip tensor sent
direct across three workers; a stage split by rows into 2-4 parts on different workers
(scattered and gathered by a worker or by the executor); a schema-1 chain; fail-over from
a part's worker to a fallback with fewer parts.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from runtime.executor import LocalExecutor, RemoteExecutor
from runtime.transport import connect, recv_frame, send_frame
from tests.test_runtime_fixtures import TOKEN, Built, Cluster
from tests.test_runtime_graph_fixtures import parts_bundle, reference, skip_bundle


def _x(seed: int, height: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, height, 8)).astype(np.float32)


def _cluster(built: Built, devices: list[str], work: Path) -> Cluster:
    return Cluster(built, work).start_all(devices)


def _ready(cluster: Cluster, device: str) -> dict:
    with connect(("127.0.0.1", int(cluster.info[device]["port"])), 5.0) as sock:  # type: ignore[call-overload]
        send_frame(sock, {"type": "ready", "token": TOKEN})
        return recv_frame(sock, max_body=0).header


def _close(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schema", [2, 1])
def test_skip_tensor_goes_direct_across_three_workers(tmp_path, schema: int) -> None:
    built = skip_bundle(tmp_path / "m", schema=schema)
    cluster = _cluster(built, ["edge", "hub", "cloud"], tmp_path)
    xs = [_x(i, 8) for i in range(5)]
    try:
        with RemoteExecutor(built.bundle, cluster.hosts, token=TOKEN, timeout=20) as ex:
            futs = [ex.submit({"x": x}) for x in xs]  # pipelined
            for fut, x in zip(futs, xs, strict=True):
                _close(fut.result(30), reference(built.model, {"x": x}))
            rec = ex.records[-1]
            assert [(t["stage"], t["device"]) for t in rec["timings"]] == [
                ("0", "edge"), ("1", "hub"), ("2", "cloud")]
            assert len({r["id"] for r in ex.records}) == len(xs)
        received = {d: _ready(cluster, d)["received"] for d in ("edge", "hub", "cloud")}
    finally:
        cluster.stop()
    one = 1 * 4 * 8 * 8 * 4  # bytes of a, b or s
    assert received["edge"] == {"x": len(xs) * 3 * 8 * 8 * 4}
    if schema == 2:
        # the skip tensor s goes straight from the edge to the cloud: the hub never sees
        # it; a goes once to the hub and once (as a model output) to the executor
        assert received["hub"] == {"a": len(xs) * one}
        assert received["cloud"] == {"b": len(xs) * one, "s": len(xs) * one}
    else:  # a schema-1 chain relays s through the hub, and a through the cloud
        assert received["hub"] == {"a": len(xs) * one, "s": len(xs) * one}
        assert received["cloud"] == {"a": len(xs) * one, "b": len(xs) * one,
                                     "s": len(xs) * one}


@pytest.mark.parametrize(("n", "where"), [(2, "middle"), (3, "edges"), (4, "middle")])
def test_row_parts_on_workers_reproduce_the_model(tmp_path, n: int, where: str) -> None:
    built = parts_bundle(tmp_path / "m", n, where)
    devices = [f"d{i}" for i in range(n)]
    xs = [_x(10 + i, 13) for i in range(4)]
    with LocalExecutor(built.bundle) as local:
        for x in xs[:2]:
            _close(local.infer({"x": x}), reference(built.model, {"x": x}))
    cluster = _cluster(built, devices, tmp_path)
    try:
        with RemoteExecutor(built.bundle, cluster.hosts, token=TOKEN, timeout=30) as ex:
            futs = [ex.submit({"x": x}) for x in xs]
            for fut, x in zip(futs, xs, strict=True):
                _close(fut.result(40), reference(built.model, {"x": x}))
            sid = "1" if where == "middle" else "0"
            parts = {(t["stage"], t["device"]) for t in ex.records[-1]["timings"]}
            assert {(f"{sid}.{k}", f"d{k}") for k in range(n)} <= parts
        received = {d: _ready(cluster, d)["received"] for d in devices}
    finally:
        cluster.stop()
    from stagebundle.load import load_bundle

    split = load_bundle(built.bundle).stages[int(sid)]
    assert split.parts is not None and len(split.parts) == n
    for part in split.parts:
        (spec,) = part.inputs  # each part's worker got only its rows (halo included)
        if where == "middle" and part.index == 0:
            assert received["d0"] == {"x": len(xs) * 3 * 13 * 8 * 4}  # a: in-process
        else:
            assert received[part.device][spec.name] == len(xs) * spec.nbytes
    # (a deep stack's halo may reach over every row of a middle part, not of the outer ones)
    assert all(p.inputs[0].rows is not None for p in split.parts)
    assert split.parts[0].inputs[0].nbytes < split.inputs[0].nbytes
    assert split.parts[-1].inputs[0].nbytes < split.inputs[0].nbytes


def test_part_worker_killed_mid_stream_fails_over_to_fewer_parts(tmp_path) -> None:
    built = parts_bundle(tmp_path / "m", 3, "middle")
    parts_bundle(tmp_path / "fb", 2, "middle", devices=["d0", "d2"],
                 bundle=built.bundle / "fallback" / "without-d1")
    cluster = _cluster(built, ["d0", "d1", "d2"], tmp_path)
    xs = [_x(100 + i, 13) for i in range(30)]
    try:
        with RemoteExecutor(built.bundle, cluster.hosts, token=TOKEN, timeout=30,
                            probe_interval=0.1) as ex:
            futs = []
            for i, x in enumerate(xs):
                futs.append(ex.submit({"x": x}))
                if i == 10:
                    cluster.kill("d1")  # a part's worker dies with requests in flight
                time.sleep(0.005)
            for fut, x in zip(futs, xs, strict=True):
                _close(fut.result(40), reference(built.model, {"x": x}))  # none lost
            ids = [r["id"] for r in ex.records]
            assert sorted(ids) == sorted(f.request_id for f in futs)  # each answered once
            plans = [r["plan"] for r in ex.records]
            assert plans[0] == "main" and "fallback/without-d1" in plans and "d1" in ex.down
            late = [r for r in ex.records if r["plan"] != "main"]
            assert all(t["device"] != "d1" for r in late for t in r["timings"])
    finally:
        cluster.stop()
