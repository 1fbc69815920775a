"""Describe a compiled bundle: ``partitioner explain`` (schema 1 and 2 bundles).

The report comes from the manifest alone (the unit files are only checked by
:func:`load_bundle`, which upgrades a schema-1 chain to the sends it implies): per stage
its device (or its parts, with their rows, halo rows per input, bytes scattered to and
gathered from each part), layers (by name), what each unit receives
(from which stage, ``direct`` or ``forwarded``) and what it sends to whom, with bytes;
per link between two devices the bytes that cross it (each routed tensor counted once
per receiving device); and the plan's latency and energy breakdown (plus the per-stage
timeline when the bundle was compiled with a cost table; a split stage: its time and per
part the scatter, compute and gather of the one spatial estimate, the critical part's
counting), whose parts add up: the stages' compute, weight loading and transfers plus the
pseudo layers' are the totals.
"""

from __future__ import annotations

from typing import Any

from partitioner.backend.explain_check import check_report_fields
from partitioner.backend.manifest import INPUT, OUTPUT, Bundle, Send, TensorSpec, Unit

__all__ = ["explain", "format_text", "size_text"]


def size_text(nbytes: float) -> str:
    """``1.5 KiB``: a byte count for people."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def _file_bytes(bundle: Bundle, unit: Unit) -> int:
    total = (bundle.path / unit.file).stat().st_size
    if unit.external_data:
        total += (bundle.path / unit.external_data).stat().st_size
    return total


def _piece_bytes(spec: TensorSpec, rows: tuple[int, int] | None) -> int:
    if rows is None or len(spec.shape) < 3 or not spec.shape[2]:
        return spec.nbytes
    full = spec.shape[2] if spec.rows is None else spec.rows[1] - spec.rows[0] + 1
    return spec.nbytes * (rows[1] - rows[0] + 1) // full


def _full_specs(bundle: Bundle) -> dict[str, TensorSpec]:
    """Every tensor of the bundle, whole (the model's, the stages' unsliced lists)."""
    specs: dict[str, TensorSpec] = {}
    for s in bundle.stages:
        for t in (*s.inputs, *s.outputs, *s.forward):
            if t.rows is None:
                specs.setdefault(t.name, t)
    for t in (*bundle.inputs, *bundle.outputs):
        specs[t.name] = t
    return specs


def _transfers(bundle: Bundle) -> dict[str, str]:
    """Tensor -> ``direct`` / ``forwarded`` (schema 1: every tensor relays the chain)."""
    routes = bundle.plan.get("routes") or []
    if bundle.schema_version >= 2 and routes:
        return {r["tensor"]: r.get("transfer", "direct") for r in routes}
    return {}


def _send_doc(send: Send, devices: dict[str, str], sender_device: str,
              specs: dict[str, TensorSpec], kinds: dict[str, str], default: str
              ) -> dict[str, Any]:
    tensors = [{"name": p.name, "rows": None if p.rows is None else list(p.rows),
                "bytes": _piece_bytes(specs[p.name], p.rows),
                "transfer": kinds.get(p.name, default)} for p in send.tensors]
    to_device = devices.get(send.to)
    return {"to": send.to, "to_device": to_device, "tensors": tensors,
            "bytes": sum(t["bytes"] for t in tensors),
            "network": to_device is not None and to_device != sender_device}


def explain(bundle: Bundle) -> dict[str, Any]:
    """The ``explain --json`` document of a loaded bundle.

    Raises:
        UserError: a field of the manifest's report part is malformed
            (:func:`~partitioner.backend.explain_check.check_report_fields`).
    """
    check_report_fields(bundle)
    names = bundle.model.layers
    specs = _full_specs(bundle)
    kinds = _transfers(bundle)
    default = "forwarded" if bundle.schema_version < 2 else "direct"
    first_device = next(iter(bundle.devices), None)
    devices: dict[str, str] = {u.key: u.device for u in bundle.units()}
    devices[INPUT] = bundle.source or first_device or ""
    devices[OUTPUT] = bundle.destination or bundle.stages[-1].devices[-1]
    links: dict[tuple[str, str], dict[str, Any]] = {}

    def unit_doc(u: Unit, rows: Any) -> dict[str, Any]:
        sends = [_send_doc(s, devices, u.device, specs, kinds, default) for s in u.sends]
        for s in sends:
            if s["network"]:
                link = links.setdefault((u.device, s["to_device"]), {
                    "from": u.device, "to": s["to_device"], "bytes": 0, "tensors": []})
                link["bytes"] += s["bytes"]
                link["tensors"] += [t["name"] for t in s["tensors"]]
        return {"key": u.key, "part": u.part, "device": u.device, "frequency": u.frequency,
                "rows": None if rows is None else list(rows), "file": u.file,
                "file_bytes": _file_bytes(bundle, u),
                "inputs": [{"name": t.name, "from": t.source,
                            "transfer": t.transfer or kinds.get(t.name, default),
                            "rows": None if t.rows is None else list(t.rows),
                            "bytes": t.nbytes} for t in u.inputs],
                "forwarded": [t.name for t in u.forward],
                "receive_bytes": sum(t.nbytes for t in u.receives),
                "sends": sends,
                "send_bytes": sum(s["bytes"] for s in sends if s["network"])}

    source_sends = [_send_doc(s, devices, devices[INPUT], specs, kinds, default)
                    for s in bundle.input_sends]
    for sent in source_sends:
        if sent["network"]:
            link = links.setdefault((devices[INPUT], sent["to_device"]), {
                "from": devices[INPUT], "to": sent["to_device"], "bytes": 0, "tensors": []})
            link["bytes"] += sent["bytes"]
            link["tensors"] += [t["name"] for t in sent["tensors"]]
    stages = []
    planned = {int(st.get("id", i)): st for i, st in enumerate(bundle.plan.get("stages") or [])}
    for s in bundle.stages:
        rows = {p.index: p.rows for p in s.parts or ()}
        units = [unit_doc(u, rows.get(u.part) if u.part is not None else None)
                 for u in s.units]
        if s.parts:
            height = _main_height(s, specs)
            for u in units:
                u.update(_part_figures(u, height, specs))
        stages.append({
            "id": s.id, "device": s.device, "frequency": s.frequency,
            "layers": [s.first, s.last],
            "layer_names": list(names[s.first:s.last + 1]) if names else [],
            "units": units, "split": bool(s.parts),
            "file": s.file, "file_bytes": sum(u["file_bytes"] for u in units),
            "inputs": [t.name for t in s.inputs], "outputs": [t.name for t in s.outputs],
            "forwarded": [n for u in units for n in u["forwarded"]],
            "receive_bytes": sum(u["receive_bytes"] for u in units),
            "send_bytes": sum(u["send_bytes"] for u in units),
            "estimate": dict(s.estimate) if s.estimate is not None else None,
            "triton": s.triton,
            # layers run as their int8 variant (QUANT), from the plan
            "quantized": [int(k) for k in planned.get(s.id, {}).get("quantized") or []]})
    plan = bundle.plan
    return {
        "bundle": str(bundle.path), "schema_version": bundle.schema_version,
        "model": {
            "name": bundle.model.name, "sha256": bundle.model.sha256,
            "granularity": bundle.model.granularity, "layers": len(names),
            "inputs": [t.to_json() for t in bundle.inputs],
            "outputs": [t.to_json() for t in bundle.outputs]},
        "source": bundle.source, "destination": bundle.destination,
        "transfer": bundle.transfer if bundle.schema_version >= 2 else "forwarded",
        "devices": list(bundle.devices),
        "input_sends": source_sends, "stages": stages, "links": list(links.values()),
        "routes": list(plan.get("routes") or []),
        "objective": plan.get("objective"), "status": plan.get("status"),
        "estimate": plan.get("estimate"),
        "verification": dict(bundle.verification) if bundle.verification else None,
        "timeline": bundle.extra.get("timeline"),
    }


def _main_height(stage: Any, specs: dict[str, TensorSpec]) -> int | None:
    """Rows of the split stage's last 4-D output (what its parts' ``rows`` index)."""
    for t in reversed(stage.outputs):
        full = specs.get(t.name, t)
        if len(full.shape) == 4:
            return int(full.shape[2])
    return None


def _part_figures(unit: dict[str, Any], height: int | None, specs: dict[str, TensorSpec]
                  ) -> dict[str, Any]:
    """Halo rows per input (rows received beyond the part's proportional share of the
    input's height), bytes scattered to the part and gathered from it (DISTREDGE)."""
    halo: dict[str, int] = {}
    rows = unit["rows"]
    if rows is not None and height:
        share = (rows[1] - rows[0] + 1) / height
        for t in unit["inputs"]:
            full = specs.get(t["name"])
            if t["rows"] is None or full is None or len(full.shape) != 4:
                continue
            got = t["rows"][1] - t["rows"][0] + 1
            halo[t["name"]] = max(0, got - round(share * full.shape[2]))
    scattered = sum(t["bytes"] for t in unit["inputs"])
    return {"halo_rows": halo, "scatter_bytes": scattered,
            "gather_bytes": unit["send_bytes"]}


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 1e3:.3f} ms"


