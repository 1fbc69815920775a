"""``partitioner inspect MODEL``: the major layers, their FLOPs, weights and cuts."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from partitioner.cli.common import add_model_options, parse_shapes, print_json
from partitioner.frontend import PreparedModel, load_model

__all__ = ["add_arguments", "run", "inspect_document", "format_table", "short_names"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``MODEL [--shape ...] [--granularity major|node] [--json]``."""
    add_model_options(parser)
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document on stdout instead of the table")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def inspect_document(prepared: PreparedModel) -> dict[str, Any]:
    """The ``--json`` document of ``inspect`` (keys of docs/INTERFACES.md included)."""
    graph = prepared.graph
    flops = sum(layer.flops for layer in graph.layers)
    macs = sum(prepared.stats.macs)
    return {
        "model": {
            "name": graph.name, "sha256": graph.sha256, "granularity": graph.granularity,
            "path": str(prepared.path) if prepared.path is not None else None,
            "inputs": [dict(t.to_json(), nbytes=t.nbytes) for t in graph.inputs],
            "outputs": [dict(t.to_json(), nbytes=t.nbytes) for t in graph.outputs],
            "input_cut_bytes": graph.cuts[0].nbytes,
            "folded_nodes": prepared.folded,
        },
        "layers": [{
            "index": layer.index, "name": layer.name, "ops": list(layer.ops),
            "nodes": len(layer.nodes), "flops": layer.flops, "macs": prepared.stats.macs[k],
            "weight_count": layer.weight_count, "weight_bytes": layer.weight_bytes,
            "output_bytes": layer.output_bytes, "cut_bytes": layer.cut_bytes,
            "cut_tensors": list(graph.cuts[k + 1].tensors),
        } for k, layer in enumerate(graph.layers)],
        "totals": {
            "layers": len(graph.layers), "nodes": len(prepared.model.graph.node),
            "flops": flops, "macs": macs, "gflop": flops / 1e9, "gmac": macs / 1e9,
            "weight_count": prepared.stats.total_weight_count,
            "weight_bytes": prepared.stats.total_weight_bytes,
            "params": prepared.stats.total_weight_count,
            "weight_mb": prepared.stats.total_weight_bytes / 1e6,
            "max_cut_bytes": max(c.nbytes for c in graph.cuts),
        },
    }


NAME_WIDTH = 40


def _middle(name: str, width: int, head: int) -> str:
    """``name`` cut to ``width`` characters by replacing its middle with "..."."""
    tail = width - 3 - head
    return f"{name[:head]}...{name[len(name) - tail:]}"


def _around(name: str, start: int, width: int) -> str:
    """``name`` cut to ``width`` so that the part from ``start`` on is seen first."""
    if len(name) - start <= width - 3:
        return _middle(name, width, width - 3 - (len(name) - start))
    head, tail = 6, 8
    return f"{name[:head]}...{name[start:start + width - head - tail - 6]}...{name[-tail:]}"


def _clashes(shown: list[str], names: list[str], width: int) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for k, n in enumerate(shown):
        groups.setdefault(n, []).append(k)
    return {n: ks for n, ks in groups.items()
            if len(ks) > 1 and any(len(names[k]) > width for k in ks)}


def short_names(names: list[str], width: int = NAME_WIDTH) -> list[str]:
    """Names that fit ``width``, shortened from the middle, and still distinct.

    Layer names of exported models share long prefixes and differ at the end or in the
    middle ("model.encoder.layers.11.self_attn.q_proj"): names are shortened from the
    middle, and names that would still print alike show the part where they first differ
    instead. As a last resort, the layer's position ends the name.
    """
    out = [n if len(n) <= width else _middle(n, width, head=(width - 3) // 3) for n in names]
    for group in _clashes(out, names, width).values():
        members = [names[k] for k in group]
        common = len(os.path.commonprefix(members))
        for k in group:
            if len(names[k]) > width:
                out[k] = _around(names[k], max(0, common - 2), width)
    for group in _clashes(out, names, width).values():
        for k in group:
            if len(names[k]) > width:
                mark = f"~{k}"
                out[k] = _middle(names[k], width - len(mark), (width - len(mark) - 3) // 3) + mark
    return out


def _ops(ops: list[str], width: int = 34) -> str:
    # Collapse runs ("Conv+Relu+MaxPool") and truncate long lists to keep the table tidy.
    text = "+".join(ops)
    return text if len(text) <= width else text[:width - 3] + "..."


def format_table(doc: dict[str, Any], out: TextIO) -> None:
    """Write the human-readable table of an ``inspect_document``."""
    model, totals = doc["model"], doc["totals"]
    ins = ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in model["inputs"])
    outs = ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in model["outputs"])
    out.write(f"model {model['name']}  sha256 {model['sha256'][:16]}  "
              f"granularity {model['granularity']}\n")
    out.write(f"inputs  {ins}\noutputs {outs}\n\n")
    names = short_names([layer["name"] for layer in doc["layers"]])
    name_w = max([4] + [len(n) for n in names])
    header = (f"{'#':>4}  {'name':<{name_w}}  {'ops':<34}  {'MFLOP':>10}  {'params':>11}  "
              f"{'weight MB':>9}  {'cut KB':>10}\n")
    out.write(header)
    out.write("-" * (len(header) - 1) + "\n")
    for layer, name in zip(doc["layers"], names, strict=True):
        out.write(f"{layer['index']:>4}  {name:<{name_w}}  {_ops(layer['ops']):<34}  "
                  f"{layer['flops'] / 1e6:>10.2f}  {layer['weight_count']:>11,}  "
                  f"{layer['weight_bytes'] / 1e6:>9.3f}  {layer['cut_bytes'] / 1e3:>10.1f}\n")
    out.write("-" * (len(header) - 1) + "\n")
    out.write(f"{totals['layers']} layers ({totals['nodes']} nodes), "
              f"{totals['gflop']:.3f} GFLOP, {totals['gmac']:.3f} GMAC, "
              f"{totals['params']:,} params, {totals['weight_mb']:.2f} MB of weights; "
              f"input {model['input_cut_bytes'] / 1e3:.1f} KB, "
              f"largest cut {totals['max_cut_bytes'] / 1e3:.1f} KB\n")


def run(args: argparse.Namespace) -> int:
    """Load, prepare and describe the model; exit 0, or 2 on bad input (raised)."""
    shapes = parse_shapes(args.shape)
    prepared = load_model(args.model, shapes=shapes, granularity=args.granularity)
    doc = inspect_document(prepared)
    if not args.quiet:
        for note in prepared.stats.notes:
            print(f"note: {note}", file=sys.stderr)
    try:
        if args.json:
            print_json(doc)
        else:
            format_table(doc, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (``| head``) went away: not an error; silence the flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
