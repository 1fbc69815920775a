"""The intermediate representation that the compiler stages hand each other.

Only frozen dataclasses live here, with no dependency beyond the standard library:

* the front end produces a :class:`LayerGraph` (major layers and the cuts between them);
* the system file loader produces a :class:`System` (devices, links, application);
* the analysis stage turns both (plus optional profiles) into a :class:`CostTable`, priced
  over an *extended chain* of :class:`Position` objects (pseudo layers plus model layers);
* the solver turns a :class:`CostTable` and an :class:`Objective` into a :class:`Plan`;
* the back end turns a :class:`Plan` into a deployment bundle.

Index conventions (see docs/INTERFACES.md): model layers are 0-based positions in the
topological order that ``partitioner inspect`` prints. ``LayerGraph.layers[k].cut_bytes`` is
the size of every tensor live across the cut *after* layer ``k`` (for the last layer, the
model outputs). Positions of the extended chain are numbered separately (0 is the source
pseudo layer when there is one); ``Position.layer`` maps back to the model layer index.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "DeviceClass",
    "TensorInfo",
    "Layer",
    "Cut",
    "LayerGraph",
    "Device",
    "Link",
    "Application",
    "System",
    "PositionKind",
    "Position",
    "BundleCost",
    "TransferCost",
    "CostTable",
    "NoiseTerm",
    "VariantCosts",
    "ObjectiveKind",
    "Objective",
    "RowOp",
    "Part",
    "ExitHead",
    "Route",
    "Stage",
    "Estimate",
    "PlanStatus",
    "Plan",
    "INF",
]

INF = float("inf")

# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class TensorInfo:
    """A tensor with a fully static shape.

    Attributes:
        name: ONNX value name.
        shape: static dimensions (all ints >= 0).
        dtype: numpy dtype name, e.g. ``"float32"``, ``"int64"``.
        nbytes: product of ``shape`` times the element size.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Layer:
    """One major layer (or one node with ``--granularity node``).

    Attributes:
        index: 0-based position in the linearised (topological) order.
        name: readable, unique name (module scope for PyTorch exports, else the node name).
        ops: ONNX op types of the nodes it carries, in order (e.g. ``("Conv", "Relu")``).
        nodes: indices into ``graph.node`` of the prepared model that belong to this layer.
        flops: floating point operations (a multiply-accumulate counts 2; cheap ops 1 per
            output element).
        weight_count: number of weight parameters (initialisers and ``Constant`` nodes).
        weight_bytes: bytes of those weights.
        output_bytes: bytes of the tensors this layer produces that something else uses.
        cut_bytes: bytes of every tensor live across the cut after this layer.
        consumes: non-weight tensors it reads that another layer (or the model input)
            produces, in first-use order: the edges of the tensor DAG (stage graph routing).
        produces: tensors it produces that a later layer or the model output reads.
        weights: names of the initialisers it reads (a shared one appears in several
            layers; ``LayerGraph.initializer_bytes`` gives each one's size once).
        rows: the row geometry of its ops along the height axis when the layer can be split
            by output rows (DISTREDGE), in execution order; None when it cannot.
    """

    index: int
    name: str
    ops: tuple[str, ...]
    nodes: tuple[int, ...]
    flops: int
    weight_count: int
    weight_bytes: int
    output_bytes: int
    cut_bytes: int
    consumes: tuple[str, ...] = ()
    produces: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    rows: tuple[RowOp, ...] | None = None


@dataclass(frozen=True)
class RowOp:
    """How one op maps output rows to input rows along the height axis (DISTREDGE).

    Output rows ``[a, b]`` need input rows ``[a*stride - pad_top,
    b*stride - pad_top + dilation*(kernel - 1)]``, clipped to ``[0, in_height - 1]``; the
    clipped rows become that part's padding. Element-wise ops have kernel 1, stride 1,
    no padding.
    """

    op: str
    kernel: int
    stride: int
    pad_top: int
    pad_bottom: int
    dilation: int
    in_height: int
    out_height: int


@dataclass(frozen=True)
class Cut:
    """The tensors live across the cut after layer ``after`` (``-1``: before layer 0).

    ``tensors`` are names in ``LayerGraph.tensors``; graph outputs produced early count as
    live until the end, graph inputs count as live until their last consumer.
    """

    after: int
    tensors: tuple[str, ...]
    nbytes: int


