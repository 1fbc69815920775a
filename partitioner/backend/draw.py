"""The picture of a bundle (``explain --plot FILE.png|svg``), drawn with matplotlib (Agg).

Read at a glance: the title holds the total latency (and its compute / transfer / weight
loading parts) and the energy; the top panel the single-inference timeline, one row per
device, compute bars labelled with their stage and time and transfer bars with their bytes
and time (when the bundle carries a priced timeline; else the bytes each stage sends;
for a plan with split stages, one lane per device with each part's rows, halo and bytes);
the bottom panel the partition, stages as boxes over whole-layer ticks coloured by device
(the parts of a split stage stacked, with their rows), and an arrow per network send
labelled with its bytes and whether it goes direct or forwarded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from partitioner.backend.explain import size_text
from partitioner.errors import fail

__all__ = ["plot", "FORMATS"]

FORMATS = (".png", ".svg")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        fail("--plot needs matplotlib: pip install 'onnx-partitioner[plot]'")
    matplotlib.use("Agg")  # files only, never a window
    matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text (searchable, small)
    import matplotlib.pyplot as plt

    return plt


def plot(doc: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw an ``explain`` document to ``path`` (written atomically)."""
    out = Path(path)
    if out.suffix.lower() not in FORMATS:
        fail(f"--plot {str(out)!r}: expected a .png or .svg file name")
    if not out.parent.is_dir():
        fail(f"--plot {str(out)!r}: {str(out.parent)!r} "
             f"{'is a file, not a folder' if out.parent.exists() else 'does not exist'}")
    plt = _pyplot()
    devices = list(dict.fromkeys([*doc["devices"], *(x["to"] for x in doc["links"])]))
    colours = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(devices)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5),
                                      gridspec_kw={"height_ratios": [3, 2]})
    if any(st["split"] for st in doc["stages"]):
        _part_lanes(top, doc, colours)
    elif doc.get("timeline"):
        _timeline(top, doc["timeline"], colours)
    else:
        _stage_bytes(top, doc, colours)
    _partition(bottom, doc, colours)
    fig.suptitle(_title(doc), fontsize=10)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format=out.suffix[1:].lower(), dpi=120)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms >= 0.01 else f"{ms * 1e3:.3g} us"


def _title(doc: dict[str, Any]) -> str:
    est = doc.get("estimate") or {}
    head = (f"{doc['model']['name']}: {len(doc['stages'])} stages on "
            f"{len(doc['devices'])} devices, {doc['transfer']} sends, objective "
            f"{doc.get('objective')}")
    if not est:
        return head
    parts = [f"latency {_ms(est['latency'])} = compute {_ms(est['compute'])} + transfers "
             f"{_ms(est['communication'])} + weight loading {_ms(est['weight_loading'])}"]
    energy = est.get("energy") or {}
    if energy:
        parts.append(f"energy {sum(energy.values()):.3g} J (" + ", ".join(
            f"{d} {e:.3g}" for d, e in energy.items()) + ")")
    return head + "\n" + "; ".join(parts)


def _timeline(ax: Any, segments: list[dict[str, Any]], colours: dict[str, Any]) -> None:
    """One row per device: compute bars (filled, stage and time) and transfers (hatched,
    on the sender's row, with their bytes and time)."""
    rows = list(dict.fromkeys(s["device"] if s["kind"] == "compute" else s["from"]
                              for s in segments))
    end = max((s["start"] + s["duration"] for s in segments), default=0.0) * 1e3 or 1.0
    for s in segments:
        left, width = s["start"] * 1e3, s["duration"] * 1e3
        if s["kind"] == "compute":
            y = rows.index(s["device"])
            ax.barh(y, width, left=left, height=0.6, color=colours.get(s["device"], "grey"),
                    edgecolor="black", linewidth=0.5)
            label = f"stage {s['stage']}" if s["stage"] is not None else s["name"]
            text = f"{label}\n{_ms(s['duration'])}"
        else:
            y = rows.index(s["from"])
            ax.barh(y, width, left=left, height=0.3, color="white", edgecolor="black",
                    hatch="///", linewidth=0.5)
            size = size_text(s["bytes"]) + " " if s.get("bytes") is not None else ""
            text = f"{size}-> {s['to']}\n{_ms(s['duration'])}"
        if width >= 0.04 * end:  # label the bars wide enough to hold text
            ax.text(left + width / 2, y + (0 if s["kind"] == "compute" else 0.32), text,
                    ha="center", va="center" if s["kind"] == "compute" else "top",
                    fontsize=7)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlim(0, end * 1.02)
    ax.set_xlabel("time (ms) of one inference: compute (filled), transfers (hatched)")


