"""The extended chain and its prices: what the analysis stage hands the solver.

Part of :mod:`partitioner.ir`; import the names from there."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from partitioner.ir.plan import ExitHead
from partitioner.ir.system import System

# --------------------------------------------------------------------------- costs

PositionKind = Literal["source", "preprocess", "layer", "destination"]


@dataclass(frozen=True)
class Position:
    """One element of the extended chain the solver places (SPEC §2).

    Attributes:
        index: position in the extended chain.
        name: layer name, or ``"<source>"``, ``"<preprocess>"``, ``"<destination>"``.
        kind: what it is; only ``"layer"`` positions count towards MBS and form stages.
        layer: the model layer index for ``kind == "layer"``, else None.
        weight_bytes: bytes of weights held by the device that runs it (memory constraint).
        allowed: devices it may run on (pins: source, destination, private); None = any.
        weights: names of the initialisers it reads; a weight shared by several positions
            on one device is held once (``CostTable.weight_sizes``).
    """

    index: int
    name: str
    kind: PositionKind
    layer: int | None
    weight_bytes: int
    allowed: tuple[str, ...] | None = None
    weights: tuple[str, ...] = ()


@dataclass(frozen=True)
class BundleCost:
    """Price of running positions ``first..last`` as one bundle on a device at a frequency.

    Attributes:
        compute: seconds of compute (a profiled bundle's whole measured latency).
        weight_loading: seconds to load the bundle's weights (analytic model; 0 profiled).
        internal: seconds of same-device transfers between the bundle's positions
            (analytic model, internal bandwidth; 0 when profiled).
        hidden: seconds of weight loading hidden by preloading (ODIWeP) when this bundle
            *starts a run* (the previous position ran on another device); 0 without
            preloading.
        energy: joules the device spends on the bundle (None when unknown).
    """

    compute: float
    weight_loading: float = 0.0
    internal: float = 0.0
    hidden: float = 0.0
    energy: float | None = None

    @property
    def time(self) -> float:
        """Latency of the bundle when it does not start a run."""
        return self.compute + self.weight_loading + self.internal


@dataclass(frozen=True)
class TransferCost:
    """Moving the cut after a position from ``src`` to ``dst`` (``src == dst``: internal)."""

    time: float
    sender_energy: float | None = None
    receiver_energy: float | None = None


@dataclass(frozen=True)
class CostTable:
    """Everything the solver needs, priced. Built by ``partitioner.analysis``.

    Attributes:
        graph_name / graph_sha256: the model the table prices.
        positions: the extended chain (pseudo layers and model layers, in order).
        system: the devices, links and application.
        frequencies: per device, the frequency labels the solver may choose from; a device
            without DVFS has ``(None,)``.
        bundles: ``(first, last, device, frequency) -> BundleCost`` for every legal bundle:
            a pseudo position alone, or a run of model-layer positions at most ``mbs`` long.
            ``build_cost_table`` makes it a :class:`partitioner.ir.prices.BundlePrices`
            (the same mapping, held as numpy columns that the solver reads directly); any
            other mapping (a dict) is accepted too.
        transfers: ``(after, src, dst) -> TransferCost`` for the cut after position
            ``after``; a missing key means ``src`` and ``dst`` are not connected.
        mbs: maximum bundle size in model layers.
        preload: whether weight preloading (ODIWeP) is modelled (``BundleCost.hidden``).
        sources: per device, ``"analytic"`` or ``"profile"`` (for the report).
        weight_sizes: bytes of every initialiser named in ``Position.weights`` (a weight
            shared by several positions on one device is held once).
        variants: the int8 variants the solver may choose per candidate layer (QUANT),
            None without ``--quantize`` (:mod:`partitioner.analysis.variants`).
        exits: ``(position, head, nbytes)`` of every early-exit head (DISS §6.4), in chain
            order: the position of the layer that produces the head's output, and that
            output's size (what a request that exits sends to the destination). A bundle never
            runs past such a position (the exit decision is taken there); see
            docs/EXITS.md.
        row_latency: ``(model layer, device, frequency) -> ((rows, seconds), ...)``: the
            measured row parts of ``profile --spatial``, rows ascending, for the spatial
            cost model (:mod:`partitioner.analysis.row_profile`); empty without them.
    """

    graph_name: str
    graph_sha256: str
    positions: tuple[Position, ...]
    system: System
    frequencies: Mapping[str, tuple[str | None, ...]]
    bundles: Mapping[tuple[int, int, str, str | None], BundleCost]
    transfers: Mapping[tuple[int, str, str], TransferCost]
    mbs: int
    preload: bool = True
    sources: Mapping[str, str] = field(default_factory=dict)
    weight_sizes: Mapping[str, int] = field(default_factory=dict)
    variants: VariantCosts | None = None
    exits: tuple[tuple[int, ExitHead, int], ...] = ()
    row_latency: Mapping[tuple[int, str, str | None], tuple[tuple[int, float], ...]] = \
        field(default_factory=dict)

    @property
    def device_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.system.devices)


@dataclass(frozen=True)
class NoiseTerm:
    """One monomial of the fitted noise polynomial: ``coef * prod(q_k for k in layers)``."""

    layers: tuple[int, ...]
    coef: float


@dataclass(frozen=True)
class VariantCosts:
    """What switching candidate layers to their int8 variant changes (QUANT, SPEC §5).

    Attributes:
        candidates: the model layers that may run as int8, ascending.
        compute: ``(layer, device, frequency) -> (seconds, joules)`` saved when the layer
            runs as int8 on that device (negative: the variant is slower); the joules are
            None when the device has no energy figure.
        wire: ``(after, triggers) -> bytes`` saved on the cut after *position* ``after``
            when it crosses devices between two model layers and any layer of
            ``triggers`` is int8: those tensors then travel as 8-bit integers (``g'``;
            ONNX Runtime quantises a tensor when its producer or any reader is int8).
        int8_triggers: per tensor, the candidate layers any of which makes it travel int8.
        noise: the fitted noise polynomial ``eta(q)`` (no constant term: nothing int8, no
            noise); empty when no noise model was fitted.
        noise_error: mean absolute error of the fit on held-out random configurations.
        source: how the compute figures were obtained (for the report).
        checked: ``(layers, measured noise)`` of configurations measured after a solve;
            one measured above the cap is excluded from the solve (a no-good cut).
    """

    candidates: tuple[int, ...]
    compute: Mapping[tuple[int, str, str | None], tuple[float, float | None]]
    wire: Mapping[tuple[int, tuple[int, ...]], int] = field(default_factory=dict)
    int8_triggers: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    noise: tuple[NoiseTerm, ...] = ()
    noise_error: float | None = None
    source: str = "analytic"
    checked: tuple[tuple[tuple[int, ...], float], ...] = ()


