"""Vision Transformers in the torchvision ``VisionTransformer`` layout.

``vit_b_16`` is torchvision's ViT-B/16 (patch 16, width 768, depth 12, 12 heads, MLP 3072;
86,567,656 parameters at 224x224). ``vit_tiny`` keeps the same structure at patch 16,
width 192, depth 4, 3 heads, MLP 768, for fast tests.

The graph is the one torch exports for opset 17: a strided conv for the patch embedding,
a class token broadcast to the batch (Shape/Slice/Concat/Expand, so a symbolic batch
works) and concatenated in front, learned position embeddings, pre-norm encoder blocks
with real multi-head attention (MatMul, Softmax) and an exact-GELU MLP, a final
LayerNorm and the classification head on the class token.
"""

from __future__ import annotations

import math

import numpy as np

from models.builder import Dim, GraphBuilder
from partitioner.errors import fail

__all__ = ["vit_b_16", "vit_tiny", "vision_transformer"]


def _attention(g: GraphBuilder, x: str, heads: int, p: str) -> str:
    """torch ``nn.MultiheadAttention`` (self-attention, batch first) on ``x`` (N, T, D)."""
    d = int(g.shape(x)[-1])
    dh = d // heads
    # One packed in-projection (in_proj_weight/in_proj_bias, 3D wide), split into Q, K, V.
    qkv = g.linear(x, 3 * d, name=f"{p}.in_proj")
    q, k, v = g.split(qkv, 3, axis=-1, name=f"{p}.split")

    def heads_first(t: str, tag: str, perm: list[int]) -> str:
        r = g.reshape(t, [0, 0, heads, dh], name=f"{p}.{tag}.reshape")
        return g.transpose(r, perm, name=f"{p}.{tag}.transpose")

    q = heads_first(q, "q", [0, 2, 1, 3])          # (N, h, T, dh)
    k = heads_first(k, "k", [0, 2, 3, 1])          # (N, h, dh, T)
    v = heads_first(v, "v", [0, 2, 1, 3])          # (N, h, T, dh)
    # Scaled dot-product attention: softmax(Q K^T / sqrt(dh)) V.
    scores = g.matmul(q, k, name=f"{p}.scores")
    scale = g.const(np.float32(1.0 / math.sqrt(dh)))
    scores = g.node("Mul", [scores, scale], name=f"{p}.scale", shape=g.shape(scores))
    attn = g.softmax(scores, axis=-1, name=f"{p}.softmax")
    ctx = g.matmul(attn, v, name=f"{p}.context")     # (N, h, T, dh)
    ctx = g.transpose(ctx, [0, 2, 1, 3], name=f"{p}.merge.transpose")
    ctx = g.reshape(ctx, [0, 0, d], name=f"{p}.merge.reshape")
    return g.linear(ctx, d, name=f"{p}.out_proj")


def _encoder_block(g: GraphBuilder, x: str, heads: int, mlp: int, p: str) -> str:
    d = int(g.shape(x)[-1])
    y = g.layernorm(x, name=f"{p}.ln_1")
    y = _attention(g, y, heads, f"{p}.self_attention")
    x = g.add(x, y, name=f"{p}.add_1")
    y = g.layernorm(x, name=f"{p}.ln_2")
    y = g.gelu(g.linear(y, mlp, name=f"{p}.mlp.0"), name=f"{p}.mlp.1")
    y = g.linear(y, d, name=f"{p}.mlp.3")
    return g.add(x, y, name=f"{p}.add_2")


def vision_transformer(name: str, *, batch: Dim = 1, image_size: int = 224, patch: int = 16,
                       dim: int = 768, depth: int = 12, heads: int = 12, mlp: int = 3072,
                       num_classes: int = 1000, seed: int = 0):
    """A ViT with the given hyper-parameters (torchvision module names)."""
    if image_size % patch:
        fail(f"{name}: image size {image_size} is not a multiple of the patch size {patch}")
    if dim % heads:
        fail(f"{name}: width {dim} is not divisible by {heads} heads")
    g = GraphBuilder(name, seed=seed)
    x = g.input("input", (batch, 3, image_size, image_size))
    x = g.conv(x, dim, patch, stride=patch, padding=0, name="conv_proj")   # (N, D, n, n)
    x = g.reshape(x, [0, dim, -1], name="patches.reshape")                 # (N, D, T)
    x = g.transpose(x, [0, 2, 1], name="patches.transpose")                # (N, T, D)
    tokens = int(g.shape(x)[1])
    # Class token (1, 1, D) broadcast to (N, 1, D) with the batch read at run time.
    cls = g.param("class_token", 0.02 * g.rng.standard_normal((1, 1, dim), dtype=np.float32))
    n = g.node("Shape", [x], name="class_token.shape", shape=(3,))
    n = g.node("Slice", [n, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64))],
               name="class_token.batch", shape=(1,))
    target = g.concat([n, g.const(np.array([1, dim], np.int64))], axis=0,
                      name="class_token.target")
    cls = g.node("Expand", [cls, target], name="class_token.expand",
                 shape=(g.shape(x)[0], 1, dim))
    x = g.concat([cls, x], axis=1, name="encoder.concat")
    pos = g.param("encoder.pos_embedding",
                  0.02 * g.rng.standard_normal((1, tokens + 1, dim), dtype=np.float32))
    x = g.add(x, pos, name="encoder.pos_add")
    for i in range(depth):
        x = _encoder_block(g, x, heads, mlp, f"encoder.layers.encoder_layer_{i}")
    x = g.layernorm(x, name="encoder.ln")
    x = g.node("Gather", [x, g.const(np.int64(0))], name="class_token.select",
               shape=(g.shape(x)[0], dim), axis=1)
    g.output(g.gemm(x, num_classes, name="heads.head"), "logits")
    return g.build(doc=f"{name}: Vision Transformer (torchvision layout), random weights")


def vit_b_16(batch: Dim = 1, image_size: int = 224, *, seed: int = 0, num_classes: int = 1000):
    """torchvision ViT-B/16 (86,567,656 parameters at 224x224)."""
    return vision_transformer("vit_b_16", batch=batch, image_size=image_size, seed=seed,
                              num_classes=num_classes)


def vit_tiny(batch: Dim = 1, image_size: int = 224, *, seed: int = 0, num_classes: int = 1000):
    """A small ViT (patch 16, width 192, depth 4, 3 heads, MLP 768) for fast tests."""
    return vision_transformer("vit_tiny", batch=batch, image_size=image_size, dim=192, depth=4,
                              heads=3, mlp=768, seed=seed, num_classes=num_classes)
