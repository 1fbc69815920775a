"""The drift rule of live adaptation and how it tells plans apart (:mod:`runtime.adapt`).

:class:`AdaptOptions` holds the rule's constants, :class:`DriftRule` decides after each
window whether to switch (a margin held for consecutive windows by the same better plan,
and a minimum interval between switches), :func:`drift_metric` is the figure it compares
(the bottleneck for throughput, else latency), and :func:`plan_signature` /
:func:`plan_folder` / :class:`PlanNames` identify a plan: the same deployment, the folder
it is compiled into, its epoch name. None of it talks to a worker or the compiler.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from typing import Any

from runtime.calibrate import BASELINES
from stagebundle.errors import fail

__all__ = ["AdaptOptions", "Switch", "DriftRule", "PlanNames", "plan_signature",
           "plan_folder", "drift_metric"]


@dataclass(frozen=True)
class AdaptOptions:
    """The drift rule's constants (see runtime/README.md for the measurements behind the
    defaults).

    Attributes:
        window: seconds per calibration window.
        margin: switch when current > (1 + margin) * optimum (re-estimated, relative).
        windows: consecutive windows the same better plan must win by the margin.
        min_interval: seconds between two switches.
        alpha: EWMA weight of the newest window in the calibration.
        baseline: ``"first"`` (drift from the first windows) or ``"file"`` (absolute
            measured / estimated), see :mod:`runtime.calibrate`.
        min_samples: unit runs a device needs in a window for it to count.
        forget: half-life in windows of a factor no longer measured (0: never), so a
            host the plan left is tried again once it may have recovered.
    """

    window: float = 1.0
    margin: float = 0.5
    windows: int = 5
    min_interval: float = 10.0
    alpha: float = 0.5
    baseline: str = "first"
    min_samples: int = 3
    forget: float = 30.0

    def check(self) -> AdaptOptions:
        if self.window <= 0 or self.min_interval < 0 or self.margin < 0:
            fail("--adapt-window must be positive, --adapt-margin and "
                 "--adapt-min-interval not negative")
        if self.windows < 1 or self.min_samples < 1:
            fail("--adapt-windows and --adapt-min-samples must be at least 1")
        if self.forget < 0:
            fail("--adapt-forget must not be negative")
        if not 0 < self.alpha <= 1:
            fail("--adapt-alpha must be in (0, 1]")
        if self.baseline not in BASELINES:
            fail(f"--adapt-baseline must be one of {', '.join(BASELINES)}")
        return self


@dataclass
class Switch:
    """One plan switch: the first request index on the new plan, and why."""

    at_request: int
    from_plan: str
    to_plan: str
    reason: str
    time: float


class DriftRule:
    """Margin, consecutive windows and a minimum interval (see :mod:`runtime.adapt`)."""

    def __init__(self, margin: float, windows: int, min_interval: float,
                 start: float | None = None) -> None:
        self.margin, self.windows, self.min_interval = margin, windows, min_interval
        # the interval runs between switches; the first may come as soon as the windows
        # agree (the calibration's reference windows already hold the start back)
        self.last_switch = float("-inf") if start is None else start
        self.candidate: Any = None
        self.count = 0

    def step(self, now: float, current: float, best: float, candidate: Any,
             current_sig: Any) -> bool:
        """Whether to switch to ``candidate`` after this window."""
        if candidate == current_sig or not current > (1.0 + self.margin) * best:
            self.candidate, self.count = None, 0
            return False
        if candidate != self.candidate:
            self.candidate, self.count = candidate, 0
        self.count += 1
        return self.count >= self.windows and now - self.last_switch >= self.min_interval

    def switched(self, now: float) -> None:
        self.last_switch = now
        self.candidate, self.count = None, 0


class PlanNames:
    """Epoch names of plan keys: the bundle's own plan is ``p0``, then ``p1``, ``p2``...
    in the order they are first named."""

    def __init__(self) -> None:
        self._names: dict[str, str] = {"main": "p0"}
        self._lock = threading.Lock()

    def __call__(self, key: str | None) -> str | None:
        if key is None:
            return None
        with self._lock:
            if key not in self._names:
                self._names[key] = f"p{len(self._names)}"
            return self._names[key]


def plan_signature(plan: Any) -> tuple[Any, ...]:
    """What makes two plans the same deployment (devices, layers, parts, variants)."""
    return tuple((s.device, s.first, s.last,
                  None if s.parts is None else tuple((p.device, p.rows) for p in s.parts),
                  tuple(s.quantized), None if s.exit is None else s.exit.output)
                 for s in plan.stages)


def plan_folder(model_sha: str, plan: Any) -> str:
    """The folder name of a re-planned bundle: a digest of the model and the stages."""
    text = json.dumps([model_sha, plan_signature(plan)], default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def drift_metric(objective: str, est: Any) -> float:
    """The figure the drift rule compares: the bottleneck for throughput, else latency."""
    return float(est.bottleneck if objective == "throughput" else est.latency)