@dataclass(frozen=True)
class LayerGraph:
    """A model as the compiler sees it: major layers in topological order and their cuts.

    Attributes:
        name: model name (file stem).
        sha256: SHA-256 of the ONNX file's bytes (the profile fingerprint).
        granularity: ``"major"`` or ``"node"``.
        layers: the layers, ``layers[k].index == k``.
        cuts: ``len(layers) + 1`` cuts; ``cuts[0]`` is before layer 0 (``after=-1``: the
            model inputs), ``cuts[k + 1]`` is after layer ``k``; the last is the outputs.
        inputs: model inputs (static shapes).
        outputs: model outputs.
        tensors: every tensor named in a cut, by name.
        initializer_bytes: bytes of every weight initialiser by name (shared weights counted
            once; ``Layer.weights`` names them).
    """

    name: str
    sha256: str
    granularity: str
    layers: tuple[Layer, ...]
    cuts: tuple[Cut, ...]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    tensors: Mapping[str, TensorInfo] = field(default_factory=dict)
    initializer_bytes: Mapping[str, int] = field(default_factory=dict)

    @property
    def input_bytes(self) -> int:
        return sum(t.nbytes for t in self.inputs)

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)

    def cut_after(self, k: int) -> Cut:
        """The cut after layer ``k`` (``k = -1`` is the cut before layer 0)."""
        return self.cuts[k + 1]


# --------------------------------------------------------------------------- system

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
            ``build_cost_table`` makes it a :class:`partitioner.bundle_prices.BundlePrices`
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


# --------------------------------------------------------------------------- objective

ObjectiveKind = Literal["latency", "energy", "throughput", "carbon", "weighted"]


@dataclass(frozen=True)
class Objective:
    """What the solver minimises and under which caps (SPEC §4).

    Attributes:
        kind: ``latency``; ``energy`` (energy of edge devices, usually with
            ``max_latency``); ``throughput`` (the bottleneck stage); ``carbon`` (over
            ``duration`` s with pipelined stages and hold energy); ``weighted``
            (``latency_weight * T_norm + energy_weight * E_norm``).
        max_latency: cap on single-inference latency, s.
        max_energy: per device energy cap per inference, J.
        duration: seconds of service for the carbon objective.
        latency_weight / energy_weight: weights of the ``weighted`` objective.
        time_limit: solver time limit, s (then the status may be ``feasible``).
        solver: python-mip solver name (``CBC`` by default).
        max_noise: cap on the fitted output noise ``eta(q)`` of int8 variants (QUANT);
            0 quantises nothing; None: no cap.
    """

    kind: ObjectiveKind = "latency"
    max_latency: float | None = None
    max_energy: Mapping[str, float] = field(default_factory=dict)
    duration: float | None = None
    latency_weight: float = 0.5
    energy_weight: float = 0.5
    time_limit: float | None = None
    solver: str = "CBC"
    max_noise: float | None = None


# --------------------------------------------------------------------------- plan

PlanStatus = Literal["optimal", "feasible", "infeasible"]


@dataclass(frozen=True)
class Part:
    """One part of a split stage: output rows ``rows = (first, last)`` (inclusive, of the
    stage's last 4-D output) computed on ``device`` (DISTREDGE)."""

    device: str
    frequency: str | None
    rows: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "frequency": self.frequency, "rows": list(self.rows)}


@dataclass(frozen=True)
class ExitHead:
    """An early-exit head ending a stage (DISS §6.4): model output ``output`` is returned
    when its rule holds (``threshold`` on the softmax, or with ``probability``)."""

    output: str
    probability: float
    threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "probability": self.probability,
                "threshold": self.threshold}


@dataclass(frozen=True)
class Stage:
    """A run of model layers ``first..last`` (inclusive) executed as one unit.

    On one ``device`` at ``frequency``, or, when ``parts`` is given, split by output rows
    across several devices running in parallel (then ``device`` is None). ``quantized``
    lists the model layers of the stage that run as their int8 variant; ``exit`` is the
    early-exit head the stage ends in, if any. ``id`` is the stage's index in the plan.
    """

    device: str | None
    frequency: str | None
    first: int
    last: int
    id: int = -1
    parts: tuple[Part, ...] | None = None
    quantized: tuple[int, ...] = ()
    exit: ExitHead | None = None

    @property
    def devices(self) -> tuple[str, ...]:
        """Every device the stage runs on (its parts' devices, or its own)."""
        if self.parts:
            return tuple(dict.fromkeys(p.device for p in self.parts))
        return (self.device,) if self.device is not None else ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "device": self.device, "frequency": self.frequency,
                "layers": [self.first, self.last],
                "parts": None if self.parts is None else [p.to_json() for p in self.parts],
                "quantized": list(self.quantized),
                "exit": None if self.exit is None else self.exit.to_json()}

    @staticmethod
    def from_json(doc: Mapping[str, Any], index: int) -> Stage:
        parts = doc.get("parts")
        ex = doc.get("exit")
        return Stage(
            device=doc.get("device"), frequency=doc.get("frequency"),
            first=int(doc["layers"][0]), last=int(doc["layers"][1]),
            id=int(doc.get("id", index)),
            parts=None if parts is None else tuple(
                Part(p["device"], p.get("frequency"), (int(p["rows"][0]), int(p["rows"][1])))
                for p in parts),
            quantized=tuple(int(q) for q in doc.get("quantized") or ()),
            exit=None if ex is None else ExitHead(str(ex["output"]), float(ex["probability"]),
                                                  ex.get("threshold")))


