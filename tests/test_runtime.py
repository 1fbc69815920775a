"""End-to-end runtime tests: real `runtime serve` processes chained over loopback TCP."""
# ruff: noqa: F811  (pytest fixtures are imported from tests.test_runtime_fixtures)

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from runtime.cli import main
from runtime.executor import LocalExecutor, RemoteExecutor, RequestError
from runtime.protocol import MAGIC, PREFIX, VERSION
from runtime.transport import connect, recv_frame, send_frame
from stagebundle.errors import UserError
from tests.test_runtime_fixtures import (  # noqa: F401  (fixtures)
    ROOT,
    TOKEN,
    Cluster,
    built,
    cluster,
    reference,
    sample,
)


def _addr(cluster: Cluster, device: str) -> tuple[str, int]:
    return "127.0.0.1", int(cluster.info[device]["port"])  # type: ignore[call-overload]


def _ask(cluster: Cluster, device: str, header: dict, tensors: dict | None = None) -> dict:
    """Send one frame to a worker and return the header it answers with."""
    with connect(_addr(cluster, device), 5.0) as sock:
        send_frame(sock, header, tensors)
        return recv_frame(sock, max_body=1 << 20).header


def _raw(cluster: Cluster, device: str, data: bytes, shut: bool = True) -> dict:
    """Send raw bytes (possibly a broken frame) and return the worker's answer."""
    with connect(_addr(cluster, device), 5.0) as sock:
        sock.sendall(data)
        if shut:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # the worker may have refused and half-closed already
                pass
        return recv_frame(sock, max_body=1 << 20).header


def _infer_header(cluster: Cluster, **over: object) -> dict:
    h = {"type": "infer", "id": "t-1", "attempt": 1, "plan": "main", "unit": "0",
         "from": "input",
         "route": cluster.hosts, "reply": "127.0.0.1:9", "budget": 5.0, "token": TOKEN,
         "ack": True}
    h.update(over)
    return h


def _still_serves(cluster: Cluster, built) -> None:
    x = sample(7)
    with RemoteExecutor(built.bundle, cluster.hosts, token=TOKEN, timeout=10) as ex:
        out = ex.infer({"input": x})
    np.testing.assert_allclose(out["logits"], reference(built.model, x), rtol=1e-5,
                               atol=1e-5)


def test_chain_equals_full_model(cluster: Cluster, built) -> None:
    with RemoteExecutor(built.bundle, cluster.hosts, token=TOKEN, timeout=10) as ex:
        for seed in range(3):
            x = sample(seed)
            out = ex.infer({"input": x})
            np.testing.assert_allclose(out["logits"], reference(built.model, x),
                                       rtol=1e-5, atol=1e-5)
        rec = ex.records[-1]
        # every stage ran on its own device, in chain order, once
        assert [(t["stage"], t["device"]) for t in rec["timings"]] == [
            ("0", "edge"), ("1", "hub"), ("2", "cloud")]
        assert rec["plan"] == "main" and rec["attempts"] == 1
        # wall clock, as the workers' timings: the sends began before the first stage
        # started, and the result was filed after the last stage ended
        first, last = rec["timings"][0], rec["timings"][-1]
        assert rec["sent"] <= first["start"]
        assert last["start"] + last["compute"] <= rec["answered"]


def test_pipelined_requests_all_complete_once(cluster: Cluster, built) -> None:
    xs = [sample(100 + i) for i in range(24)]
    with RemoteExecutor(built.bundle, cluster.hosts, token=TOKEN, timeout=20) as ex:
        futs = [ex.submit({"input": x}) for x in xs]
        outs = [f.result(30) for f in futs]
        ids = [r["id"] for r in ex.records]
    assert len(ids) == len(set(ids)) == len(xs)
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out["logits"], reference(built.model, x), rtol=1e-5,
                                   atol=1e-5)


def test_local_executor_pipelines_one_request_per_unit_at_a_time(built) -> None:
    """Requests submitted together all complete, right, once each; a unit never runs
    two at once (each unit's compute intervals, wall clock, do not overlap)."""
    xs = [sample(200 + i) for i in range(16)]
    with LocalExecutor(built.bundle) as ex:
        futs = [ex.submit({"input": x}) for x in xs]
        outs = [f.result(30) for f in futs]
        records = list(ex.records)
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out["logits"], reference(built.model, x), rtol=1e-5,
                                   atol=1e-5)
    assert len({r["id"] for r in records}) == len(xs)
    for stage in ("0", "1", "2"):
        spans = sorted((t["start"], t["start"] + t["compute"]) for r in records
                       for t in r["timings"] if t["stage"] == stage)
        assert len(spans) == len(xs)
        # (a microsecond of slack: start and compute come from two clocks)
        assert all(b[0] >= a[1] - 1e-6 for a, b in zip(spans, spans[1:], strict=False)), \
            stage
    assert all(t["queue"] >= 0 for r in records for t in r["timings"])


