"""The devices, links and application of a system file.

Part of :mod:`partitioner.ir`; import the names from there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# --------------------------------------------------------------------------- system

INF = float("inf")

DeviceClass = Literal["edge", "hub", "cloud"]


@dataclass(frozen=True)
class Device:
    """A device of the system file (SPEC §1). Bandwidths in B/s, memory in B, power in W.

    ``frequencies`` are labels (``"614MHz"``); ``frequency_flops`` / ``frequency_power``,
    when given, are aligned with them and override ``flops`` / ``power`` per frequency for
    the analytic model. ``power`` is the power drawn while computing (analytic energy).
    """

    name: str
    device_class: DeviceClass
    flops: float
    memory_bandwidth: float
    network_bandwidth: float
    memory: float = INF
    frequencies: tuple[str, ...] = ()
    frequency_flops: tuple[float, ...] = ()
    frequency_power: tuple[float, ...] = ()
    power: float | None = None
    idle_power: float | None = None
    carbon_intensity: float | None = None
    address: str | None = None
    trusted: bool = False


@dataclass(frozen=True)
class Link:
    """A link between ``a`` and ``b``. ``bandwidth`` B/s, ``latency`` s per transfer.

    Undirected (``between``) by default; ``directed`` links carry data from ``a`` to ``b``
    only (system file ``from``/``to``), so two of them give an asymmetric pair.

    Energy model of a transfer (SPEC §4, FreDDI): upload power
    ``up_alpha * up_mbps + beta`` on the sender, download power
    ``down_alpha * down_mbps + beta`` on the receiver, times the transfer time. ``network``
    names a preset (3g, 4g, wifi) whose terms the loader has already filled in.
    """

    a: str
    b: str
    bandwidth: float
    latency: float = 0.0
    network: str | None = None
    up_alpha: float | None = None
    down_alpha: float | None = None
    beta: float | None = None
    up_mbps: float | None = None
    down_mbps: float | None = None
    directed: bool = False

    def carries(self, src: str, dst: str) -> bool:
        """Whether data can go from ``src`` to ``dst`` over this link."""
        if self.directed:
            return (self.a, self.b) == (src, dst)
        return {self.a, self.b} == {src, dst} and src != dst

    @property
    def has_energy_model(self) -> bool:
        return None not in (self.up_alpha, self.down_alpha, self.beta, self.up_mbps,
                            self.down_mbps)


@dataclass(frozen=True)
class Application:
    """Where the input comes from and the result goes (SPEC §2 pseudo layers)."""

    source: str | None = None
    destination: str | None = None
    raw_input_bytes: int | None = None
    preprocess_flops: float | None = None
    duration: float | None = None


@dataclass(frozen=True)
class System:
    devices: tuple[Device, ...]
    links: tuple[Link, ...]
    application: Application = Application()
    path: str | None = None

    def device(self, name: str) -> Device:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def link(self, a: str, b: str) -> Link | None:
        """The link that carries data from ``a`` to ``b`` (a directed one first)."""
        found = None
        for link in self.links:
            if link.carries(a, b):
                if link.directed:
                    return link
                found = found or link
        return found


