"""The picture of a bundle (``explain --plot FILE.png|svg``), drawn with matplotlib (Agg).

Top: the single-inference timeline, one row per device, compute bars per stage and
transfer bars between devices (when the bundle carries a priced timeline), else the bytes
crossing each cut. Bottom: the partition diagram, every layer coloured by the device of
its stage, with the stage boundaries and the tensors forwarded across each cut.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from partitioner.errors import fail

__all__ = ["plot", "FORMATS"]

FORMATS = (".png", ".svg")


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        fail("--plot needs matplotlib: pip install 'onnx-partitioner[plot]'")
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot(doc: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Draw an ``explain`` document to ``path`` (written atomically)."""
    out = Path(path)
    if out.suffix.lower() not in FORMATS:
        fail(f"--plot {str(out)!r}: expected a .png or .svg file name")
    if not out.parent.is_dir():
        fail(f"--plot {str(out)!r}: folder {str(out.parent)!r} does not exist")
    plt = _pyplot()
    devices = doc["devices"]
    colours = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(devices)}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5.5),
                                      gridspec_kw={"height_ratios": [3, 2]})
    if doc.get("timeline"):
        _timeline(top, doc["timeline"], colours)
    else:
        _cut_bytes(top, doc, colours)
    _partition(bottom, doc, colours)
    fig.suptitle(f"{doc['model']['name']}: {len(doc['stages'])} stages, "
                 f"objective {doc.get('objective')}")
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


def _timeline(ax: Any, segments: list[dict[str, Any]], colours: dict[str, Any]) -> None:
    rows = list(dict.fromkeys(s["device"] if s["kind"] == "compute" else s["from"]
                              for s in segments))
    for s in segments:
        if s["kind"] == "compute":
            y = rows.index(s["device"])
            ax.barh(y, s["duration"] * 1e3, left=s["start"] * 1e3, height=0.6,
                    color=colours.get(s["device"], "grey"), edgecolor="black", linewidth=0.5)
        else:
            y = rows.index(s["from"])
            ax.barh(y, s["duration"] * 1e3, left=s["start"] * 1e3, height=0.3,
                    color="white", edgecolor="black", hatch="///", linewidth=0.5)
    ax.set_yticks(range(len(rows)), rows)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms): compute (filled), transfer (hatched)")


def _cut_bytes(ax: Any, doc: dict[str, Any], colours: dict[str, Any]) -> None:
    cuts = doc["cuts"]
    labels = [f"{c['from']}->{c['to']}" for c in cuts]
    sent = [c["bytes"] - c["forwarded_bytes"] for c in cuts]
    fwd = [c["forwarded_bytes"] for c in cuts]
    x = range(len(cuts))
    ax.bar(x, sent, color=[colours.get(c["from"], "grey") for c in cuts], label="produced")
    ax.bar(x, fwd, bottom=sent, color="white", edgecolor="black", hatch="///",
           label="forwarded")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("bytes after stage")
    ax.legend(loc="upper right")


def _partition(ax: Any, doc: dict[str, Any], colours: dict[str, Any]) -> None:
    for s in doc["stages"]:
        first, last = s["layers"]
        ax.barh(0, last - first + 1, left=first, height=0.8,
                color=colours.get(s["device"], "grey"), edgecolor="black")
        ax.text((first + last + 1) / 2, 0, f"{s['id']}:{s['device']}", ha="center",
                va="center", fontsize=8)
    for c in doc["cuts"][:-1]:
        if c["forwarded"]:
            ax.annotate(f"+{len(c['forwarded'])} fwd", (c["after_layer"] + 1, 0.5),
                        ha="center", fontsize=7)
    ax.set_yticks([])
    ax.set_ylim(-0.5, 0.7)
    ax.set_xlim(0, max(1, doc["model"]["layers"]))
    ax.set_xlabel("layer")