def test_local_executor_matches(built) -> None:
    x = sample(3)
    with LocalExecutor(built.bundle) as ex:
        out = ex.infer({"input": x})
        with pytest.raises(UserError, match="tensor input has dtype float64"):
            ex.infer({"input": x.astype(np.float64)})
    np.testing.assert_allclose(out["logits"], reference(built.model, x), rtol=1e-5, atol=1e-5)


def test_cli_run_remote_and_local(cluster: Cluster, built, tmp_path) -> None:
    x = sample(11)
    np.save(tmp_path / "x.npy", x)
    hosts = ",".join(f"{d}={a}" for d, a in cluster.hosts.items())
    system = built.system.read_text()
    for d, a in cluster.hosts.items():  # the system file's `address` of every device
        system = system.replace(f'name = "{d}"\n', f'name = "{d}"\naddress = "{a}"\n')
    (tmp_path / "system.toml").write_text(system)
    tok = ["--token-file", str(built.token_file)]
    for mode in (["--hosts", hosts, *tok], ["--system", str(tmp_path / "system.toml"), *tok],
                 ["--local"]):
        out = tmp_path / "out.npz"
        out.unlink(missing_ok=True)
        res = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(built.bundle),
                              *mode, "--input", f"input={tmp_path / 'x.npy'}", "--repeat",
                              "2", "-o", str(out), "--json"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert doc["requests"] == 2 and len(doc["runs"]) == 2
        assert doc["runs"][0]["id"] != doc["runs"][1]["id"]
        with np.load(out, allow_pickle=False) as z:
            assert list(z.keys()) == ["logits"]
            np.testing.assert_allclose(z["logits"], reference(built.model, x), rtol=1e-5,
                                       atol=1e-5)
        if "--local" not in mode:
            assert [s["device"] for s in doc["runs"][0]["stages"]] == ["edge", "hub", "cloud"]


def test_cli_errors_are_one_line(built, tmp_path, capsys) -> None:
    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().err

    code, err = run("serve", str(built.bundle), "--device", "hub", "--listen", "0.0.0.0:0")
    assert code == 2 and "without --token-file" in err and len(err.strip().splitlines()) == 1
    code, err = run("serve", str(built.bundle), "--device", "nosuch")
    assert code == 2 and "--device nosuch" in err
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 8, 8), np.float32))
    code, err = run("run", str(built.bundle), "--local", "--input",
                    f"input={tmp_path / 'bad.npy'}", "-o", str(tmp_path / "o.npz"))
    assert code == 2 and "shape [1, 3, 8, 8]" in err
    assert not (tmp_path / "o.npz").exists()
    code = main(["fallback", str(built.bundle), "--model", str(built.model), "--system",
                 str(built.system), "--device", "edge", "--json"])
    # the edge holds the source and destination: no plan can do without it
    assert code == 0 and json.loads(capsys.readouterr().out) == {"fallbacks": {"edge": None}}
    code, err = run("run", str(built.bundle), "--hosts", "edge=127.0.0.1:1", "--input",
                    f"input={tmp_path / 'bad.npy'}", "-o", str(tmp_path / "o.npz"))
    assert code == 2 and "no address for device hub" in err


# ------------------------------------------------------------------ security


def test_wrong_or_missing_token_is_rejected(cluster: Cluster, built) -> None:
    x = sample(1)
    for token in ("wrong", None, ""):
        reply = _ask(cluster, "edge", _infer_header(cluster, token=token), {"input": x})
        assert reply["type"] == "error" and reply["code"] == "unauthorized"
    assert _ask(cluster, "edge", {"type": "ready", "token": "nope"})["code"] == "unauthorized"
    # liveness needs no token, readiness does
    assert _ask(cluster, "edge", {"type": "health"})["live"] is True
    ready = _ask(cluster, "edge", {"type": "ready", "token": TOKEN})
    assert ready["ready"] is True and ready["stats"]["rejected"] >= 3
    with pytest.raises(RequestError, match="unauthorized|token"):
        with RemoteExecutor(built.bundle, cluster.hosts, token="wrong", timeout=5) as ex:
            ex.infer({"input": x})
    _still_serves(cluster, built)


