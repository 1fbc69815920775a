"""``yolo_small``: a YOLO-style one-stage detector with three output scales.

Structure after YOLOv8-n (Ultralytics), simplified and with our own widths:

* backbone: stride-2 ``Conv`` (conv + BN + SiLU) stages with C2f blocks (split, a chain
  of residual bottlenecks, concat of every intermediate) down to stride 32, then SPPF
  (three chained 5x5 max-pools, concatenated);
* neck: a top-down FPN path (nearest ``Resize`` x2, ``Concat`` with the backbone feature
  of that scale, C2f) and a bottom-up PAN path (stride-2 conv, ``Concat``, C2f);
* three detection heads (conv 3x3 + 1x1 conv to ``anchors * (5 + classes)`` channels),
  one graph output each: ``p3`` (stride 8), ``p4`` (stride 16), ``p5`` (stride 32).

Module names follow the Ultralytics ``model.<index>`` convention. It is a DAG with long
skip connections (backbone P3/P4 into the neck, neck into PAN), which is what makes cuts
in a detector carry several live tensors.
"""

from __future__ import annotations

from collections.abc import Callable

from models.builder import Dim, GraphBuilder
from partitioner.errors import fail

__all__ = ["yolo_small", "sppf"]


def _conv(g: GraphBuilder, x: str, cout: int, k: int, p: str, stride: int = 1) -> str:
    """Ultralytics ``Conv``: conv (no bias) + BN + SiLU."""
    x = g.conv(x, cout, k, stride=stride, bias=False, name=f"{p}.conv")
    return g.silu(g.bn(x, name=f"{p}.bn"), name=f"{p}.act")


def _c2f(g: GraphBuilder, x: str, cout: int, n: int, p: str, shortcut: bool = True) -> str:
    """C2f: 1x1 conv, split in two, ``n`` bottlenecks on one half, concat all, 1x1 conv."""
    c = cout // 2
    y = _conv(g, x, 2 * c, 1, f"{p}.cv1")
    parts = g.split(y, 2, axis=1, name=f"{p}.split")
    last = parts[-1]
    for i in range(n):
        b = f"{p}.m.{i}"
        z = _conv(g, _conv(g, last, c, 3, f"{b}.cv1"), c, 3, f"{b}.cv2")
        last = g.add(last, z, name=f"{b}.add") if shortcut else z
        parts.append(last)
    return _conv(g, g.concat(parts, axis=1, name=f"{p}.concat"), cout, 1, f"{p}.cv2")


Conv = Callable[[GraphBuilder, str, int, int, str], str]


def sppf(g: GraphBuilder, x: str, cout: int, p: str, conv: Conv | None = None) -> str:
    """SPPF: 1x1 conv, three chained 5x5/1 max-pools, concat of all four, 1x1 conv
    (``conv``: the model's conv block, default conv + BN + SiLU)."""
    conv = conv or _conv
    c = int(g.shape(x)[1]) // 2
    y = conv(g, x, c, 1, f"{p}.cv1")
    pools = [y]
    for i in range(3):
        pools.append(g.maxpool(pools[-1], 5, 1, padding=2, name=f"{p}.m.{i}"))
    return conv(g, g.concat(pools, axis=1, name=f"{p}.concat"), cout, 1, f"{p}.cv2")


def yolo_small(batch: Dim = 1, image_size: int = 640, *, seed: int = 0, num_classes: int = 80,
               anchors: int = 3):
    """The detector; ``image_size`` must be a multiple of 32 (the deepest stride)."""
    if image_size % 32:
        fail(f"yolo_small: image size {image_size} is not a multiple of 32")
    w = (16, 32, 64, 128, 256)          # channel widths at strides 2, 4, 8, 16, 32
    g = GraphBuilder("yolo_small", seed=seed)
    x = g.input("images", (batch, 3, image_size, image_size))
    # Backbone.
    x = _conv(g, x, w[0], 3, "model.0", stride=2)
    x = _conv(g, x, w[1], 3, "model.1", stride=2)
    x = _c2f(g, x, w[1], 1, "model.2")
    x = _conv(g, x, w[2], 3, "model.3", stride=2)
    p3 = _c2f(g, x, w[2], 2, "model.4")
    x = _conv(g, p3, w[3], 3, "model.5", stride=2)
    p4 = _c2f(g, x, w[3], 2, "model.6")
    x = _conv(g, p4, w[4], 3, "model.7", stride=2)
    x = _c2f(g, x, w[4], 1, "model.8")
    p5 = sppf(g, x, w[4], "model.9")
    # Neck, top-down (FPN): upsample the coarser map and fuse it with the finer one.
    x = g.resize(p5, 2, name="model.10")
    x = g.concat([x, p4], axis=1, name="model.11")
    n4 = _c2f(g, x, w[3], 1, "model.12", shortcut=False)
    x = g.resize(n4, 2, name="model.13")
    x = g.concat([x, p3], axis=1, name="model.14")
    o3 = _c2f(g, x, w[2], 1, "model.15", shortcut=False)
    # Neck, bottom-up (PAN): downsample and fuse with the top-down maps.
    x = _conv(g, o3, w[2], 3, "model.16", stride=2)
    x = g.concat([x, n4], axis=1, name="model.17")
    o4 = _c2f(g, x, w[3], 1, "model.18", shortcut=False)
    x = _conv(g, o4, w[3], 3, "model.19", stride=2)
    x = g.concat([x, p5], axis=1, name="model.20")
    o5 = _c2f(g, x, w[4], 1, "model.21", shortcut=False)
    # Heads: one per scale, raw predictions (box, objectness, classes per anchor).
    per_cell = anchors * (5 + num_classes)
    for i, (feat, out) in enumerate(((o3, "p3"), (o4, "p4"), (o5, "p5"))):
        h = _conv(g, feat, int(g.shape(feat)[1]), 3, f"model.22.cv.{i}")
        h = g.conv(h, per_cell, 1, name=f"model.22.pred.{i}")
        g.output(h, out)
    return g.build(doc="yolo_small: YOLO-style detector (backbone, FPN/PAN neck, 3 heads)")
