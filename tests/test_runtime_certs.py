"""``runtime certs``: certificates named by the system's addresses pass a stock client's
host-name check, end to end over TLS on loopback; a certificate for another address fails.
"""

from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path

import pytest

from runtime.certs import make_certificates
from runtime.cli import main
from runtime.tls import TLSConfig
from runtime.transport import connect, recv_frame, send_frame
from runtime.worker import Worker
from tests.test_runtime_fixtures import SYSTEM_TOML, TOKEN, build

grpcclient = pytest.importorskip("tritonclient.grpc")


def _system(path: Path, hub_address: str) -> Path:
    """The fixtures' system with device addresses (the hub's given, the others loopback)."""
    text = SYSTEM_TOML.replace('name = "hub"', f'name = "hub"\naddress = "{hub_address}"')
    text = text.replace('name = "edge"', 'name = "edge"\naddress = "127.0.0.1:7101"')
    path.write_text(text)
    return path


def test_cli_writes_a_ca_and_certificates_with_ip_sans(tmp_path, capsys) -> None:
    system = _system(tmp_path / "system.toml", "10.1.2.3:7000")
    out = tmp_path / "pki"
    assert main(["certs", str(system), "-o", str(out), "--host", "localhost"]) == 0
    printed = capsys.readouterr().out
    assert "hub.pem: 10.1.2.3, localhost" in printed
    for stem in ("ca", "edge", "hub", "cloud", "client"):
        assert (out / f"{stem}.pem").is_file()
        assert (out / f"{stem}.key").stat().st_mode & 0o077 == 0  # keys: owner only
    ctx = ssl.create_default_context(cafile=str(out / "ca.pem"))  # the chain verifies
    ctx.load_cert_chain(str(out / "hub.pem"), str(out / "hub.key"))
    # never overwrites a CA by accident; errors are one line, exit 2
    assert main(["certs", str(system), "-o", str(out)]) == 2
    assert "already holds a CA" in capsys.readouterr().err
    assert main(["certs", str(tmp_path / "missing.toml"), "-o", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    assert main(["certs", str(system), "-o", str(out), "--force", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["certificates"]["hub"]["hosts"] == ["10.1.2.3"]
    assert sorted(doc["certificates"]) == ["client", "cloud", "edge", "hub"]
    assert all(Path(c["cert"]).is_file() and Path(c["key"]).is_file()
               for c in doc["certificates"].values())
    assert main(["certs", str(system), "-o", str(out), "--force", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def _serve_tls(built, pki: Path, grpc: bool = True) -> Worker:
    tls = TLSConfig(pki / "hub.pem", pki / "hub.key", pki / "ca.pem")
    return Worker(built.bundle, "hub", token=TOKEN, tls=tls,
                  grpc_port=0 if grpc else None).start()


def test_stock_client_verifies_the_host_name_end_to_end(tmp_path) -> None:
    built = build(tmp_path / "b", fallbacks=False)
    good = tmp_path / "pki"
    make_certificates(_system(tmp_path / "good.toml", "127.0.0.1:7000"), good)
    wrong = tmp_path / "pki-wrong"  # same layout, the hub's certificate names 10.9.8.7
    make_certificates(_system(tmp_path / "wrong.toml", "10.9.8.7:7000"), wrong)
    for pki, verifies in ((good, True), (wrong, False)):
        worker = _serve_tls(built, pki)
        try:
            assert worker.grpc_address is not None
            client = grpcclient.InferenceServerClient(
                url=f"127.0.0.1:{worker.grpc_address[1]}", ssl=True,
                root_certificates=str(pki / "ca.pem"), private_key=str(pki / "client.key"),
                certificate_chain=str(pki / "client.pem"))
            try:
                if verifies:
                    assert client.is_server_live()
                    assert client.is_model_ready("stage1",
                                                 headers={"authorization": f"Bearer {TOKEN}"})
                else:
                    with pytest.raises(Exception, match="(?i)unavailable|handshake|ssl|peer"):
                        client.is_server_live(client_timeout=10)
            finally:
                client.close()
            # the framed TCP port with a host-name checking client (Python's defaults)
            ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
            ctx.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
            if verifies:
                sock = connect(worker.address, 10.0)
                with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls_sock:
                    send_frame(tls_sock, {"type": "health"})
                    assert recv_frame(tls_sock, max_body=0).header["live"] is True
            else:
                with connect(worker.address, 10.0) as sock, pytest.raises(ssl.SSLError):
                    ctx.wrap_socket(sock, server_hostname="127.0.0.1")
            # and our own nodes, which trust the CA alone, work with either set
            own = TLSConfig(pki / "client.pem", pki / "client.key", pki / "ca.pem")
            with connect(worker.address, 10.0, own.client_context()) as sock:
                send_frame(sock, {"type": "health"})
                assert recv_frame(sock, max_body=0).header["live"] is True
        finally:
            worker.close()


def test_openssl_backend_makes_the_same_set(tmp_path) -> None:
    if subprocess.run(["openssl", "version"], capture_output=True).returncode != 0:
        pytest.skip("no openssl")
    out = tmp_path / "pki"
    made = make_certificates(_system(tmp_path / "s.toml", "127.0.0.1:7000"), out,
                             backend="openssl")
    assert made["hub"] == ["127.0.0.1"]
    text = subprocess.run(["openssl", "x509", "-in", str(out / "hub.pem"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "IP Address:127.0.0.1" in text
    subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.pem"), str(out / "hub.pem")],
                   check=True, capture_output=True)