@pytest.mark.parametrize(("tensor", "message"), [
    ({"input": np.zeros((1, 3, 32, 32), np.int32)}, "dtype int32, expected float32"),
    ({"input": np.zeros((1, 3, 16, 32), np.float32)}, "shape [1, 3, 16, 32]"),
    ({"evil": np.zeros((1, 3, 32, 32), np.float32)}, "unexpected tensor 'evil'"),
    ({}, "missing input tensor input"),
])
def test_bad_tensors_are_rejected(cluster: Cluster, built, tensor, message) -> None:
    reply = _ask(cluster, "edge", _infer_header(cluster), tensor)
    assert reply["type"] == "error" and reply["code"] == "bad_request"
    assert message in reply["message"] and "t-1" in reply["message"]


def test_request_for_a_stage_elsewhere_is_rejected(cluster: Cluster) -> None:
    reply = _ask(cluster, "edge", _infer_header(cluster, unit="1", **{"from": "0"}),
                 {"conv1": np.zeros(1, np.float32)})
    assert reply["code"] == "bad_request" and "does not run on device edge" in reply["message"]


def test_malformed_oversized_truncated_frames(cluster: Cluster, built) -> None:
    # oversized body: refused from the prefix alone, before anything is read
    big = PREFIX.pack(MAGIC, VERSION, 0, 0, 10, 10 << 30)
    reply = _raw(cluster, "edge", big, shut=False)
    assert reply["code"] == "too_large" and "exceeds the cap" in reply["message"]
    # oversized header
    reply = _raw(cluster, "edge", PREFIX.pack(MAGIC, VERSION, 0, 0, 1 << 30, 0), shut=False)
    assert reply["code"] == "too_large"
    # not our protocol at all
    assert _raw(cluster, "edge", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")["code"] == "malformed"
    # truncated: a prefix announcing more than is sent, then EOF
    head = json.dumps({"type": "health"}).encode()
    trunc = PREFIX.pack(MAGIC, VERSION, 0, 0, len(head), 4096) + head + b"\0" * 100
    reply = _raw(cluster, "edge", trunc)
    assert reply["code"] == "truncated"
    # header that is not JSON, and tensor descriptors that lie about their bytes
    junk = b"\xff\xfe{not json"
    assert _raw(cluster, "edge", PREFIX.pack(MAGIC, VERSION, 0, 0, len(junk), 0) + junk)[
        "code"] == "malformed"
    lie = json.dumps({"type": "infer", "token": TOKEN, "tensors": [
        {"name": "input", "dtype": "float32", "shape": [1, 3, 32, 32], "offset": 0,
         "nbytes": 64}]}).encode()
    reply = _raw(cluster, "edge", PREFIX.pack(MAGIC, VERSION, 0, 0, len(lie), 64) + lie
                 + b"\0" * 64)
    assert reply["code"] == "malformed" and "does not match shape" in reply["message"]
    assert struct.calcsize("!4sBBHIQ") == PREFIX.size
    _still_serves(cluster, built)


def test_deadline_is_enforced(cluster: Cluster, built) -> None:
    # a budget that has run out before the stage starts is reported to the reply address
    with socket.create_server(("127.0.0.1", 0)) as reply_srv:
        reply_srv.settimeout(10)
        port = reply_srv.getsockname()[1]
        ack = _ask(cluster, "edge", _infer_header(cluster, id="late-1", budget=1e-6,
                                                 reply=f"127.0.0.1:{port}"),
                   {"input": sample(2)})
        assert ack["type"] == "accepted"
        conn, _ = reply_srv.accept()
        with conn:
            conn.settimeout(10)
            err = recv_frame(conn, max_body=1 << 20).header
    assert err["type"] == "error" and err["code"] == "deadline" and err["id"] == "late-1"
    assert "deadline passed before stage 0 on edge" in err["message"]
    _still_serves(cluster, built)


def test_serve_listens_on_the_system_file_address(built, tmp_path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    system = built.system.read_text().replace(
        'name = "edge"\n', f'name = "edge"\naddress = "127.0.0.1:{port}"\n')
    (tmp_path / "system.toml").write_text(system)
    pf = tmp_path / "port.json"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", str(built.bundle),
                             "--device", "edge", "--system", str(tmp_path / "system.toml"),
                             "--port-file", str(pf), "--quiet"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):
            if pf.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert pf.exists(), proc.stderr.read().decode() if proc.stderr else ""
        assert json.loads(pf.read_text())["port"] == port
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
