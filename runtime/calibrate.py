"""Calibration: a running cost table from what the workers measure (issue 13, executor side).

The compiler prices a plan on a cost table built from the system file (and profiles).
While serving, :class:`Calibration` keeps, per device, a **compute scale factor**
(measured compute / estimated compute of the units it ran, summed over a window, then
smoothed over windows with an EWMA) and, per link, a **transfer time factor** (measured
acknowledged transfer time / the cost model's ``bytes / bandwidth + latency`` for the
same bytes, likewise; see :mod:`runtime.metrics`). :meth:`Calibration.table` is the
original cost table with every bundle's compute multiplied by its device's factor and
every transfer between devices multiplied by its link's factor (the link's bandwidth
divided and its latency multiplied by it, for the routed messages that the cost model
prices on the table's system); the current plan and any
alternative are then priced on it by the one cost model
(:func:`partitioner.analysis.routing.reprice` -> :mod:`partitioner.analysis.estimate`)
and re-solved by the one solver (:func:`partitioner.pipeline.solve_on`). No second cost
model: only the table's entries change.

Two references (``baseline``):

* ``"first"`` (default): a factor is measured relative to the device's (link's) own first
  :data:`BASELINE_WINDOWS` windows, i.e. the plan's figures are taken as right when
  serving starts and only their *drift* is applied, in seconds: with ``r`` the window's
  measured / estimated ratio and ``r0`` the reference's, the factor is ``1 + r - r0``
  (the estimate plus what the measurement gained since). A system file whose figures are off
  by a constant per device (loopback test hosts, a file written from data sheets) then
  does not trigger a re-plan onto devices that have not been measured yet, whose figures
  are just as far off - and back again once they are measured (flapping);
* ``"file"``: the absolute ratio measured / estimated (right when the system file or the
  profiles describe the real devices).

A device or link with no measurement keeps the factor 1 (its file figures). A link is
undirected in the system file: its factor is over the transfers of both directions,
each weighted by its estimated time.

Imported by the executor side only (it needs the compiler); a worker never imports it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the compiler is imported by the functions that price (lazily)
    from partitioner import ir

__all__ = ["Calibration", "unit_estimates", "BASELINE_WINDOWS", "BASELINES"]

BASELINE_WINDOWS = 2  # windows averaged into a device's reference ("first")
BASELINES = ("first", "file")
_CLAMP = (1e-3, 1e6)  # a factor outside this is a measurement glitch, not a device


def _pair(a: str, b: str) -> tuple[str, str]:
    """The key of the undirected link between ``a`` and ``b``."""
    return (a, b) if a <= b else (b, a)


def _clamp(x: float) -> float:
    return min(max(x, _CLAMP[0]), _CLAMP[1])


def _frequency(plan: ir.Plan, table: ir.CostTable, device: str,
               chosen: str | None) -> str | None:
    if chosen is not None:
        return chosen
    if device in plan.frequencies and plan.frequencies[device] is not None:
        return plan.frequencies[device]
    return (table.frequencies.get(device) or (None,))[0]


def unit_estimates(table: ir.CostTable, plan: ir.Plan) -> dict[str, tuple[str, float]]:
    """Unit key (``"3"``, ``"3.1"``) -> (device, estimated compute seconds per request).

    A whole stage gets the compute of the canonical bundles of its placement (the cost
    model's split; a bundle spanning two stages is shared by layer count); a part gets
    its device's single-layer prices times its share of the stage's output rows.
    """
    from partitioner.analysis.estimate import canonical_bundles
    from partitioner.analysis.routing import placement_of

    placement = placement_of(plan, table)
    if placement is None:
        return {}
    layer_at = {p.index: p.layer for p in table.positions}
    per_layer: dict[int, float] = {}
    for b in canonical_bundles(table, placement):
        in_bundle = [layer_at[k] for k in range(b.first, b.last + 1)]
        layers = [k for k in in_bundle if k is not None]
        cost = table.bundles.get((b.first, b.last, b.device,
                                  _frequency(plan, table, b.device, None)))
        if cost is None or not layers:
            continue
        for layer in layers:
            per_layer[layer] = cost.compute / len(layers)
    position_of = {p.layer: p.index for p in table.positions if p.layer is not None}
    out: dict[str, tuple[str, float]] = {}
    for i, s in enumerate(plan.stages):
        sid = s.id if s.id >= 0 else i
        if s.parts is None:
            if s.device is not None:
                out[str(sid)] = (s.device, sum(per_layer.get(k, 0.0)
                                               for k in range(s.first, s.last + 1)))
            continue
        height = sum(p.rows[1] - p.rows[0] + 1 for p in s.parts)
        for j, part in enumerate(s.parts):
            total = 0.0
            for k in range(s.first, s.last + 1):
                pos = position_of[k]
                cost = table.bundles.get((pos, pos, part.device, _frequency(
                    plan, table, part.device, part.frequency)))
                total += cost.compute if cost is not None else 0.0
            share = (part.rows[1] - part.rows[0] + 1) / max(height, 1)
            out[f"{sid}.{j}"] = (part.device, total * share)
    return out


@dataclasses.dataclass
class _Factor:
    """One smoothed ratio, with its reference taken from the first windows."""

    value: float | None = None  # EWMA of the window ratios
    reference: float | None = None
    firsts: list[float] = dataclasses.field(default_factory=list)
    windows: int = 0
    last: int = 0  # the calibration window that updated it last

    def update(self, ratio: float, alpha: float, fixed: float | None, window: int) -> None:
        self.windows += 1
        self.last = window
        self.value = ratio if self.value is None else alpha * ratio + (1 - alpha) * self.value
        if fixed is not None:
            self.reference = fixed
        elif self.reference is None:
            self.firsts.append(ratio)
            if len(self.firsts) >= BASELINE_WINDOWS:
                self.reference = sum(self.firsts) / len(self.firsts)

    def factor(self, now: int, forget: float | None, relative: bool) -> float | None:
        """The factor; one not measured for ``w`` windows moves back towards 1 with a
        half-life of ``forget`` windows (see :class:`Calibration`)."""
        if self.value is None or self.reference is None or self.reference <= 0:
            return None
        # relative: the estimate plus the change measured since the reference windows, in
        # units of the estimate (seconds added, not a ratio of ratios: a figure the file
        # gets 8x too low would otherwise scale a real slowdown, or the noise, 8x down)
        f = _clamp(1.0 + self.value - self.reference if relative else self.value)
        stale = now - self.last
        if forget and stale > 1:
            f = 1.0 + (f - 1.0) * 0.5 ** ((stale - 1) / forget)
        return f


class Calibration:
    """The running cost table (see the module doc).

    Args:
        table: the cost table the plans were priced with (from the system file).
        alpha: EWMA weight of the newest window.
        baseline: ``"first"`` or ``"file"`` (see the module doc).
        forget: half-life, in windows, of a factor that is no longer measured (a device
            the plan left): it moves back towards 1, so a host that recovered is tried
            again (the switch's trial request measures it before any other request goes
            there); ``None``: never.
    """

    def __init__(self, table: ir.CostTable, *, alpha: float = 0.5,
                 baseline: str = "first", forget: float | None = None) -> None:
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {', '.join(BASELINES)}")
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.base_table = table
        self.alpha = alpha
        self.forget = forget
        self._relative = baseline == "first"
        self.window = 0  # windows ended so far
        self.baseline = baseline
        self._compute: dict[str, _Factor] = {}
        self._links: dict[tuple[str, str], _Factor] = {}
        self._window: dict[str, list[float]] = {}  # device -> [measured, estimated, n]
        self._window_links: dict[tuple[str, str], list[float]] = {}  # [measured, est.]

    # ------------------------------------------------------------------ observations
    def observe_unit(self, device: str, measured: float, estimated: float) -> None:
        """One unit run: its measured and estimated compute seconds."""
        if estimated <= 0 or measured < 0:
            return
        acc = self._window.setdefault(device, [0.0, 0.0, 0])
        acc[0] += measured
        acc[1] += estimated
        acc[2] += 1

    def observe_link(self, src: str, dst: str, seconds: float, nbytes: float) -> None:
        """A transfer of ``nbytes`` from ``src`` to ``dst`` took ``seconds`` until the
        receiver's answer; ignored for a pair the system does not link."""
        from partitioner.analysis.costs import network_transfer

        sys = self.base_table.system
        if src == dst or seconds <= 0 or sys.link(src, dst) is None:
            return
        est = network_transfer(sys, sys.device(src), sys.device(dst), nbytes)
        if est is None or est.time <= 0:
            return
        # both directions of the (undirected) link together, weighted by their estimated
        # times: a small message's fixed overhead is noise next to a large one's transfer
        # and must not scale it (it would, as a factor of its own)
        acc = self._window_links.setdefault(_pair(src, dst), [0.0, 0.0])
        acc[0] += seconds
        acc[1] += est.time

    def end_window(self, min_samples: int = 1) -> None:
        """Fold the window's observations into the factors (a device with fewer than
        ``min_samples`` runs in the window keeps its factor)."""
        self.window += 1
        fixed = 1.0 if self.baseline == "file" else None
        for device, (measured, estimated, n) in self._window.items():
            if n >= min_samples and estimated > 0:
                self._compute.setdefault(device, _Factor()).update(
                    measured / estimated, self.alpha, fixed, self.window)
        for key, (measured, estimated) in self._window_links.items():
            self._links.setdefault(key, _Factor()).update(measured / estimated, self.alpha,
                                                          fixed, self.window)
        self._window.clear()
        self._window_links.clear()

    def _file_bandwidth(self, src: str, dst: str) -> float | None:
        sys = self.base_table.system
        link = sys.link(src, dst)
        if link is None:
            return None
        return min(sys.device(src).network_bandwidth, sys.device(dst).network_bandwidth,
                   link.bandwidth)

    # ------------------------------------------------------------------ results
    def calibrated(self, devices: Iterable[str]) -> bool:
        """Whether every device of ``devices`` has a compute factor."""
        return all(d in self._compute
                   and self._compute[d].factor(self.window, self.forget, self._relative) is not None
                   for d in devices)

    def compute_factors(self) -> dict[str, float]:
        return self._factors(self._compute)

    def link_factors(self) -> dict[tuple[str, str], float]:
        return self._factors(self._links)

    def _factors(self, factors: Mapping[Any, _Factor]) -> dict[Any, float]:
        out = {k: f.factor(self.window, self.forget, self._relative)
               for k, f in factors.items()}
        return {k: v for k, v in out.items() if v is not None}

    def summary(self) -> dict[str, Any]:
        return {"compute": self.compute_factors(),
                "links": {f"{a}-{b}": g for (a, b), g in self.link_factors().items()}}

    def table(self) -> ir.CostTable:
        """The base table with the current factors applied (see the module doc)."""
        t = self.base_table
        compute = self.compute_factors()
        links = self.link_factors()
        bundles: Mapping[tuple[int, int, str, str | None], ir.BundleCost] = {
            key: dataclasses.replace(cost, compute=cost.compute * compute[key[2]])
            if key[2] in compute else cost for key, cost in t.bundles.items()}
        system = t.system
        transfers = dict(t.transfers)
        if links:
            system = self._scaled_system(links)
            for (after, src, dst), tr in t.transfers.items():
                g = self._link_factor(links, src, dst)
                if src != dst and g != 1.0:
                    transfers[(after, src, dst)] = dataclasses.replace(tr, time=tr.time * g)
        return dataclasses.replace(t, bundles=bundles, transfers=transfers, system=system)

    @staticmethod
    def _link_factor(links: Mapping[tuple[str, str], float], a: str, b: str) -> float:
        return links.get(_pair(a, b), 1.0)

    def _scaled_system(self, links: Mapping[tuple[str, str], float]) -> ir.System:
        """The system with each link's effective bandwidth (``min(NIC, NIC, link)``, SPEC
        §1) on the link itself divided by its factor, its latency multiplied by it, and
        the NIC caps lifted (they are in the link figure now): the routed messages are
        priced on ``table.system`` by the cost model's one link rule, ``bytes / bandwidth
        + latency``, which the factor thus scales as a whole."""
        sys = self.base_table.system
        out = []
        for link in sys.links:
            g = self._link_factor(links, link.a, link.b)
            eff = self._file_bandwidth(link.a, link.b) or link.bandwidth
            out.append(dataclasses.replace(link, bandwidth=eff / g, latency=link.latency * g))
        devices = tuple(dataclasses.replace(d, network_bandwidth=float("inf"))
                        for d in sys.devices)
        return dataclasses.replace(sys, devices=devices, links=tuple(out))
