"""Optional mutual TLS for every hop (workers, executor, probes, the gRPC port).

One private certificate authority per deployment signs a certificate for every node.
Servers require a client certificate signed by that CA, and clients verify the server's
certificate against it, so only the deployment's own nodes can talk to each other even
before the token is checked. This runtime's own clients do not check host names (nodes
are often addressed by IP and may share one certificate); trust comes from the private CA
alone.

**Stock clients do check host names.** ``tritonclient.grpc`` (``ssl=True``), Python's
``ssl.create_default_context`` and most HTTP/gRPC libraries refuse a server certificate
that does not name the host they dialled ("Peer name 127.0.0.1 is not in peer
certificate", ``CERTIFICATE_VERIFY_FAILED``). Make certificates that name every device's
address with::

    runtime certs SYSTEM.toml -o pki/ [--host NAME ...]   # see runtime/certs.py

which writes ``pki/ca.pem``, ``pki/<device>.pem|.key`` (IP SAN = the host of the device's
``address``) and ``pki/client.pem|.key``. Serve with ``--tls-cert pki/hub.pem --tls-key
pki/hub.key --tls-ca pki/ca.pem``; a stock client then connects with
``InferenceServerClient(url, ssl=True, root_certificates="pki/ca.pem",
private_key="pki/client.key", certificate_chain="pki/client.pem")`` (the OIP port asks
for a client certificate). With certificates that lack the address, the only client-side
way round is gRPC's ``("grpc.ssl_target_name_override", "<a name in the certificate>")``
channel option.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from stagebundle.errors import fail

__all__ = ["TLSConfig", "tls_from_args"]


@dataclass(frozen=True)
class TLSConfig:
    """Certificate, key and CA bundle (PEM files) of this node."""

    cert: Path
    key: Path
    ca: Path

    def _check(self) -> None:
        for what, path in (("--tls-cert", self.cert), ("--tls-key", self.key),
                           ("--tls-ca", self.ca)):
            if not Path(path).is_file():
                fail(f"{what} {path}: no such file")

    def server_context(self) -> ssl.SSLContext:
        """For listening sockets: present our certificate, require the peer's."""
        self._check()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(str(self.cert), str(self.key))
            ctx.load_verify_locations(str(self.ca))
        except (ssl.SSLError, OSError) as err:
            fail(f"--tls-cert {self.cert} / --tls-key {self.key}: {err}")
        ctx.verify_mode = ssl.CERT_REQUIRED
        # no TLS 1.3 session tickets: they would sit unread on one-way pooled
        # connections, which the pool then takes for a peer that went away
        ctx.num_tickets = 0
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """For outgoing connections: verify the server against the CA, show our cert."""
        self._check()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False  # see the module doc: the private CA is the trust root
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(str(self.ca))
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (ssl.SSLError, OSError) as err:
            fail(f"--tls-ca {self.ca}: {err}")
        return ctx

    def grpc_server_credentials(self) -> object:
        """gRPC credentials for the OIP port (client certificates required)."""
        import grpc

        self._check()
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=Path(self.ca).read_bytes(), require_client_auth=True)


def tls_from_args(cert: str | None, key: str | None, ca: str | None) -> TLSConfig | None:
    """``None`` when no TLS option is given; all three are needed otherwise."""
    if cert is None and key is None and ca is None:
        return None
    if not (cert and key and ca):
        fail("--tls-cert, --tls-key and --tls-ca go together")
    return TLSConfig(Path(cert), Path(key), Path(ca))
