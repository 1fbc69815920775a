"""The executor's side of ``ensure``: make every worker of a plan hold and serve its units.

:func:`ensure_units` sends the plan's manifest (unit specs and SHA-256s: kilobytes, no
weights) to the worker of every device the plan uses, in parallel. A worker started with
``--model`` builds its units from its own copy of the model and verifies them
(:mod:`runtime.build`); a worker started with a bundle directory finds the plan there (a
``fallback/<name>`` bundle, rescanned). Each worker is then health-checked: its ``ready``
answer must list every unit of its device under the plan's key. Only then may an
executor send requests on the plan; until then nothing about the old plan changed.
"""

from __future__ import annotations

import concurrent.futures as cf
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from runtime.protocol import ProtocolError, ensure_request
from runtime.stages import MAIN, BundleView, open_bundle
from runtime.transport import connect, parse_address, recv_frame, send_frame
from stagebundle.errors import UserError, fail
from stagebundle.manifest import Bundle

__all__ = ["ensure_units", "prepare_workers", "builds_from_model", "units_ensurer",
           "EnsureError"]


class EnsureError(UserError):
    """A worker could not hold a plan's units; the message names the device and why."""


def _bundle(plan: str | Path | Bundle | BundleView) -> Bundle:
    if isinstance(plan, BundleView):
        return plan.bundle
    if isinstance(plan, Bundle):
        return plan
    return open_bundle(plan).bundle


def _client_tls(tls: Any) -> ssl.SSLContext | None:
    """An ``ssl.SSLContext`` as is; a ``runtime.tls.TLSConfig`` as its client context."""
    if tls is None or isinstance(tls, ssl.SSLContext):
        return tls
    return tls.client_context()  # type: ignore[no-any-return]


def _ask(addr: tuple[str, int], header: Mapping[str, Any], timeout: float,
         tls: ssl.SSLContext | None) -> dict[str, Any]:
    with connect(addr, timeout, tls) as sock:
        send_frame(sock, header)
        return recv_frame(sock, max_body=0, frame_timeout=timeout).header


def _ensure_one(device: str, address: str, plan: Bundle, key: str, token: str | None,
                timeout: float, tls: ssl.SSLContext | None) -> dict[str, Any]:
    where = f"device {device} ({address})"
    try:
        addr = parse_address(address, what=f"host of {device}")
        reply = _ask(addr, ensure_request(key, plan.to_json(), token), timeout, tls)
        if reply.get("type") != "ensured":
            fail(f"{where}: {reply.get('message') or reply.get('code') or reply}")
        status = _ask(addr, {"type": "ready", "token": token}, timeout, tls)
    except (OSError, ValueError, ProtocolError) as err:
        raise EnsureError(f"{where}: plan {key}: {err.__class__.__name__}: {err}") from None
    except UserError as err:
        raise EnsureError(str(err)) from None
    if status.get("type") != "ready" or not status.get("ready"):
        raise EnsureError(f"{where}: plan {key}: not ready after loading it "
                          f"({status.get('message') or status.get('type')})")
    served = {s.get("stage") for s in status.get("stages", []) if s.get("plan") == key}
    missing = [u.key for u in plan.units() if u.device == device and u.key not in served]
    if missing:
        raise EnsureError(f"{where}: plan {key}: stage {missing[0]} is not served after "
                          f"loading it")
    return reply


def ensure_units(hosts: Mapping[str, str], plan: str | Path | Bundle | BundleView,
                 token: str | None = None, *, key: str = MAIN, tls: Any = None,
                 timeout: float = 300.0, devices: Sequence[str] | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Make the worker of every device of ``plan`` hold and serve its units under ``key``.

    Args:
        hosts: device -> ``"host:port"`` of its worker.
        plan: the plan's bundle (directory, loaded ``Bundle`` or ``BundleView``): the
            executor's side compiled it, so its manifest holds the expected digests.
        token: the workers' shared token.
        key: the plan key requests will name (``"main"``, ``"fallback/..."``,
            ``"adapt/p1"`` ...). A key is bound to one plan: a worker refuses another
            plan under a key it serves.
        tls: an ``ssl.SSLContext`` (client side) or a ``runtime.tls.TLSConfig``.
        timeout: seconds per worker (building a large stage takes a while).
        devices: only these devices (default: every device the plan uses).

    Returns:
        device -> the worker's ``ensured`` reply (``units``, ``built``, ``seconds``).

    Raises:
        EnsureError: a one-line message naming the (first, in device order) device that
            failed and why (unreachable, fingerprint or digest mismatch, unit not
            served). The workers that succeeded keep the plan loaded (unused until an
            executor sends on it); every worker keeps serving its other plans.
    """
    bundle = _bundle(plan)
    wanted = list(bundle.devices if devices is None else devices)
    missing = [d for d in wanted if d not in hosts]
    if missing:
        raise EnsureError(f"plan {key}: no host for device {missing[0]}")
    context = _client_tls(tls)
    with cf.ThreadPoolExecutor(max(1, len(wanted)), thread_name_prefix="ensure") as pool:
        futures = {d: pool.submit(_ensure_one, d, hosts[d], bundle, key, token, timeout,
                                  context) for d in wanted}
        results: dict[str, dict[str, Any]] = {}
        errors: list[str] = []
        for d in wanted:
            try:
                results[d] = futures[d].result()
            except EnsureError as err:
                errors.append(str(err))
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise EnsureError(errors[0] + more)
    return results


def builds_from_model(address: str, token: str | None, *, timeout: float = 5.0,
                      tls: Any = None) -> bool:
    """Whether the worker at ``address`` was started with ``--model`` (it reports its
    model's fingerprint); False when it does not answer or refuses the token."""
    try:
        status = _ask(parse_address(address), {"type": "ready", "token": token}, timeout,
                      _client_tls(tls))
    except (OSError, ValueError, ProtocolError):
        return False
    return status.get("type") == "ready" and status.get("model_sha256") is not None


def prepare_workers(hosts: Mapping[str, str], bundle_dir: str | Path,
                    token: str | None = None, *, tls: Any = None,
                    timeout: float = 300.0) -> list[str]:
    """Give every ``--model`` worker among ``hosts`` the bundle's plans (main and each
    ``fallback/*``) to build; workers of a bundle directory, and workers that do not
    answer (fail-over deals with those), are left alone. The devices prepared.

    Raises:
        EnsureError: a ``--model`` worker refused a plan (fingerprint, digest ...).
    """
    from runtime.stages import open_bundles

    builders = [d for d, a in hosts.items() if builds_from_model(a, token, tls=tls)]
    if not builders:
        return []
    for key, view in open_bundles(bundle_dir).items():
        mine = [d for d in view.devices if d in builders]
        if mine:
            ensure_units(hosts, view, token, key=key, tls=tls, timeout=timeout,
                         devices=mine)
    return builders


def units_ensurer(executor: Any, timeout: float = 300.0) -> Any:
    """``runtime.adapt``'s ``EnsureUnits`` through :func:`ensure_units`: the adapter's
    plan switch then works with ``--model`` workers (which build the new plan's units)
    and with workers of a bundle directory (which rescan it) alike."""
    from runtime.transport import format_address

    def ensure(device: str, addr: tuple[str, int], key: str, units: Sequence[str],
               sha256: str) -> None:
        ensure_units({device: format_address(addr)}, executor.views[key], executor.token,
                     key=key, tls=executor.tls, timeout=timeout, devices=[device])

    return ensure
