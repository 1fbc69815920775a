"""``runtime certs SYSTEM -o DIR``: a private CA and one certificate per device, by address.

Our own nodes trust the private CA alone and do not check host names (see
:mod:`runtime.tls`), but a stock client does: ``tritonclient.grpc`` with ``ssl=True``
checks that the server certificate names the host it dialled, so a certificate without the
worker's IP fails with "certificate verify failed" / "Peer name ... is not in peer
certificate". This makes certificates that pass that check: each device's certificate
carries its ``address`` host from the system file as a subjectAltName (an IP SAN for an
IP address, a DNS SAN for a name), plus any ``--host`` given.

Written to ``DIR``::

    ca.pem  ca.key                 the deployment's CA (keep ca.key offline)
    <device>.pem  <device>.key     one per device of the system file (for runtime serve)
    client.pem  client.key         for the executor and for stock clients (mutual TLS)

Keys are EC P-256, written with mode 0600; every file is written atomically once the whole
set is made, the CA key last (a failed run leaves no CA key and removes the files it
created). The CA key is never overwritten (``--force`` to replace the whole set). The
``cryptography`` package is used when installed, else the ``openssl`` command; with
neither, a one-line error.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from runtime.files import write_atomic
from stagebundle.errors import fail

__all__ = ["add_arguments", "run", "make_certificates", "device_hosts"]

# what goes into a certificate: name -> (PEM bytes, private)
Files = dict[str, tuple[bytes, bool]]
# a DNS name (A-labels; a leading "*." wildcard allowed), each label 1-63 characters
_DNS = re.compile(r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                  r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_DAYS = 36500  # X.509 dates end in 9999; a century is plenty


def device_hosts(system_path: str | Path, extra: Sequence[str] = ()) -> dict[str, list[str]]:
    """Device name -> the host names/IPs its certificate must carry."""
    from partitioner.analysis.system import load_system
    from runtime.transport import parse_address

    system = load_system(system_path)
    hosts: dict[str, list[str]] = {}
    for dev in system.devices:
        names: list[str] = []
        if dev.address:
            try:
                names.append(parse_address(dev.address, what=f"device {dev.name} address")[0])
            except ValueError as err:
                fail(f"{system_path}: {err}")
        for h in extra:
            if h not in names:
                names.append(h)
        hosts[dev.name] = names
    return hosts


def check_host(host: str, what: str) -> None:
    """``host`` is an IP address or a DNS name a certificate can carry."""
    if _san_kind(host) == "IP":
        return
    if len(host) > 253 or not _DNS.fullmatch(host):
        fail(f"{what} {host!r}: not an IP address or a DNS name (letters, digits, '-' and "
             f"'.'; encode other characters as IDNA A-labels)")


def _san_kind(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return "IP"
    except ValueError:
        return "DNS"


# --------------------------------------------------------------------------- cryptography


def _with_cryptography(out: Path, subjects: dict[str, list[str]], days: int) -> Files:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("runtime deployment CA"))
          .issuer_name(name("runtime deployment CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start)
          .not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    files: Files = {"ca.pem": (ca.public_bytes(serialization.Encoding.PEM), False)}
    for stem, hosts in subjects.items():
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(h)) if _san_kind(h) == "IP" else x509.DNSName(h)
            for h in hosts]
        builder = (x509.CertificateBuilder().subject_name(name(stem)).issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        files[f"{stem}.key"] = (key_pem(key), True)
        files[f"{stem}.pem"] = (cert.public_bytes(serialization.Encoding.PEM), False)
    files["ca.key"] = (key_pem(ca_key), True)  # last: it marks a complete set
    return files


# --------------------------------------------------------------------------- openssl


def _with_openssl(out: Path, subjects: dict[str, list[str]], days: int) -> Files:
    with tempfile.TemporaryDirectory(dir=out, prefix=".openssl-") as tmp:
        work = Path(tmp)

        def run(*args: str) -> None:
            try:
                subprocess.run(["openssl", *args], cwd=work, check=True, capture_output=True,
                               timeout=120)
            except subprocess.CalledProcessError as err:
                last = (err.stderr or b"").decode(errors="replace").strip().splitlines()
                fail(f"openssl {args[0]} failed: {last[-1] if last else err.returncode}")

        ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run("req", "-x509", *ec_key, "-days", str(days), "-subj", "/CN=runtime deployment CA",
            "-keyout", "ca.key", "-out", "ca.pem", "-addext",
            "basicConstraints=critical,CA:TRUE,pathlen:0", "-addext",
            "keyUsage=critical,keyCertSign,cRLSign")
        for stem, hosts in subjects.items():
            ext = ["basicConstraints=critical,CA:FALSE", "extendedKeyUsage=serverAuth,clientAuth"]
            if hosts:
                ext.append("subjectAltName=" + ",".join(f"{_san_kind(h)}:{h}" for h in hosts))
            (work / f"{stem}.cnf").write_text("\n".join(ext) + "\n")
            run("req", *ec_key, "-subj", f"/CN={stem}", "-keyout", f"{stem}.key", "-out",
                f"{stem}.csr")
            run("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", str(days), "-extfile", f"{stem}.cnf", "-out",
                f"{stem}.pem")
        files: Files = {}
        for stem in (*subjects, "ca"):  # the CA key last: it marks a complete set
            files[f"{stem}.pem"] = ((work / f"{stem}.pem").read_bytes(), False)
            files[f"{stem}.key"] = ((work / f"{stem}.key").read_bytes(), True)
        return files


def _install(out: Path, files: Files) -> None:
    """Write ``files`` into ``out``, each atomically; if one cannot be written, the files
    this call created are removed again (replaced ones keep their new content)."""
    for name in files:
        target = out / name
        if target.is_symlink() or (target.exists() and not target.is_file()):
            fail(f"-o {out}: {name} exists and is not a regular file")
    created: list[Path] = []
    try:
        for name, (data, private) in files.items():
            target = out / name
            new = not target.exists()
            write_atomic(target, data, private)
            if new:
                created.append(target)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise


def _backend() -> str:
    try:
        import cryptography.x509  # noqa: F401

        return "cryptography"
    except ImportError:
        pass
    if shutil.which("openssl"):
        return "openssl"
    fail("runtime certs: needs the 'cryptography' package (pip install cryptography) or the "
         "openssl command; neither is available")


def make_certificates(system_path: str | Path, out: str | Path, *, days: int = 365,
                      extra_hosts: Sequence[str] = (), force: bool = False,
                      backend: str | None = None) -> dict[str, list[str]]:
    """Write the CA, one certificate per device and a client certificate into ``out``.

    Returns the subject names (file stems) with the host SANs each carries.
    """
    from partitioner.backend.emit import safe_name  # (not at import: `runtime serve` is lean)

    if not 1 <= days <= MAX_DAYS:
        fail(f"--days {days}: must be in 1..{MAX_DAYS}")
    for host in extra_hosts:
        check_host(host, "--host")
    hosts = device_hosts(system_path, extra_hosts)
    for dev, names in hosts.items():
        for host in names:
            if host not in extra_hosts:
                check_host(host, f"{system_path}: device {dev} address host")
    subjects: dict[str, list[str]] = {}
    for dev, names in hosts.items():
        stem = safe_name(dev)
        if stem in subjects or stem in ("ca", "client"):
            fail(f"{system_path}: device {dev!r}: its file name {stem!r} is taken; rename it")
        subjects[stem] = names
    subjects["client"] = list(extra_hosts)
    out = Path(out)
    if out.exists() and not out.is_dir():
        fail(f"-o {out}: exists and is not a directory")
    if (out / "ca.key").exists() and not force:
        fail(f"-o {out}: already holds a CA (ca.key); use --force to replace every file")
    try:
        out.mkdir(parents=True, exist_ok=True)
        make = _with_cryptography if (backend or _backend()) == "cryptography" \
            else _with_openssl
        _install(out, make(out, subjects, days))
    except OSError as err:
        fail(f"-o {out}: cannot write certificates ({err.strerror or err})")
    return subjects


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("system", help="system file (TOML/JSON); device `address` fields give "
                                  "the hosts")
    p.add_argument("-o", "--out", required=True, help="directory to write the PEM files to")
    p.add_argument("--host", action="append", default=[], metavar="HOST",
                   help="also name this IP / DNS name in every certificate (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity, days (default 365)")
    p.add_argument("--force", action="store_true", help="replace an existing CA and certs")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.add_argument("--json", action="store_true",
                   help="print the files written and each certificate's hosts as JSON")


def run(args: argparse.Namespace) -> int:
    subjects = make_certificates(args.system, args.out, days=args.days,
                                 extra_hosts=args.host, force=args.force)
    out = Path(args.out)
    if args.json:
        print(json.dumps({
            "out": str(out), "ca": str(out / "ca.pem"), "ca_key": str(out / "ca.key"),
            "days": args.days,
            "certificates": {stem: {"cert": str(out / f"{stem}.pem"),
                                    "key": str(out / f"{stem}.key"), "hosts": hosts}
                             for stem, hosts in subjects.items()}}, indent=2))
    elif not args.quiet:
        for stem, hosts in subjects.items():
            names = ", ".join(hosts) if hosts else \
                "no host (give the device an address or --host)"
            print(f"{out / (stem + '.pem')}: {names}")
        print(f"CA: {out / 'ca.pem'} (keep ca.key offline)")
    return 0
