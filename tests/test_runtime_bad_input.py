"""Bad input to the `runtime` commands: one line on stderr naming what is wrong, a non-zero
exit, no traceback, nothing half-written. Each case runs the real command (a subprocess);
workers are `runtime serve` processes on loopback (tests.test_runtime_fixtures)."""
# ruff: noqa: F811  (pytest fixtures are imported from tests.test_runtime_fixtures)

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy_format

from runtime.cli import main
from tests.test_runtime_fixtures import (  # noqa: F401  (fixtures)
    ROOT,
    SYSTEM_TOML,
    TOKEN,
    Cluster,
    built,
    reference,
    sample,
)


def _cli(*args: object, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _refused(res: subprocess.CompletedProcess[str], *needles: str, code: int = 2) -> str:
    """The command failed with ``code`` and one stderr line that names ``needles``."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert len(lines) == 1 and lines[0].split(":")[1].strip() == "error", res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def workers(built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(built, tmp_path_factory.mktemp("bad-input-workers")).start_all(
        ("edge", "hub", "cloud"))
    yield c
    c.stop()


@pytest.fixture
def x_npy(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, sample())
    return path


def _run(built, *args: object) -> subprocess.CompletedProcess[str]:
    return _cli("run", built.bundle, *args)


def _down_hosts() -> str:
    return ",".join(f"{d}=127.0.0.1:{_closed_port()}" for d in ("edge", "hub", "cloud"))


# --------------------------------------------------------------------------- run


def test_run_bad_listen_is_one_line(built, x_npy: Path, tmp_path: Path) -> None:
    for listen in ("garbage", "127.0.0.1", "127.0.0.1:99999", ""):
        res = _run(built, "--hosts", _down_hosts(), "--input", f"input={x_npy}",
                   "-o", tmp_path / "o.npz", "--listen", listen)
        _refused(res, "--listen")
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("opts,needle", [
    (("--timeout", "nan"), "--timeout nan"),
    (("--timeout", "inf"), "--timeout inf"),
    (("--timeout", "1e308"), "--timeout 1e+308"),
    (("--timeout", "20000"), "give --attempt-timeout"),
    (("--attempt-timeout", "nan"), "--attempt-timeout nan"),
    (("--timeout", "7200", "--attempt-timeout", "5000"), "--attempt-timeout 5000"),
])
def test_run_bad_timeouts_are_refused_up_front(built, x_npy: Path, tmp_path: Path,
                                               opts: tuple[str, ...], needle: str) -> None:
    res = _run(built, "--hosts", _down_hosts(), "--input", f"input={x_npy}",
               "-o", tmp_path / "o.npz", *opts)
    _refused(res, needle)


def test_run_deadline_before_any_attempt_says_so(built, workers: Cluster, x_npy: Path,
                                                 tmp_path: Path) -> None:
    res = _run(built, "--hosts", ",".join(f"{d}={a}" for d, a in workers.hosts.items()),
               "--token-file", built.token_file, "--input", f"input={x_npy}",
               "-o", tmp_path / "o.npz", "--timeout", "1e-9", "--quiet")
    line = _refused(res, "deadline (1e-09 s) passed before an attempt", code=3)
    assert not line.endswith("gave up after")
    assert not (tmp_path / "o.npz").exists()


def test_run_hosts_unknown_twice_or_port0(built, x_npy: Path, tmp_path: Path) -> None:
    base = _down_hosts()
    for hosts, needles in ((base + ",mars=127.0.0.1:7000", ("--hosts mars", "edge, hub")),
                           (base + ",edge=127.0.0.1:7000", ("--hosts edge", "given twice")),
                           ("edge=127.0.0.1:0,hub=127.0.0.1:1,cloud=127.0.0.1:2",
                            ("--hosts edge", "port 0"))):
        res = _run(built, "--hosts", hosts, "--input", f"input={x_npy}",
                   "-o", tmp_path / "o.npz")
        _refused(res, *needles)


def test_run_big_endian_input_is_taken(built, tmp_path: Path) -> None:
    x = sample(3)
    path = tmp_path / "big.npy"
    np.save(path, x.astype(">f4"))
    out = tmp_path / "o.npz"
    res = _run(built, "--local", "--input", f"input={path}", "-o", out)
    assert res.returncode == 0, res.stderr
    np.testing.assert_allclose(np.load(out)["logits"], reference(built.model, x),
                               rtol=1e-5, atol=1e-5)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # an ordinary file, not mkstemp's 0600


def test_run_input_header_larger_than_file(built, tmp_path: Path) -> None:
    path = tmp_path / "huge.npy"
    with path.open("wb") as f:  # claims 40 TB, holds 100 bytes
        npy_format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (10**5, 10**5, 10**3)})
        f.write(b"\0" * 100)
    res = _run(built, "--local", "--input", f"input={path}", "-o", tmp_path / "o.npz")
    _refused(res, "--input input", str(path))


def test_run_input_twice(built, x_npy: Path, tmp_path: Path) -> None:
    res = _run(built, "--local", "--input", f"input={x_npy}", "--input", f"input={x_npy}",
               "-o", tmp_path / "o.npz")
    _refused(res, "--input input: given twice")


@pytest.mark.parametrize("extra, flag", [
    (("--token-file", "t"), "--token-file"), (("--tls-ca", "ca.pem"), "--tls-ca"),
    (("--listen", "127.0.0.1:7"), "--listen"), (("--system", "s.toml"), "--system")])
def test_run_local_refuses_options_for_workers(built, x_npy: Path, tmp_path: Path,
                                               extra: tuple[str, ...], flag: str) -> None:
    res = _run(built, "--local", *extra, "--input", f"input={x_npy}", "-o", tmp_path / "o.npz")
    _refused(res, flag, "not with --local")


def test_run_manifest_that_is_a_folder(built, x_npy: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    (bundle / "manifest.json").mkdir(parents=True)
    res = _cli("run", bundle, "--local", "--input", f"input={x_npy}", "-o", tmp_path / "o.npz")
    _refused(res, "manifest.json", "is a folder")


@pytest.mark.parametrize("layers, needle", [
    ([0, 99], "go past the model's"), ([3, 1], "first <= last")])
def test_run_stage_layers_outside_the_model(built, x_npy: Path, tmp_path: Path,
                                             layers: list[int], needle: str) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(built.bundle, bundle)
    doc = json.loads((bundle / "manifest.json").read_text())
    assert doc["model"]["layers"], "the manifest lists the model's layers"
    doc["stages"][0]["layers"] = layers
    (bundle / "manifest.json").write_text(json.dumps(doc))
    res = _cli("run", bundle, "--local", "--input", f"input={x_npy}", "-o", tmp_path / "o.npz")
    _refused(res, "stage 0", needle)
    assert not (tmp_path / "o.npz").exists()


def test_run_output_not_a_regular_file(built, x_npy: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    res = _run(built, "--local", "--input", f"input={x_npy}", "-o", fifo)
    _refused(res, f"-o {fifo}", "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # not replaced by the atomic rename


def test_run_token_file_of_endless_data(built, x_npy: Path, tmp_path: Path) -> None:
    res = _run(built, "--hosts", _down_hosts(), "--token-file", "/dev/zero",
               "--input", f"input={x_npy}", "-o", tmp_path / "o.npz")
    _refused(res, "--token-file /dev/zero", "longer than")


def test_run_token_warning_once(built, workers: Cluster, x_npy: Path, tmp_path: Path) -> None:
    lax = tmp_path / "token"
    lax.write_text(TOKEN + "\n")
    lax.chmod(0o644)
    res = _run(built, "--hosts", ",".join(f"{d}={a}" for d, a in workers.hosts.items()),
               "--token-file", lax, "--input", f"input={x_npy}", "-o", tmp_path / "o.npz")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("readable by every user") == 1, res.stderr


def test_run_missing_model_for_replanning(built, x_npy: Path, tmp_path: Path) -> None:
    res = _run(built, "--hosts", _down_hosts(), "--model", tmp_path / "nope.onnx",
               "--system", built.system, "--input", f"input={x_npy}",
               "-o", tmp_path / "o.npz")
    _refused(res, f"--model {tmp_path / 'nope.onnx'}: no such file")


# --------------------------------------------------------------------------- serve


def _serve(built, *args: object) -> subprocess.CompletedProcess[str]:
    return _cli("serve", built.bundle, "--device", "hub", "--quiet", *args, timeout=30)


@pytest.mark.parametrize("opts,needle", [
    (("--grpc-port", "-1"), "--grpc-port -1"),
    (("--grpc-port", "99999"), "--grpc-port 99999"),
    (("--metrics-port", "-1"), "--metrics-port -1"),
    (("--metrics-port", "99999"), "--metrics-port 99999"),
    (("--listen", ""), "--listen ''"),
    (("--threads", "0"), "--threads 0"),
    (("--threads", "100000"), "--threads 100000: must be in 1.."),
])
def test_serve_bad_ports_and_listen(built, opts: tuple[str, ...], needle: str) -> None:
    _refused(_serve(built, *opts), needle)


def test_serve_grpc_port_taken(built) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _refused(_serve(built, "--grpc-port", port), f"--grpc-port {port}", "in use")


def test_serve_port_file_not_a_regular_file(built, tmp_path: Path) -> None:
    fifo = tmp_path / "port.fifo"
    os.mkfifo(fifo)
    _refused(_serve(built, "--port-file", fifo), f"--port-file {fifo}", "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_serve_model_store_cannot_be_made(built, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for store in (afile, afile / "sub"):
        res = _cli("serve", "--model", built.model, "--store", store, "--device", "hub",
                   "--quiet", timeout=30)
        _refused(res, f"--store {store}: cannot make the folder")


# --------------------------------------------------------------------------- certs

def _system(tmp_path: Path, edge: str = "127.0.0.1:7001") -> Path:
    path = tmp_path / "system.toml"
    path.write_text(SYSTEM_TOML.replace('name = "edge"\n', f'name = "edge"\naddress = "{edge}"\n')
                    .replace('name = "hub"\n', 'name = "hub"\naddress = "localhost:7002"\n'))
    return path


@pytest.mark.parametrize("opts,needle", [
    (("--days", "99999999999"), "--days 99999999999"),
    (("--host", ""), "--host ''"),
    (("--host", "a b"), "--host 'a b'"),
    (("--host", "[::1]"), "--host '[::1]'"),
    (("--host", "\u00e9.example"), "--host '\u00e9.example'"),
])
def test_certs_bad_days_and_hosts(tmp_path: Path, opts: tuple[str, ...], needle: str) -> None:
    out = tmp_path / "pki"
    _refused(_cli("certs", _system(tmp_path), "-o", out, *opts), needle)
    assert not out.exists()


def test_certs_bad_address_in_system(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    _refused(_cli("certs", _system(tmp_path, edge="bad host:7001"), "-o", out),
             "device edge address host 'bad host'")
    assert not out.exists()


def test_certs_target_that_is_a_folder_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    (out / "hub.pem").mkdir(parents=True)
    _refused(_cli("certs", _system(tmp_path), "-o", out), f"-o {out}", "hub.pem")
    assert [p.name for p in out.iterdir()] == ["hub.pem"]
    # and the fixed folder can then be filled without --force (no CA was left behind)
    (out / "hub.pem").rmdir()
    res = _cli("certs", _system(tmp_path), "-o", out)
    assert res.returncode == 0, res.stderr
    assert (out / "ca.key").is_file() and (out / "hub.pem").is_file()


def _backends() -> list[str]:
    import importlib.util
    import shutil

    found = []
    if importlib.util.find_spec("cryptography") is not None:
        found.append("cryptography")
    if shutil.which("openssl"):
        found.append("openssl")
    return found


@pytest.mark.parametrize("backend", _backends())
def test_certs_failed_write_leaves_no_half_set(tmp_path: Path, backend: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way (a full disk, say) removes what the run created."""
    import runtime.certs as certs

    real, calls = certs.write_atomic, []

    def failing(path: Path, data: bytes, private: bool = False) -> None:
        calls.append(path)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real(path, data, private)

    monkeypatch.setattr(certs, "write_atomic", failing)
    monkeypatch.setattr(certs, "_backend", lambda: backend)
    out = tmp_path / "pki"
    assert main(["certs", str(_system(tmp_path)), "-o", str(out)]) == 2
    assert len(calls) == 4
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("args, needle", [
    (("run", "b", "--timeout", "abc"), "--timeout: invalid float value"),
    (("serve", "b"), "required: --device"),
    (("nonsense",), "invalid choice"),
])
def test_bad_options_are_one_line(args: tuple[str, ...], needle: str) -> None:
    line = _refused(_cli(*args), needle)
    assert line.endswith("--help)"), line  # where the full usage is