def _send_lines(sends: list[dict[str, Any]], indent: str) -> list[str]:
    lines = []
    for s in sends:
        items = ", ".join(
            f"{t['name']}" + (f"[{t['rows'][0]}..{t['rows'][1]}]" if t["rows"] else "")
            + f" {size_text(t['bytes'])} {t['transfer']}" for t in s["tensors"])
        where = f"{s['to']} ({s['to_device']})" if s["to_device"] else s["to"]
        net = "" if s["network"] else ", same device"
        lines.append(f"{indent}-> {where}: {size_text(s['bytes'])}{net}: {items}")
    return lines


def _unit_lines(u: dict[str, Any], indent: str) -> list[str]:
    ins = ", ".join(f"{t['name']} from {t['from']} ({t['transfer']})" for t in u["inputs"])
    fwd = f"; relays {', '.join(u['forwarded'])}" if u["forwarded"] else ""
    return ([f"{indent}file {u['file']} ({size_text(u['file_bytes'])}); receives "
             f"{size_text(u['receive_bytes'])}: {ins}{fwd}"] + _send_lines(u["sends"], indent))


def format_text(doc: dict[str, Any]) -> str:
    """The human-readable report of an :func:`explain` document."""
    m = doc["model"]
    lines = [f"bundle {doc['bundle']} (schema {doc['schema_version']}, {doc['transfer']} "
             f"sends): model {m['name']} ({m['layers']} {m['granularity']} layers), "
             f"{len(doc['stages'])} stages on {', '.join(doc['devices'])}",
             f"source {doc['source'] or '-'} -> destination {doc['destination'] or '-'}; "
             f"objective {doc['objective']} ({doc['status']})", ""]
    if doc["input_sends"]:
        lines.append("source")
        lines += _send_lines(doc["input_sends"], "    ")
    m_names = [n for st in doc["stages"] for n in st["layer_names"]]
    for s in doc["stages"]:
        first, last = s["layers"]
        span = s["layer_names"]
        label = (f"{span[0]}" if len(span) == 1 else f"{span[0]} .. {span[-1]}") if span else ""
        if s["split"]:
            where = f"split in {len(s['units'])} parts"
        else:
            where = s["device"] + (f" @ {s['frequency']}" if s["frequency"] else "")
        lines.append(f"stage {s['id']}  {where}  layers {first}..{last}  {label}")
        if s.get("quantized"):
            lines.append("    int8 layers: " + ", ".join(
                f"{k} {m_names[k]}" if k < len(m_names) else str(k) for k in s["quantized"]))
        est = s["estimate"]
        parts = {p["part"]: p for p in (est or {}).get("parts") or ()}
        if est and s["split"] and parts:
            crit = next((k for k, p in parts.items() if p["critical"]), None)
            lines.append(f"    stage time {_seconds(est.get('time'))} (parts in parallel; "
                         f"critical part {s['id']}.{crit})")
        elif est:
            received = f"receives {_seconds(est['receive'])}; " if "receive" in est else ""
            lines.append(f"    {received}compute {_seconds(est.get('compute'))} + weight "
                         f"loading {_seconds(est.get('weight_loading'))} + internal "
                         f"{_seconds(est.get('internal'))}; sends {_seconds(est.get('send'))}")
        for u in s["units"]:
            if s["split"]:
                rows = u["rows"]
                halo = ", ".join(f"{n} +{h}" for n, h in u["halo_rows"].items()) or "none"
                lines.append(f"    part {u['key']}  {u['device']}  rows {rows[0]}..{rows[1]} "
                             f"({rows[1] - rows[0] + 1} rows; halo rows: {halo}; scattered "
                             f"{size_text(u['scatter_bytes'])}, gathered "
                             f"{size_text(u['gather_bytes'])})")
                p = parts.get(u["part"])
                if p is not None:
                    lines.append(f"        scatter {_seconds(p['receive'])} + compute "
                                 f"{_seconds(p['compute'])} + gather {_seconds(p['send'])} "
                                 f"= {_seconds(p['time'])}")
                lines += _unit_lines(u, "        ")
            else:
                lines += _unit_lines(u, "    ")
    if doc["links"]:
        lines += ["", "links (each tensor once per receiving device):"]
        lines += [f"    {x['from']} -> {x['to']}: {size_text(x['bytes'])} "
                  f"({', '.join(dict.fromkeys(x['tensors']))})" for x in doc["links"]]
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
        if est.get("noise") is not None:
            lines.append(f"noise (predicted mean |o - o_q|) {est['noise']:.4g}")
    ver = doc.get("verification")
    if ver:
        lines.append(f"verified: max |bundle - model| = {ver['max_abs_diff']:.3g} on "
                     f"{ver['inputs']} inputs")
    else:
        lines.append("not verified (compiled with --no-verify)")
    return "\n".join(lines)
