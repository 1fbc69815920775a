"""Load and validate a system file (devices, links, application) into an :class:`ir.System`.

The schema is the one in docs/INTERFACES.md ("System file"), in TOML or JSON. Beyond
it, a device may carry ``power`` (W while computing, for the analytic energy model) and
``frequency_flops`` / ``frequency_power`` aligned with ``frequencies`` (analytic figures
per DVFS operating point, SPEC §4 FreDDI).

A link is ``between = [a, b]`` (both directions) or directed, ``from = "a"``, ``to = "b"``
(data from ``a`` to ``b`` only), so two directed links give an asymmetric pair (QUANT's
5 MB/s up, 20 MB/s down); reachability from the source follows the directions.

Validation is strict: every problem is a one-line :class:`~partitioner.errors.UserError`
that names the file and the key, e.g. ``sys.toml: link 2: unknown device 'gpu' in
between``. Devices and links are numbered from 1 in messages, in file order.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from partitioner.analysis.energy import ENERGY_TERMS, NETWORK_PRESETS
from partitioner.errors import fail
from partitioner.ir import INF, Application, Device, Link, System

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

__all__ = ["load_system", "parse_system", "DEVICE_CLASSES", "NETWORKS"]

DEVICE_CLASSES = ("edge", "hub", "cloud")
NETWORKS = (*NETWORK_PRESETS, "custom")

_TOP_KEYS = {"device", "link", "application"}
_DEVICE_REQUIRED = ("name", "class", "flops", "memory_bandwidth", "network_bandwidth")
_DEVICE_KEYS = {*_DEVICE_REQUIRED, "memory", "frequencies", "frequency_flops",
                "frequency_power", "power", "idle_power", "carbon_intensity", "address",
                "trusted"}
_LINK_KEYS = {"between", "from", "to", "bandwidth", "latency", "network", *ENERGY_TERMS}
_APP_KEYS = {"source", "destination", "raw_input_bytes", "preprocess_flops", "duration"}


class _Checker:
    """Typed accessors that fail with ``FILE: WHERE: KEY ...`` messages."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, where: str, message: str) -> None:
        prefix = f"{self.file}: {where}: " if where else f"{self.file}: "
        fail(prefix + message)

    def keys(self, where: str, table: Any, allowed: set[str], kind: str) -> None:
        if not isinstance(table, Mapping):
            self.fail(where, f"expected a table, got {type(table).__name__}")
        unknown = sorted(set(table) - allowed)
        if unknown:
            self.fail(where, f"unknown key {unknown[0]!r} in {kind} "
                             f"(allowed: {', '.join(sorted(allowed))})")

    def number(self, where: str, table: Mapping[str, Any], key: str, *, required: bool = False,
               positive: bool = False, minimum: float | None = None) -> float | None:
        if key not in table:
            if required:
                self.fail(where, f"missing required key {key!r}")
            return None
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, f"{key} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            self.fail(where, f"{key} must be finite, got {value!r}")
        if positive and value <= 0:
            self.fail(where, f"{key} must be positive, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(where, f"{key} must be >= {minimum:g}, got {value!r}")
        return value

    def string(self, where: str, table: Mapping[str, Any], key: str, *,
               required: bool = False) -> str | None:
        if key not in table:
            if required:
                self.fail(where, f"missing required key {key!r}")
            return None
        value = table[key]
        if not isinstance(value, str) or not value:
            self.fail(where, f"{key} must be a non-empty string, got {value!r}")
        return value

    def number_list(self, where: str, table: Mapping[str, Any], key: str,
                    positive: bool) -> tuple[float, ...]:
        value = table.get(key, [])
        if not isinstance(value, list):
            self.fail(where, f"{key} must be a list of numbers, got {value!r}")
        out = []
        for i, item in enumerate(value):
            ok = not isinstance(item, bool) and isinstance(item, (int, float))
            if not ok or not math.isfinite(item) or (item <= 0 if positive else item < 0):
                need = "positive" if positive else "non-negative"
                self.fail(where, f"{key}[{i}] must be a {need} number, got {item!r}")
            out.append(float(item))
        return tuple(out)


def _read(path: Path) -> dict[str, Any]:
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        fail(f"{file}: no such system file")
    except (OSError, UnicodeDecodeError) as err:
        fail(f"{file}: cannot read system file: {err}")
    as_json = path.suffix.lower() == ".json" or (
        path.suffix.lower() != ".toml" and text.lstrip().startswith("{"))
    try:
        doc = json.loads(text) if as_json else tomllib.loads(text)
    except json.JSONDecodeError as err:
        fail(f"{file}: not valid JSON: {err}")
    except tomllib.TOMLDecodeError as err:
        fail(f"{file}: not valid TOML: {err}")
    if not isinstance(doc, dict):
        fail(f"{file}: expected a table/object at the top level")
    return doc


def _device(c: _Checker, i: int, table: Any) -> Device:
    where = f"device {i}"
    if isinstance(table, Mapping) and isinstance(table.get("name"), str) and table["name"]:
        where = f"device {i} ({table['name']!r})"
    c.keys(where, table, _DEVICE_KEYS, "device")
    name = c.string(where, table, "name", required=True)
    assert name is not None
    for key in _DEVICE_REQUIRED:
        if key not in table:
            c.fail(where, f"missing required key {key!r}")
    cls = table["class"]
    if cls not in DEVICE_CLASSES:
        c.fail(where, f"unknown class {cls!r} (expected one of {', '.join(DEVICE_CLASSES)})")
    flops = c.number(where, table, "flops", required=True, positive=True)
    mem_bw = c.number(where, table, "memory_bandwidth", required=True, positive=True)
    net_bw = c.number(where, table, "network_bandwidth", required=True, positive=True)
    memory = c.number(where, table, "memory", positive=True)
    freqs = table.get("frequencies", [])
    if not isinstance(freqs, list) or not all(isinstance(f, str) and f for f in freqs):
        c.fail(where, f"frequencies must be a list of non-empty strings, got {freqs!r}")
    if len(set(freqs)) != len(freqs):
        dup = next(f for f in freqs if freqs.count(f) > 1)
        c.fail(where, f"frequency {dup!r} listed twice in frequencies")
    freq_flops = c.number_list(where, table, "frequency_flops", positive=True)
    freq_power = c.number_list(where, table, "frequency_power", positive=False)
    for key, values in (("frequency_flops", freq_flops), ("frequency_power", freq_power)):
        if key in table and len(values) != len(freqs):
            c.fail(where, f"{key} has {len(values)} entries but frequencies has "
                          f"{len(freqs)}; they must be aligned")
    trusted = table.get("trusted", False)
    if not isinstance(trusted, bool):
        c.fail(where, f"trusted must be true or false, got {trusted!r}")
    assert flops is not None and mem_bw is not None and net_bw is not None
    address = c.string(where, table, "address")
    if address is not None:  # what `runtime serve` listens on / `runtime run` dials
        host, sep, port = address.strip().rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
            c.fail(where, f"address must be HOST:PORT (e.g. \"10.0.0.2:7000\"), "
                          f"got {address!r}")
    return Device(
        name=name, device_class=cls, flops=flops, memory_bandwidth=mem_bw,
        network_bandwidth=net_bw, memory=INF if memory is None else memory,
        frequencies=tuple(freqs), frequency_flops=freq_flops, frequency_power=freq_power,
        power=c.number(where, table, "power", minimum=0.0),
        idle_power=c.number(where, table, "idle_power", minimum=0.0),
        carbon_intensity=c.number(where, table, "carbon_intensity", minimum=0.0),
        address=address, trusted=trusted)


def _link_ends(c: _Checker, where: str, table: Mapping[str, Any], names: set[str]
               ) -> tuple[str, str, bool]:
    """``between = [a, b]`` (both directions) or ``from = a``, ``to = b`` (one direction)."""
    directed = "from" in table or "to" in table
    if directed and "between" in table:
        c.fail(where, "give either between or from/to, not both")
    if directed:
        ends = []
        for key in ("from", "to"):
            end = c.string(where, table, key, required=True)
            assert end is not None
            ends.append(end)
        key_of = {0: "from", 1: "to"}
    else:
        if "between" not in table:
            c.fail(where, "missing required key 'between' (or from/to for a directed link)")
        ends = table["between"]
        if (not isinstance(ends, list) or len(ends) != 2
                or not all(isinstance(n, str) for n in ends)):
            c.fail(where, f"between must be a list of two device names, got {ends!r}")
        key_of = {0: "between", 1: "between"}
    for k, n in enumerate(ends):
        if n not in names:
            c.fail(where, f"unknown device {n!r} in {key_of[k]}")
    if ends[0] == ends[1]:
        c.fail(where, f"{'from and to name' if directed else 'between names'} "
                      f"{ends[0]!r} twice; a link joins two devices")
    return ends[0], ends[1], directed


def _link(c: _Checker, i: int, table: Any, names: set[str]) -> Link:
    where = f"link {i}"
    c.keys(where, table, _LINK_KEYS, "link")
    a, b, directed = _link_ends(c, where, table, names)
    bandwidth = c.number(where, table, "bandwidth", required=True, positive=True)
    latency = c.number(where, table, "latency", minimum=0.0) or 0.0
    network = c.string(where, table, "network")
    terms: dict[str, float | None] = {k: c.number(where, table, k, minimum=0.0)
                                      for k in ENERGY_TERMS}
    if network is not None:
        if network not in NETWORKS:
            c.fail(where, f"unknown network {network!r} (expected one of "
                          f"{', '.join(NETWORKS)})")
        if network in NETWORK_PRESETS:
            preset = NETWORK_PRESETS[network]
            # Terms given next to a preset override that term only.
            terms = {k: getattr(preset, k) if v is None else v for k, v in terms.items()}
    given = [k for k, v in terms.items() if v is not None]
    if (given or network == "custom") and len(given) != len(ENERGY_TERMS):
        missing = [k for k in ENERGY_TERMS if terms[k] is None]
        c.fail(where, f"custom network energy model needs {', '.join(ENERGY_TERMS)} "
                      f"(missing {', '.join(missing)})")
    assert bandwidth is not None
    return Link(a=a, b=b, bandwidth=bandwidth, latency=latency, network=network,
                directed=directed, **terms)


def _application(c: _Checker, table: Any, names: set[str]) -> Application:
    where = "application"
    c.keys(where, table, _APP_KEYS, "application")
    ends: dict[str, str | None] = {}
    for key in ("source", "destination"):
        ends[key] = c.string(where, table, key)
        if ends[key] is not None and ends[key] not in names:
            c.fail(where, f"{key} names unknown device {ends[key]!r}")
    raw = table.get("raw_input_bytes")
    if raw is not None and (isinstance(raw, bool) or not isinstance(raw, int) or raw <= 0):
        c.fail(where, f"raw_input_bytes must be a positive integer, got {raw!r}")
    return Application(
        source=ends["source"], destination=ends["destination"], raw_input_bytes=raw,
        preprocess_flops=c.number(where, table, "preprocess_flops", minimum=0.0),
        duration=c.number(where, table, "duration", positive=True))


def _reachable(start: str, links: tuple[Link, ...]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        here = todo.pop()
        for link in links:
            for a, b in ((link.a, link.b), (link.b, link.a)):
                if a == here and b not in seen and link.carries(a, b):
                    seen.add(b)
                    todo.append(b)
    return seen


def parse_system(doc: Mapping[str, Any], file: str = "<system>") -> System:
    """Validate an already parsed system document (TOML/JSON tables) into a System.

    Args:
        doc: the top-level table.
        file: the name used in error messages.

    Raises:
        UserError: naming ``file`` and the offending key for any schema violation.
    """
    c = _Checker(file)
    c.keys("", doc, _TOP_KEYS, "the top level")
    raw_devices = doc.get("device", [])
    if not isinstance(raw_devices, list) or not raw_devices:
        c.fail("", "needs at least one [[device]]")
    devices: list[Device] = []
    for i, table in enumerate(raw_devices, start=1):
        dev = _device(c, i, table)
        if any(d.name == dev.name for d in devices):
            c.fail(f"device {i}", f"duplicate device name {dev.name!r}")
        devices.append(dev)
    names = {d.name for d in devices}
    raw_links = doc.get("link", [])
    if not isinstance(raw_links, list):
        c.fail("", "link must be an array of tables ([[link]])")
    links: list[Link] = []
    for i, table in enumerate(raw_links, start=1):
        link = _link(c, i, table, names)
        for j, other in enumerate(links, start=1):
            if any(other.carries(s, r) for s, r in ((link.a, link.b), (link.b, link.a))
                   if link.carries(s, r)):
                what = (f"from {link.a!r} to {link.b!r}" if link.directed
                        else f"between {link.a!r} and {link.b!r}")
                c.fail(f"link {i}", f"link {what} is already listed as link {j}")
        links.append(link)
    app = _application(c, doc.get("application", {}), names)
    if app.source is not None:
        # Every device must be able to receive the input from the source (SPEC §1).
        unreachable = [d.name for d in devices if d.name not in _reachable(app.source,
                                                                           tuple(links))]
        if unreachable:
            c.fail("", f"device {unreachable[0]!r} is unreachable from the source "
                       f"{app.source!r} (no path of links)")
    return System(devices=tuple(devices), links=tuple(links), application=app, path=file)


def load_system(path: str | Path) -> System:
    """Read and validate a system file (TOML, or JSON by ``.json`` suffix or content).

    Args:
        path: the system file.

    Returns:
        The validated :class:`ir.System` (``path`` set to ``str(path)``); network presets
        (``3g``, ``4g``, ``wifi``) have their energy terms filled in from SPEC §4.

    Raises:
        UserError: one line naming the file and the key that is wrong.
    """
    path = Path(path)
    return parse_system(_read(path), str(path))
