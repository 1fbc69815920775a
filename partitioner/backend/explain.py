"""Describe a compiled bundle: ``partitioner explain``.

The report comes from the manifest alone (the stage files are only checked by
:func:`load_bundle`): per stage its device, layers (by name), what it receives, what it
forwards and what it sends on; per cut the bytes that cross it (outputs plus forwarded
tensors, the quantity the chain cost model prices, SPEC §2); and the plan's latency and
energy breakdown (plus the per-stage timeline when the bundle was compiled with a cost
table).
"""

from __future__ import annotations

from typing import Any

from partitioner.backend.manifest import Bundle

__all__ = ["explain", "format_text"]


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _files_bytes(bundle: Bundle, stage: Any) -> int:
    total = (bundle.path / stage.file).stat().st_size
    if stage.external_data:
        total += (bundle.path / stage.external_data).stat().st_size
    return total


def explain(bundle: Bundle) -> dict[str, Any]:
    """The ``explain --json`` document of a loaded bundle."""
    names = bundle.model.layers
    stages, cuts = [], []
    receive = sum(t.nbytes for t in bundle.inputs)
    for s in bundle.stages:
        nxt = bundle.stages[s.next].device if s.next is not None else bundle.destination
        stages.append({
            "id": s.id, "device": s.device, "frequency": s.frequency,
            "layers": [s.first, s.last],
            "layer_names": list(names[s.first:s.last + 1]) if names else [],
            "file": s.file, "file_bytes": _files_bytes(bundle, s),
            "inputs": [t.name for t in s.inputs], "outputs": [t.name for t in s.outputs],
            "forwarded": [t.name for t in s.forward],
            "receive_bytes": receive, "send_bytes": s.send_bytes,
            "estimate": dict(s.estimate) if s.estimate is not None else None,
            "triton": s.triton})
        cuts.append({
            "after_stage": s.id, "after_layer": s.last, "from": s.device,
            "to": nxt or "output",
            "bytes": s.send_bytes, "tensors": [t.name for t in s.sends_all],
            "forwarded": [t.name for t in s.forward],
            "forwarded_bytes": sum(t.nbytes for t in s.forward)})
        receive = s.send_bytes
    plan = bundle.plan
    return {
        "bundle": str(bundle.path), "model": {
            "name": bundle.model.name, "sha256": bundle.model.sha256,
            "granularity": bundle.model.granularity, "layers": len(names),
            "inputs": [t.to_json() for t in bundle.inputs],
            "outputs": [t.to_json() for t in bundle.outputs]},
        "source": bundle.source, "destination": bundle.destination,
        "transfer": bundle.transfer,
        "devices": list(dict.fromkeys(s.device for s in bundle.stages)),
        "stages": stages, "cuts": cuts,
        "objective": plan.get("objective"), "status": plan.get("status"),
        "estimate": plan.get("estimate"),
        "verification": dict(bundle.verification) if bundle.verification else None,
        "timeline": bundle.extra.get("timeline"),
    }


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 1e3:.3f} ms"


def format_text(doc: dict[str, Any]) -> str:
    """The human-readable report of an :func:`explain` document."""
    m = doc["model"]
    lines = [f"bundle {doc['bundle']}: model {m['name']} ({m['layers']} {m['granularity']} "
             f"layers), {len(doc['stages'])} stages on {', '.join(doc['devices'])}",
             f"source {doc['source'] or '-'} -> destination {doc['destination'] or '-'}; "
             f"objective {doc['objective']} ({doc['status']})", ""]
    for s, cut in zip(doc["stages"], doc["cuts"], strict=True):
        first, last = s["layers"]
        span = s["layer_names"]
        label = (f"{span[0]}" if len(span) == 1 else f"{span[0]} .. {span[-1]}") if span else ""
        freq = f" @ {s['frequency']}" if s["frequency"] else ""
        lines.append(f"stage {s['id']}  {s['device']}{freq}  layers {first}..{last}  {label}")
        lines.append(f"    file {s['file']} ({_size(s['file_bytes'])}); receives "
                     f"{_size(s['receive_bytes'])}; inputs {', '.join(s['inputs'])}")
        if s["estimate"]:
            lines.append(f"    compute {_seconds(s['estimate'].get('compute'))}, send "
                         f"{_seconds(s['estimate'].get('send'))}")
        fwd = (f" (forwarded: {', '.join(cut['forwarded'])}, {_size(cut['forwarded_bytes'])})"
               if cut["forwarded"] else "")
        lines.append(f"    cut -> {cut['to']}: {_size(cut['bytes'])} in "
                     f"{len(cut['tensors'])} tensors{fwd}")
    est = doc.get("estimate") or {}
    if est:
        lines += ["", f"latency {_seconds(est.get('latency'))} = compute "
                      f"{_seconds(est.get('compute'))} + communication "
                      f"{_seconds(est.get('communication'))} + weight loading "
                      f"{_seconds(est.get('weight_loading'))}; bottleneck "
                      f"{_seconds(est.get('bottleneck'))}"]
        energy = est.get("energy") or {}
        if energy:
            lines.append("energy " + ", ".join(f"{d} {e:.4g} J" for d, e in energy.items()))
        if est.get("carbon") is not None:
            lines.append(f"carbon {est['carbon']:.4g} mgCO2-eq")
    ver = doc.get("verification")
    if ver:
        lines.append(f"verified: max |chain - model| = {ver['max_abs_diff']:.3g} on "
                     f"{ver['inputs']} inputs")
    else:
        lines.append("not verified (compiled with --no-verify)")
    return "\n".join(lines)
