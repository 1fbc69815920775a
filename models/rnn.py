"""``lstm_small``: a two-layer LSTM sequence classifier built on the ONNX ``LSTM`` op.

Input ``sequence`` is batch-first ``(N, T, features)`` (T = 32, 40 features by default,
e.g. MFCC frames); it is transposed to the ``(T, N, features)`` layout of the ONNX op,
run through two stacked unidirectional LSTM layers (hidden 128), and the last hidden
state of the top layer is classified by a Linear layer into ``logits`` ``(N, classes)``.
Weights follow the ONNX gate layout (W: (1, 4H, I), R: (1, 4H, H), B: (1, 8H)); the
parameter count equals torch ``nn.LSTM`` with two bias vectors per layer.
"""

from __future__ import annotations

import math

import numpy as np

from models.builder import Dim, GraphBuilder
from partitioner.errors import fail

__all__ = ["lstm_small"]


def _lstm(g: GraphBuilder, x: str, hidden: int, p: str, last: bool) -> str:
    """One unidirectional LSTM layer on ``x`` (T, N, I).

    Returns the full output sequence (T, N, H) for the next layer, or, for the ``last``
    layer, its final hidden state (N, H); the unused output is left unconnected.
    """
    t, n, i = g.shape(x)
    assert isinstance(i, int)
    # torch's uniform(-1/sqrt(H), 1/sqrt(H)) initialisation keeps gates out of saturation.
    bound = 1.0 / math.sqrt(hidden)

    def uni(shape: tuple[int, ...]) -> np.ndarray:
        return g.rng.uniform(-bound, bound, shape).astype(np.float32)

    w = g.param(f"{p}.W", uni((1, 4 * hidden, i)))
    r = g.param(f"{p}.R", uni((1, 4 * hidden, hidden)))
    b = g.param(f"{p}.B", uni((1, 8 * hidden)))
    outs = [f"{p}.Y", f"{p}.Y_h"]
    g.node("LSTM", [x, w, r, b], name=p, outputs=outs,
           shapes=[(t, 1, n, hidden), (1, n, hidden)], hidden_size=hidden)
    if last:
        axes = g.const(np.array([0], np.int64))
        return g.node("Squeeze", [outs[1], axes], name=f"{p}.squeeze", shape=(n, hidden))
    # Y is (T, num_directions=1, N, H); drop the direction axis.
    axes = g.const(np.array([1], np.int64))
    return g.node("Squeeze", [outs[0], axes], name=f"{p}.squeeze", shape=(t, n, hidden))


def lstm_small(batch: Dim = 1, image_size: int | None = None, *, seed: int = 0,
               num_classes: int = 10, features: int = 40, hidden: int = 128, layers: int = 2):
    """The classifier; ``image_size`` is read as the sequence length (default 32)."""
    steps = 32 if image_size is None else image_size
    if steps < 1:
        fail(f"lstm_small: sequence length {steps} must be positive")
    g = GraphBuilder("lstm_small", seed=seed)
    x = g.input("sequence", (batch, steps, features))
    x = g.transpose(x, [1, 0, 2], name="time_major")
    for k in range(layers):
        x = _lstm(g, x, hidden, f"lstm.{k}", last=k == layers - 1)
    g.output(g.gemm(x, num_classes, name="fc"), "logits")
    return g.build(doc="lstm_small: two-layer LSTM sequence classifier, random weights")
