"""The manifest fields ``partitioner explain`` reports, checked before it reports them.

:func:`~partitioner.backend.manifest.load_bundle` checks what the runtime needs (stages,
files, sends); the plan's record (``plan.stages``, ``plan.routes``, ``plan.estimate``), the
stages' ``estimate`` figures, ``verification`` and the ``timeline`` are read only by
``explain`` (and its ``--plot``). A hand-edited or damaged manifest gets a one-line
:class:`~partitioner.errors.UserError` naming the manifest and the key, e.g.
``b/manifest.json: plan.estimate.latency: expected a number or null, got 'x'``, never a
traceback from deep in the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from partitioner.backend.manifest import MANIFEST, Bundle
from partitioner.errors import fail

__all__ = ["check_report_fields"]

_PLAN_FIGURES = ("latency", "compute", "communication", "weight_loading", "bottleneck",
                 "carbon", "noise", "inferences", "expected_latency")
_STAGE_FIGURES = ("compute", "weight_loading", "internal", "send", "receive", "time")
_PART_FIGURES = ("receive", "compute", "send", "time")


class _Fields:
    """Typed checks that fail with ``MANIFEST: KEY: expected ..., got ...``."""

    def __init__(self, bundle: Bundle) -> None:
        self.where = str(bundle.path / MANIFEST)

    def bad(self, key: str, expected: str, value: Any) -> None:
        shown = repr(value)
        fail(f"{self.where}: {key}: expected {expected}, got "
             f"{shown[:60] + '...' if len(shown) > 60 else shown}")

    def table(self, key: str, value: Any, *, optional: bool = True) -> Mapping[str, Any]:
        if value is None and optional:
            return {}
        if not isinstance(value, Mapping):
            self.bad(key, "an object" + (" or null" if optional else ""), value)
        return value

    def items(self, key: str, value: Any) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.bad(key, "a list or null", value)
        return value

    def number(self, key: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            self.bad(key, "a finite number or null", value)

    def integer(self, key: str, value: Any, *, optional: bool = True) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(key, "an integer", value)

    def text(self, key: str, value: Any, *, optional: bool = True) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str):
            self.bad(key, "a string" + (" or null" if optional else ""), value)

    def figures(self, key: str, table: Mapping[str, Any], names: tuple[str, ...]) -> None:
        for name in names:
            self.number(f"{key}.{name}", table.get(name))


def check_report_fields(bundle: Bundle) -> None:
    """Fail (one line) when a field that :func:`explain` or the plot reads is malformed."""
    c = _Fields(bundle)
    plan = c.table("plan", bundle.plan, optional=False)
    c.text("plan.objective", plan.get("objective"))
    c.text("plan.status", plan.get("status"))
    for i, st in enumerate(c.items("plan.stages", plan.get("stages"))):
        st = c.table(f"plan.stages[{i}]", st, optional=False)
        c.integer(f"plan.stages[{i}].id", st.get("id"))
        for j, k in enumerate(c.items(f"plan.stages[{i}].quantized", st.get("quantized"))):
            c.integer(f"plan.stages[{i}].quantized[{j}]", k, optional=False)
    for i, route in enumerate(c.items("plan.routes", plan.get("routes"))):
        route = c.table(f"plan.routes[{i}]", route, optional=False)
        c.text(f"plan.routes[{i}].tensor", route.get("tensor"), optional=False)
        c.text(f"plan.routes[{i}].transfer", route.get("transfer"))
    est = c.table("plan.estimate", plan.get("estimate"))
    c.figures("plan.estimate", est, _PLAN_FIGURES)
    for device, joules in c.table("plan.estimate.energy", est.get("energy")).items():
        c.number(f"plan.estimate.energy.{device}", joules)
    for s in bundle.stages:  # (stage layers within model.layers: load_bundle checks)
        key = f"stages[{s.id}].estimate"
        figures = c.table(key, s.estimate)
        c.figures(key, figures, _STAGE_FIGURES)
        for j, part in enumerate(c.items(f"{key}.parts", figures.get("parts"))):
            part = c.table(f"{key}.parts[{j}]", part, optional=False)
            c.integer(f"{key}.parts[{j}].part", part.get("part"), optional=False)
            c.figures(f"{key}.parts[{j}]", part, _PART_FIGURES)
    ver = c.table("verification", bundle.verification)
    if ver:
        c.number("verification.max_abs_diff", ver.get("max_abs_diff"))
        if ver.get("max_abs_diff") is None:
            c.bad("verification.max_abs_diff", "a number", None)
        c.text("verification.inputs", ver.get("inputs"))
    _check_timeline(c, bundle.extra.get("timeline"))


def _check_timeline(c: _Fields, timeline: Any) -> None:
    for i, seg in enumerate(c.items("timeline", timeline)):
        key = f"timeline[{i}]"
        seg = c.table(key, seg, optional=False)
        kind = seg.get("kind")
        if kind not in ("compute", "transfer"):
            c.bad(f"{key}.kind", "'compute' or 'transfer'", kind)
        for name in ("start", "duration"):
            c.number(f"{key}.{name}", seg.get(name))
            if seg.get(name) is None:
                c.bad(f"{key}.{name}", "a number", None)
        c.text(f"{key}.{'device' if kind == 'compute' else 'from'}",
               seg.get("device" if kind == "compute" else "from"), optional=False)
        c.integer(f"{key}.stage", seg.get("stage"))
        c.text(f"{key}.name", seg.get("name"))
        c.number(f"{key}.bytes", seg.get("bytes"))
