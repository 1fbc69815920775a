"""Optional mutual TLS: chained inference over TLS; peers without the CA's certificate fail."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime.executor import RemoteExecutor, probe_status
from runtime.protocol import ProtocolError
from runtime.tls import TLSConfig
from runtime.transport import ConnectionClosed, connect, format_address, recv_frame, send_frame
from runtime.worker import Worker
from tests.test_runtime_fixtures import TOKEN, build, sample

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _ca_and_cert(d: Path, name: str) -> TLSConfig:
    """A private CA and one node certificate it signs (RSA 2048, 1 day)."""
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
        f"/CN={name}-ca", "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
        "node.key", "-out", "node.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "ext.cnf", "-out", "node.pem")
    return TLSConfig(d / "node.pem", d / "node.key", d / "ca.pem")


def test_mutual_tls_chain_and_refusals(tmp_path) -> None:
    built = build(tmp_path / "b", fallbacks=False)
    tls = _ca_and_cert(tmp_path / "pki", "deploy")
    other = _ca_and_cert(tmp_path / "pki-other", "intruder")  # signed by another CA
    workers = [Worker(built.bundle, d, token=TOKEN, tls=tls).start()
               for d in ("edge", "hub", "cloud")]
    try:
        hosts = {w.device: format_address(w.address) for w in workers}
        x = sample(8)
        ref = ort.InferenceSession(str(built.model)).run(None, {"input": x})[0]
        with RemoteExecutor(built.bundle, hosts, token=TOKEN, tls=tls, timeout=20) as ex:
            for _ in range(3):  # several requests over pooled TLS connections
                np.testing.assert_allclose(ex.infer({"input": x})["logits"], ref,
                                           rtol=1e-5, atol=1e-5)
        edge = workers[0].address
        # a plain-TCP client gets no answer (the handshake fails, the worker goes on)
        with socket.create_connection(edge, timeout=5) as sock:
            send_frame(sock, {"type": "health"})
            sock.settimeout(5)
            with pytest.raises((ConnectionClosed, ProtocolError, OSError)):
                recv_frame(sock, max_body=0)
        # a TLS client whose certificate another CA signed is refused too
        assert probe_status(edge, 2.0, other.client_context()) != "ok"
        # a client that does not trust the worker's CA refuses the worker
        with pytest.raises(ssl.SSLError):
            connect(edge, 5.0, other.client_context())
        assert probe_status(edge, 2.0, tls.client_context()) == "ok"
    finally:
        for w in workers:
            w.close()