def _part_lanes(ax: Any, doc: dict[str, Any], colours: dict[str, Any]) -> None:
    """A plan with split stages: one lane per device, each stage a column; a part is a
    bar in its device's lane (the parts of one stage side by side in parallel lanes),
    labelled with its rows, halo rows and the bytes scattered to / gathered from it."""
    lanes = list(dict.fromkeys(u["device"] for st in doc["stages"] for u in st["units"]))
    for col, st in enumerate(doc["stages"]):
        for u in st["units"]:
            y = lanes.index(u["device"])
            ax.barh(y, 0.9, left=col + 0.05, height=0.7, color=colours.get(u["device"], "grey"),
                    edgecolor="black", linewidth=0.5)
            if st["split"] and u["rows"] is not None:
                halo = max(u.get("halo_rows", {}).values(), default=0)
                text = (f"r{u['rows'][0]}-{u['rows'][1]}\n+{halo} halo\n"
                        f"in {size_text(u.get('scatter_bytes', 0))}\n"
                        f"out {size_text(u.get('gather_bytes', 0))}")
            else:
                text = f"stage {st['id']}\nout {size_text(u['send_bytes'])}"
            ax.text(col + 0.5, y, text, ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.invert_yaxis()
    ax.set_xticks([c + 0.5 for c in range(len(doc["stages"]))],
                  [str(st["id"]) for st in doc["stages"]], fontsize=7)
    ax.set_xlim(0, max(1, len(doc["stages"])))
    ax.set_xlabel("stage (split stages: one part per device lane, running in parallel)")


def _stage_bytes(ax: Any, doc: dict[str, Any], colours: dict[str, Any]) -> None:
    """Without a priced timeline: the bytes each stage sends over the network."""
    stages = doc["stages"]
    labels = [f"stage {s['id']}\n{s['device'] or 'parts'}" for s in stages]
    sent = [s["send_bytes"] for s in stages]
    x = range(len(stages))
    bars = ax.bar(x, sent, color=[colours.get(s["device"] or s["units"][0]["device"], "grey")
                                  for s in stages], edgecolor="black")
    for bar, n in zip(bars, sent, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), size_text(n),
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("bytes sent over links")


def _partition(ax: Any, doc: dict[str, Any], colours: dict[str, Any]) -> None:
    """The stages over the layers, coloured by device (parts stacked), and an arrow per
    network send, labelled with its bytes and how it travels."""
    n_layers = max(1, doc["model"]["layers"])
    centre: dict[str, tuple[float, float]] = {}
    for s in doc["stages"]:
        first, last = s["layers"]
        units = s["units"]
        h = 0.8 / len(units)
        for k, u in enumerate(units):
            y = -0.4 + h * k
            ax.barh(y + h / 2, last - first + 1, left=first, height=h,
                    color=colours.get(u["device"], "grey"), edgecolor="black")
            rows = f" r{u['rows'][0]}-{u['rows'][1]}" if u["rows"] else ""
            ax.text((first + last + 1) / 2, y + h / 2, f"{u['key']}: {u['device']}{rows}",
                    ha="center", va="center", fontsize=8)
            centre[u["key"]] = ((first + last + 1) / 2, y + h / 2)
    centre["input"] = (-0.04 * n_layers, 0.0)
    centre["output"] = (n_layers * 1.04, 0.0)
    for key, label in (("input", "source"), ("output", "destination")):
        ax.text(centre[key][0], 0.0, label, ha="center", va="center", fontsize=7,
                rotation=90)
    senders = [("input", s) for s in doc["input_sends"]] + [
        (u["key"], s) for st in doc["stages"] for u in st["units"] for s in u["sends"]]
    import numpy as np

    for src, send in senders:
        if not send["network"] or send["to"] not in centre:
            continue
        (x0, _), (x1, _) = centre[src], centre[send["to"]]
        # a parabola over the boxes, higher for a longer jump, labelled at its apex
        height = 0.12 + 0.4 * abs(x1 - x0) / (n_layers * 1.1)
        xs = np.linspace(x0, x1, 40)
        ys = 0.42 + height * (1 - ((xs - (x0 + x1) / 2) / max(abs(x1 - x0) / 2, 1e-9)) ** 2)
        ax.plot(xs, ys, color="black", linewidth=0.8)
        ax.annotate("", xy=(xs[-1], ys[-1]), xytext=(xs[-3], ys[-3]),
                    arrowprops={"arrowstyle": "->", "color": "black", "linewidth": 0.8})
        kinds = sorted({t["transfer"] for t in send["tensors"]})
        ax.text((x0 + x1) / 2, 0.44 + height, f"{size_text(send['bytes'])} {'/'.join(kinds)}",
                ha="center", va="bottom", fontsize=7,
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    ax.set_yticks([])
    ax.set_ylim(-0.5, 1.1)
    ax.set_xlim(-0.08 * n_layers, n_layers * 1.08)
    step = max(1, n_layers // 12)
    ax.set_xticks(range(0, n_layers + 1, step))  # whole layers only
    ax.set_xlabel("layer (stage boxes; arrows: bytes sent per request over a link)")
