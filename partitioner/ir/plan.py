"""Objectives and plans: what the solver hands the back end.

Part of :mod:`partitioner.ir`; import the names from there."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

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
