"""``yolo11_small``: a YOLO11-shaped detector (the model QUANT partitions), random weights.

Structure of Ultralytics ``yolo11n.yaml`` (widths 16..256, depth 0.5), with the
batch norms folded into the convolutions as an inference export has them (conv with bias,
then SiLU):

* backbone: stride-2 ``Conv`` stages and **C3k2** blocks (a C2f whose inner blocks are
  bottlenecks, or **C3k** blocks: two 1x1 branches, one through a bottleneck chain,
  concatenated and fused) down to stride 32, then **SPPF** (three chained 5x5 max-pools)
  and **C2PSA** (split; one half through a position-sensitive attention block: multi-head
  self-attention over the H*W positions with a depthwise-conv positional term, then a
  1x1 feed-forward pair, both residual);
* neck: FPN top-down (upsample, concat, C3k2) and PAN bottom-up (stride-2 conv, concat,
  C3k2), as in YOLOv8;
* **three-scale head** (v11 ``Detect``): per scale a box branch (two 3x3 convs and a 1x1 to
  ``4 * reg_max`` channels) and a class branch (depthwise 3x3 + 1x1, twice, then a 1x1 to
  ``num_classes``), concatenated: outputs ``p3`` (stride 8), ``p4`` (16), ``p5`` (32),
  raw (no DFL decoding).

Module names follow the Ultralytics ``model.<index>`` convention.
"""

from __future__ import annotations

import numpy as np

from models.builder import Dim, GraphBuilder
from models.yolo import sppf
from partitioner.errors import fail

__all__ = ["yolo11_small"]

REG_MAX = 16


def _conv(g: GraphBuilder, x: str, cout: int, k: int, p: str, stride: int = 1,
          groups: int = 1, act: bool = True) -> str:
    """Ultralytics ``Conv`` with its BN folded: conv (with bias) + SiLU (``act``)."""
    y = g.conv(x, cout, k, stride=stride, groups=groups, name=f"{p}.conv")
    return g.silu(y, name=f"{p}.act") if act else y


def _bottleneck(g: GraphBuilder, x: str, cout: int, p: str, shortcut: bool,
                e: float = 0.5) -> str:
    c = int(cout * e)
    y = _conv(g, _conv(g, x, c, 3, f"{p}.cv1"), cout, 3, f"{p}.cv2")
    return g.add(x, y, name=f"{p}.add") if shortcut and g.shape(x)[1] == cout else y


def _c3k(g: GraphBuilder, x: str, cout: int, p: str, n: int = 2) -> str:
    """C3k: cv1 -> n bottlenecks (3x3, e=1) and cv2 side by side, concat, cv3."""
    c = cout // 2
    a = _conv(g, x, c, 1, f"{p}.cv1")
    for i in range(n):
        a = _bottleneck(g, a, c, f"{p}.m.{i}", shortcut=True, e=1.0)
    b = _conv(g, x, c, 1, f"{p}.cv2")
    return _conv(g, g.concat([a, b], axis=1, name=f"{p}.concat"), cout, 1, f"{p}.cv3")


def _c3k2(g: GraphBuilder, x: str, cout: int, n: int, p: str, c3k: bool,
          e: float = 0.5, shortcut: bool = True) -> str:
    """C3k2: a C2f (1x1, split in two, ``n`` blocks on one half, concat all, 1x1) whose
    blocks are C3k (``c3k``) or bottlenecks."""
    c = int(cout * e)
    y = _conv(g, x, 2 * c, 1, f"{p}.cv1")
    parts = g.split(y, 2, axis=1, name=f"{p}.split")
    last = parts[-1]
    for i in range(n):
        b = f"{p}.m.{i}"
        last = _c3k(g, last, c, b) if c3k else _bottleneck(g, last, c, b, shortcut)
        parts.append(last)
    return _conv(g, g.concat(parts, axis=1, name=f"{p}.concat"), cout, 1, f"{p}.cv2")


def _attention(g: GraphBuilder, x: str, p: str, heads: int, attn_ratio: float = 0.5) -> str:
    """Ultralytics ``Attention``: qkv 1x1 conv, per-head softmax(q^T k * scale) over the
    H*W positions, v @ attn^T, plus a depthwise 3x3 positional term on v, 1x1 proj."""
    _, c, h, w = g.shape(x)
    assert isinstance(c, int) and isinstance(h, int) and isinstance(w, int)
    head_dim = c // heads
    key_dim = int(head_dim * attn_ratio)
    n = h * w
    qkv = _conv(g, x, c + 2 * key_dim * heads, 1, f"{p}.qkv", act=False)
    per_head = g.reshape(qkv, [0, heads, 2 * key_dim + head_dim, n], name=f"{p}.view")
    sizes = g.const(np.array([key_dim, key_dim, head_dim], np.int64))
    batch = g.shape(per_head)[0]
    q, k, v = (f"{p}.{t}" for t in "qkv")
    g.node("Split", [per_head, sizes], name=f"{p}.split", outputs=[q, k, v],
           shapes=[(batch, heads, key_dim, n), (batch, heads, key_dim, n),
                   (batch, heads, head_dim, n)], axis=2)
    qt = g.transpose(q, [0, 1, 3, 2], name=f"{p}.q_t")
    scores = g.matmul(qt, k, name=f"{p}.scores")
    scaled = g.node("Mul", [scores, g.const(np.float32(key_dim ** -0.5))],
                    name=f"{p}.scale", shape=g.shape(scores))
    attn = g.softmax(scaled, name=f"{p}.softmax", axis=-1)
    mixed = g.matmul(v, g.transpose(attn, [0, 1, 3, 2], name=f"{p}.attn_t"),
                     name=f"{p}.mix")
    image = g.reshape(mixed, [0, c, h, w], name=f"{p}.unview")
    v_image = g.reshape(v, [0, c, h, w], name=f"{p}.v_image")
    pe = _conv(g, v_image, c, 3, f"{p}.pe", groups=c, act=False)
    return _conv(g, g.add(image, pe, name=f"{p}.add_pe"), c, 1, f"{p}.proj", act=False)


