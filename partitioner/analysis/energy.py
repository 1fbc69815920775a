"""Energy terms of the analytic model: network presets and transfer / compute energy.

SPEC §4 (FreDDI): a transfer costs the sender ``P_up = a_up * tau_up + beta`` and the
receiver ``P_down = a_down * tau_down + beta`` watts for the transfer time, where ``tau``
is the throughput in Mbps of the link's network model. The reference parameters of the
three published networks are :data:`NETWORK_PRESETS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.ir import Device, Link

__all__ = [
    "NetworkModel",
    "NETWORK_PRESETS",
    "ENERGY_TERMS",
    "upload_power",
    "download_power",
    "transfer_energy",
    "compute_power",
    "compute_flops",
]


@dataclass(frozen=True)
class NetworkModel:
    """The five terms of a network's energy model (SPEC §4 table)."""

    up_alpha: float  # W per Mbps of upload throughput
    down_alpha: float  # W per Mbps of download throughput
    beta: float  # W, constant part of both sides
    up_mbps: float
    down_mbps: float


# SPEC §4 table (FreDDI reference parameters): 3G, 4G, WiFi.
NETWORK_PRESETS: dict[str, NetworkModel] = {
    "3g": NetworkModel(up_alpha=6.95, down_alpha=0.98, beta=0.82, up_mbps=0.14,
                       down_mbps=0.25),
    "4g": NetworkModel(up_alpha=3.51, down_alpha=0.42, beta=1.29, up_mbps=0.73,
                       down_mbps=1.72),
    "wifi": NetworkModel(up_alpha=2.27, down_alpha=1.10, beta=0.13, up_mbps=2.36,
                         down_mbps=6.87),
}

#: The link keys of a custom energy model, in the order of :class:`NetworkModel`.
ENERGY_TERMS: tuple[str, ...] = ("up_alpha", "down_alpha", "beta", "up_mbps", "down_mbps")


def upload_power(link: Link) -> float | None:
    """Sender power in W while transferring over ``link`` (None: no energy model)."""
    if not link.has_energy_model:
        return None
    assert link.up_alpha is not None and link.up_mbps is not None and link.beta is not None
    return link.up_alpha * link.up_mbps + link.beta


def download_power(link: Link) -> float | None:
    """Receiver power in W while transferring over ``link`` (None: no energy model)."""
    if not link.has_energy_model:
        return None
    assert link.down_alpha is not None and link.down_mbps is not None
    assert link.beta is not None
    return link.down_alpha * link.down_mbps + link.beta


def transfer_energy(link: Link, seconds: float) -> tuple[float | None, float | None]:
    """Joules spent by (sender, receiver) on a transfer of ``seconds`` over ``link``."""
    up, down = upload_power(link), download_power(link)
    return (None if up is None else up * seconds,
            None if down is None else down * seconds)


def _frequency_index(device: Device, frequency: str | None) -> int | None:
    if frequency is None or frequency not in device.frequencies:
        return None
    return device.frequencies.index(frequency)


def compute_flops(device: Device, frequency: str | None) -> float:
    """FLOP/s of ``device`` at ``frequency`` (``frequency_flops`` when given, else ``flops``)."""
    i = _frequency_index(device, frequency)
    if i is not None and device.frequency_flops:
        return device.frequency_flops[i]
    return device.flops


def compute_power(device: Device, frequency: str | None) -> float | None:
    """Watts drawn while computing at ``frequency`` (``frequency_power``, else ``power``)."""
    i = _frequency_index(device, frequency)
    if i is not None and device.frequency_power:
        return device.frequency_power[i]
    return device.power
