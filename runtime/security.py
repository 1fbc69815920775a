"""Shared-token authentication and the listening-address policy.

* A worker binds 127.0.0.1 unless told otherwise, and refuses any non-loopback address
  unless a token is configured (``--token-file``): an open port that runs models for
  anyone on the network is the thing to avoid.
* Every request but the liveness probe carries the token; it is compared in constant time
  (``hmac.compare_digest``) so the comparison does not leak how many bytes matched.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
from pathlib import Path

from stagebundle.errors import fail

__all__ = ["load_token", "token_matches", "check_bind", "is_loopback"]

_MAX_TOKEN = 4096


def load_token(path: str | Path | None) -> str | None:
    """The token in ``path`` (surrounding whitespace stripped); ``None`` without a path."""
    if path is None:
        return None
    p = Path(path)
    try:
        with p.open("rb") as f:  # bounded: --token-file /dev/zero must not fill memory
            data = f.read(_MAX_TOKEN + 1)
    except OSError as err:
        fail(f"--token-file {p}: cannot read it ({err.strerror or err})")
    if len(data) > _MAX_TOKEN:
        fail(f"--token-file {p}: longer than {_MAX_TOKEN} bytes")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        fail(f"--token-file {p}: not UTF-8 text")
    if not token:
        fail(f"--token-file {p}: the file is empty")
    if os.name == "posix" and p.stat().st_mode & stat.S_IROTH:
        # not fatal (tests and containers often have lax modes), but worth saying
        import logging

        logging.getLogger("runtime.security").warning(
            "--token-file %s is readable by every user; chmod 600 it", p)
    return token


def token_matches(expected: str | None, given: object) -> bool:
    """Constant-time check of a request's token (any token passes when none is set)."""
    if expected is None:
        return True
    if not isinstance(given, str):
        return False
    # "surrogatepass": a JSON header may carry a lone surrogate ("\\ud800"), which
    # plain UTF-8 cannot encode; it must be a wrong token, not a traceback
    return hmac.compare_digest(expected.encode("utf-8", "surrogatepass"),
                               given.encode("utf-8", "surrogatepass"))


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, what: str = "--listen") -> None:
    """Refuse to listen beyond loopback without a token."""
    if token is None and not is_loopback(host):
        fail(f"{what} {host}: refusing to listen on a non-loopback address without "
             f"--token-file")