RouteEnd = int | Literal["input", "output"]


@dataclass(frozen=True)
class Route:
    """How one tensor travels between stages (the edges of the stage graph).

    ``source`` is the producing stage id or ``"input"``; ``targets`` the stage ids (and/or
    ``"output"``) that read it. ``transfer == "direct"``: it goes straight from the
    producer's device(s) to each target's, once per receiving device (QUANT's tensor-flow
    coherence); ``"forwarded"``: stages ``via`` relay it hop by hop along the chain.
    """

    tensor: str
    source: RouteEnd
    targets: tuple[RouteEnd, ...]
    transfer: Literal["direct", "forwarded"] = "direct"
    via: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "from": self.source, "to": list(self.targets),
                "transfer": self.transfer, "via": list(self.via)}

    @staticmethod
    def from_json(doc: Mapping[str, Any]) -> Route:
        return Route(str(doc["tensor"]), doc["from"], tuple(doc["to"]),
                     doc.get("transfer", "direct"), tuple(int(v) for v in doc.get("via", ())))


@dataclass(frozen=True)
class Estimate:
    """The cost of a plan, broken down (seconds, joules, mgCO2-eq)."""

    latency: float
    compute: float
    communication: float
    weight_loading: float
    bottleneck: float
    energy: Mapping[str, float] = field(default_factory=dict)
    carbon: float | None = None
    inferences: float | None = None
    noise: float | None = None
    expected_latency: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"latency": self.latency, "compute": self.compute,
                "communication": self.communication, "weight_loading": self.weight_loading,
                "bottleneck": self.bottleneck, "energy": dict(self.energy),
                "carbon": self.carbon, "inferences": self.inferences, "noise": self.noise,
                "expected_latency": self.expected_latency}


@dataclass(frozen=True)
class Plan:
    """A placement of every position of the extended chain, and what it costs.

    Attributes:
        status: ``optimal`` or ``feasible`` (time limit hit).
        objective: the objective kind that was minimised.
        stages: maximal runs of model layers on one device, in order.
        estimate: the priced plan.
        solve_seconds: wall time of the solve.
        placement: device of every position of the extended chain.
        frequencies: the frequency chosen for each used device.
        pseudo: device of each pseudo layer by kind (``source``, ``preprocess``, ...).
        routes: how every tensor crossing a stage boundary travels (schema 2); empty for a
            plan that has not been routed yet (the chain then forwards, as in schema 1).
    """

    status: PlanStatus
    objective: str
    stages: tuple[Stage, ...]
    estimate: Estimate
    solve_seconds: float
    placement: tuple[str, ...] = ()
    frequencies: Mapping[str, str | None] = field(default_factory=dict)
    pseudo: Mapping[str, str] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()

    def __post_init__(self) -> None:
        # a stage's id is its index in the plan, whoever built the plan
        if any(s.id != i for i, s in enumerate(self.stages)):
            from dataclasses import replace

            object.__setattr__(self, "stages", tuple(
                replace(s, id=i) for i, s in enumerate(self.stages)))

    @property
    def exits(self) -> tuple[tuple[int, ExitHead], ...]:
        """(stage id, head) of every stage that ends in an exit head."""
        return tuple((i, s.exit) for i, s in enumerate(self.stages) if s.exit is not None)

    def to_json(self) -> dict[str, Any]:
        """The plan document of docs/INTERFACES.md (schema 2, plus ``pseudo``)."""
        return {"status": self.status, "objective": self.objective,
                "stages": [s.to_json() for s in self.stages],
                "estimate": self.estimate.to_json(),
                "solve_seconds": self.solve_seconds,
                "frequencies": dict(self.frequencies),
                "pseudo": dict(self.pseudo),
                "routes": [r.to_json() for r in self.routes],
                "exits": [h.to_json() | {"stage": i} for i, h in self.exits]}

    @staticmethod
    def from_json(doc: Mapping[str, Any]) -> Plan:
        est = doc["estimate"]
        return Plan(
            status=doc["status"], objective=doc["objective"],
            stages=tuple(Stage.from_json(s, i) for i, s in enumerate(doc["stages"])),
            estimate=Estimate(
                latency=est["latency"], compute=est["compute"],
                communication=est["communication"], weight_loading=est["weight_loading"],
                bottleneck=est["bottleneck"], energy=dict(est.get("energy") or {}),
                carbon=est.get("carbon"), inferences=est.get("inferences"),
                noise=est.get("noise"), expected_latency=est.get("expected_latency")),
            solve_seconds=float(doc.get("solve_seconds", 0.0)),
            frequencies=dict(doc.get("frequencies") or {}),
            pseudo=dict(doc.get("pseudo") or {}),
            routes=tuple(Route.from_json(r) for r in doc.get("routes") or ()))