def _c2psa(g: GraphBuilder, x: str, p: str, n: int = 1) -> str:
    """C2PSA: 1x1, split; one half through ``n`` PSA blocks (attention + feed-forward,
    both residual), concat, 1x1."""
    c1 = int(g.shape(x)[1])
    c = c1 // 2
    y = _conv(g, x, 2 * c, 1, f"{p}.cv1")
    a, b = g.split(y, 2, axis=1, name=f"{p}.split")
    for i in range(n):
        blk = f"{p}.m.{i}"
        b = g.add(b, _attention(g, b, f"{blk}.attn", heads=max(1, c // 64)),
                  name=f"{blk}.add_attn")
        ffn = _conv(g, _conv(g, b, 2 * c, 1, f"{blk}.ffn.0"), c, 1, f"{blk}.ffn.1", act=False)
        b = g.add(b, ffn, name=f"{blk}.add_ffn")
    return _conv(g, g.concat([a, b], axis=1, name=f"{p}.concat"), c1, 1, f"{p}.cv2")


def _detect(g: GraphBuilder, feats: list[str], num_classes: int) -> None:
    """v11 ``Detect``: per scale, box and class branches, concatenated."""
    first = int(g.shape(feats[0])[1])
    c2 = max(16, first // 4, 4 * REG_MAX)
    c3 = max(first, min(num_classes, 100))
    for i, (x, out) in enumerate(zip(feats, ("p3", "p4", "p5"), strict=True)):
        p = f"model.23.cv2.{i}"
        box = _conv(g, _conv(g, x, c2, 3, f"{p}.0"), c2, 3, f"{p}.1")
        box = g.conv(box, 4 * REG_MAX, 1, name=f"{p}.2")
        p = f"model.23.cv3.{i}"
        ch = int(g.shape(x)[1])
        cls = _conv(g, _conv(g, x, ch, 3, f"{p}.0.0", groups=ch), c3, 1, f"{p}.0.1")
        cls = _conv(g, _conv(g, cls, c3, 3, f"{p}.1.0", groups=c3), c3, 1, f"{p}.1.1")
        cls = g.conv(cls, num_classes, 1, name=f"{p}.2")
        g.output(g.concat([box, cls], axis=1, name=f"model.23.cat.{i}"), out)


def yolo11_small(batch: Dim = 1, image_size: int = 640, *, seed: int = 0,
                 num_classes: int = 80):
    """The detector; ``image_size`` must be a multiple of 32 (the deepest stride)."""
    if image_size % 32:
        fail(f"yolo11_small: image size {image_size} is not a multiple of 32")
    g = GraphBuilder("yolo11_small", seed=seed)
    x = g.input("images", (batch, 3, image_size, image_size))
    # Backbone (yolo11n: 64..1024 channels x 0.25, repeats x 0.5).
    x = _conv(g, x, 16, 3, "model.0", stride=2)
    x = _conv(g, x, 32, 3, "model.1", stride=2)
    x = _c3k2(g, x, 64, 1, "model.2", c3k=False, e=0.25)
    x = _conv(g, x, 64, 3, "model.3", stride=2)
    p3 = _c3k2(g, x, 128, 1, "model.4", c3k=False, e=0.25)
    x = _conv(g, p3, 128, 3, "model.5", stride=2)
    p4 = _c3k2(g, x, 128, 1, "model.6", c3k=True)
    x = _conv(g, p4, 256, 3, "model.7", stride=2)
    x = _c3k2(g, x, 256, 1, "model.8", c3k=True)
    x = sppf(g, x, 256, "model.9", _conv)
    p5 = _c2psa(g, x, "model.10")
    # Neck: FPN top-down, then PAN bottom-up.
    x = g.concat([g.resize(p5, 2, name="model.11"), p4], axis=1, name="model.12")
    n4 = _c3k2(g, x, 128, 1, "model.13", c3k=False)
    x = g.concat([g.resize(n4, 2, name="model.14"), p3], axis=1, name="model.15")
    o3 = _c3k2(g, x, 64, 1, "model.16", c3k=False)
    x = g.concat([_conv(g, o3, 64, 3, "model.17", stride=2), n4], axis=1, name="model.18")
    o4 = _c3k2(g, x, 128, 1, "model.19", c3k=False)
    x = g.concat([_conv(g, o4, 128, 3, "model.20", stride=2), p5], axis=1, name="model.21")
    o5 = _c3k2(g, x, 256, 1, "model.22", c3k=True)
    _detect(g, [o3, o4, o5], num_classes)
    return g.build(doc="yolo11_small: YOLO11-shaped detector (C3k2, SPPF, C2PSA, 3 scales)")
