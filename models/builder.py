"""A small DSL that writes ONNX graphs layer by layer, with readable names.

Every helper of :class:`GraphBuilder` adds one ONNX node named after the torchvision
module path it stands for (``"features.0"``, ``"layer1.0.conv1"``); its output tensor
carries the node's name, and its weights are initialisers named ``<node>.weight`` /
``<node>.bias`` (BatchNormalization adds ``running_mean`` / ``running_var``), as a
torch export of the same module would name them.

Only learnable weights become initialisers. Small fixed operands (Clip bounds, Reshape
shapes, Resize scales, the constants of GELU) are ``Constant`` nodes instead, so that
"trainable parameters" = initialisers minus BN running statistics, and the count can be
compared with published figures exactly.

The builder tracks the static shape of every tensor it creates (the batch dimension may be
a symbolic name); helpers use it to size weights and to check their operands.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from partitioner.errors import InternalError, fail

__all__ = ["GraphBuilder", "Dim", "Shape", "OPSET", "IR_VERSION"]

#: Opset 17 is the first with LayerNormalization; every runtime we target supports it.
OPSET = 17
#: The IR version that goes with opset 17 (newer IR versions are refused by older runtimes).
IR_VERSION = 8

Dim = int | str
Shape = tuple[Dim, ...]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


class GraphBuilder:
    """Accumulates nodes, initialisers, inputs and outputs of one ONNX graph.

    Args:
        name: The graph's (and model's) name.
        seed: Seed of the numpy generator that draws all weights.
    """

    def __init__(self, name: str, *, seed: int = 0) -> None:
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.params: list[tuple[str, np.ndarray]] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.shapes: dict[str, Shape] = {}
        self._node_names: set[str] = set()
        self._const_count = 0

    # ------------------------------------------------------------------ plumbing
    def shape(self, tensor: str) -> Shape:
        """The static shape recorded for ``tensor``."""
        try:
            return self.shapes[tensor]
        except KeyError:
            raise InternalError(f"builder {self.name}: no shape for tensor {tensor!r}") from None

    def _unique(self, name: str) -> str:
        # torchvision reuses one ReLU module several times in a block; ONNX node names must
        # be unique, so later uses get a numeric suffix, as torch.onnx does.
        if name not in self._node_names:
            self._node_names.add(name)
            return name
        k = 1
        while f"{name}_{k}" in self._node_names:
            k += 1
        self._node_names.add(f"{name}_{k}")
        return f"{name}_{k}"

    def input(self, name: str, shape: Shape, elem_type: int = TensorProto.FLOAT) -> str:
        """Declare a graph input; string dimensions are symbolic (e.g. ``"batch"``)."""
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        self.shapes[name] = tuple(shape)
        return name

    def output(self, tensor: str, name: str | None = None,
               elem_type: int = TensorProto.FLOAT) -> str:
        """Declare ``tensor`` a graph output, with its tracked shape.

        ``name`` renames the tensor first (in its producer and all consumers), so a graph
        output can be called ``"logits"`` without an extra Identity node.
        """
        if name is not None and name != tensor:
            if name in self.shapes:
                raise InternalError(f"builder {self.name}: tensor {name!r} already exists")
            for node in self.nodes:
                for seq in (node.input, node.output):
                    for k, t in enumerate(seq):
                        if t == tensor:
                            seq[k] = name
            self.shapes[name] = self.shapes.pop(tensor)
            tensor = name
        self.outputs.append(
            helper.make_tensor_value_info(tensor, elem_type, list(self.shape(tensor))))
        return tensor

    def node(self, op: str, inputs: Sequence[str], *, name: str, shape: Shape | None = None,
             outputs: Sequence[str] | None = None, shapes: Sequence[Shape] | None = None,
             **attrs: Any) -> str:
        """Add one node; returns its (first) output, named after the node unless given."""
        name = self._unique(name)
        outs = list(outputs) if outputs is not None else [name]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        if shapes is not None:
            for out, shp in zip(outs, shapes, strict=True):
                self.shapes[out] = tuple(shp)
        elif shape is not None:
            self.shapes[outs[0]] = tuple(shape)
        return outs[0]

    def param(self, name: str, array: np.ndarray) -> str:
        """Add a learnable initialiser (float32); serialised only by :meth:`build`."""
        arr = np.ascontiguousarray(array, dtype=np.float32)
        self.params.append((name, arr))
        self.shapes[name] = tuple(arr.shape)
        return name

    def weight(self, name: str, shape: Sequence[int], fan_in: int) -> str:
        """A He-uniform weight (variance 2 / fan_in) so deep random nets stay finite.

        Uniform rather than normal draws: same variance, several times faster for the
        100-million-weight classifiers.
        """
        w = self.rng.random(tuple(shape), dtype=np.float32)
        bound = math.sqrt(6.0 / max(fan_in, 1))
        w *= np.float32(2.0 * bound)
        w -= np.float32(bound)
        return self.param(name, w)

    def bias(self, name: str, n: int) -> str:
        """A small random bias."""
        return self.param(name, 0.01 * self.rng.standard_normal(n, dtype=np.float32))

    def const(self, value: np.ndarray | float | int | Sequence[int], *, dtype: Any = None,
              name: str | None = None) -> str:
        """A fixed operand as a ``Constant`` node (not a learnable parameter)."""
        arr = np.asarray(value, dtype=dtype)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        self._const_count += 1
        cname = name or f"const.{self._const_count}"
        out = self.node("Constant", [], name=cname, shape=tuple(arr.shape),
                        value=numpy_helper.from_array(arr, cname))
        return out

    # ------------------------------------------------------------------ layers
    def conv(self, x: str, cout: int, kernel: int | Sequence[int], *, name: str,
             stride: int | Sequence[int] = 1, padding: int | Sequence[int] | None = None,
             groups: int = 1, bias: bool = True) -> str:
        """Conv2d; ``padding`` defaults to "same"-style ``kernel // 2``."""
        n, cin, h, w = self.shape(x)
        kh, kw = _pair(kernel)
        sh, sw = _pair(stride)
        ph, pw = _pair(padding if padding is not None else (kh // 2, kw // 2))
        if not isinstance(cin, int) or cin % groups or cout % groups:
            fail(f"{self.name}: layer {name}: {cin} -> {cout} channels not divisible by "
                 f"{groups} groups")
        assert isinstance(h, int) and isinstance(w, int)
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if ho < 1 or wo < 1:
            fail(f"{self.name}: layer {name}: input {h}x{w} too small for a {kh}x{kw} kernel; "
                 "use a larger image size")
        fan_in = cin // groups * kh * kw
        ins = [x, self.weight(f"{name}.weight", (cout, cin // groups, kh, kw), fan_in)]
        if bias:
            ins.append(self.bias(f"{name}.bias", cout))
        return self.node("Conv", ins, name=name, shape=(n, cout, ho, wo),
                         kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
                         group=groups)

    def bn(self, x: str, *, name: str, eps: float = 1e-5, gamma: float = 1.0) -> str:
        """BatchNormalization (inference form) with random affine terms and statistics.

        ``gamma`` centres the random scale; residual branches use a small one (as
        torchvision's ``zero_init_residual``, damped rather than zeroed) so activations
        do not double at every residual Add of a deep random network.
        """
        c = self.shape(x)[1]
        assert isinstance(c, int)
        r = self.rng
        scale = gamma * (1.0 + 0.1 * r.standard_normal(c, dtype=np.float32))
        ins = [x,
               self.param(f"{name}.weight", scale),
               self.param(f"{name}.bias", 0.1 * r.standard_normal(c, dtype=np.float32)),
               self.param(f"{name}.running_mean", 0.1 * r.standard_normal(c, dtype=np.float32)),
               self.param(f"{name}.running_var", r.uniform(0.5, 1.5, c).astype(np.float32))]
        return self.node("BatchNormalization", ins, name=name, shape=self.shape(x), epsilon=eps)

    def _same(self, op: str, x: str, name: str, extra: Sequence[str] = (), **attrs: Any) -> str:
        return self.node(op, [x, *extra], name=name, shape=self.shape(x), **attrs)

    def relu(self, x: str, *, name: str) -> str:
        """ReLU."""
        return self._same("Relu", x, name)

    def relu6(self, x: str, *, name: str) -> str:
        """ReLU6 as ``Clip(x, 0, 6)``, the form torch exports."""
        lo, hi = self.const(np.float32(0.0)), self.const(np.float32(6.0))
        return self._same("Clip", x, name, (lo, hi))

    def sigmoid(self, x: str, *, name: str) -> str:
        """Sigmoid."""
        return self._same("Sigmoid", x, name)

    def silu(self, x: str, *, name: str) -> str:
        """SiLU as ``x * sigmoid(x)`` (opset 17 has no SiLU op)."""
        s = self.sigmoid(x, name=f"{name}.sigmoid")
        return self.mul(x, s, name=name)

    def gelu(self, x: str, *, name: str) -> str:
        """Exact GELU, ``0.5 * x * (1 + erf(x / sqrt(2)))``, as torch exports it for opset 17."""
        d = self.node("Div", [x, self.const(np.float32(math.sqrt(2.0)))], name=f"{name}.div",
                      shape=self.shape(x))
        e = self._same("Erf", d, f"{name}.erf")
        a = self.node("Add", [e, self.const(np.float32(1.0))], name=f"{name}.add",
                      shape=self.shape(x))
        m = self.mul(x, a, name=f"{name}.mul")
        return self.node("Mul", [m, self.const(np.float32(0.5))], name=name, shape=self.shape(x))

    def maxpool(self, x: str, kernel: int, stride: int, *, name: str, padding: int = 0,
                ceil_mode: bool = False) -> str:
        """MaxPool2d."""
        return self._pool("MaxPool", x, kernel, stride, padding, name, ceil_mode)

    def avgpool(self, x: str, kernel: int, stride: int, *, name: str, padding: int = 0) -> str:
        """AvgPool2d."""
        return self._pool("AveragePool", x, kernel, stride, padding, name, False)

    def _pool(self, op: str, x: str, k: int, s: int, p: int, name: str, ceil: bool) -> str:
        n, c, h, w = self.shape(x)
        assert isinstance(h, int) and isinstance(w, int)
        rnd = math.ceil if ceil else math.floor
        ho, wo = rnd((h + 2 * p - k) / s) + 1, rnd((w + 2 * p - k) / s) + 1
        if ho < 1 or wo < 1:
            fail(f"{self.name}: layer {name}: input {h}x{w} too small for a {k}x{k} pool; "
                 "use a larger image size")
        return self.node(op, [x], name=name, shape=(n, c, ho, wo), kernel_shape=[k, k],
                         strides=[s, s], pads=[p, p, p, p], ceil_mode=int(ceil))

    def global_avgpool(self, x: str, *, name: str) -> str:
        """AdaptiveAvgPool2d(1) as GlobalAveragePool."""
        n, c = self.shape(x)[:2]
        return self.node("GlobalAveragePool", [x], name=name, shape=(n, c, 1, 1))

    def adaptive_avgpool(self, x: str, size: int, *, name: str) -> str | None:
        """AdaptiveAvgPool2d(size) with the single ONNX op that computes it exactly.

        Torch's adaptive pooling averages rows ``floor(i*H/S) .. ceil((i+1)*H/S)``. That is
        the identity when ``H == S`` (returns ``None``: no node), an AveragePool with
        kernel = stride = ``H/S`` when ``S`` divides ``H``, and nearest-neighbour
        replication when ``H`` divides ``S``. Other sizes are refused, as torch.onnx refuses
        to export them.
        """
        n, c, h, w = self.shape(x)
        if h == size and w == size:
            return None
        if size == 1:
            return self.global_avgpool(x, name=name)
        assert isinstance(h, int) and isinstance(w, int)
        if h == w and h % size == 0:
            return self.avgpool(x, h // size, h // size, name=name)
        if h == w and size % h == 0:
            return self.resize(x, size // h, name=name)
        fail(f"{self.name}: layer {name}: a {h}x{w} feature map cannot be adaptively pooled to "
             f"{size}x{size} by one ONNX op; choose an image size that makes them divide")

    def resize(self, x: str, factor: int, *, name: str) -> str:
        """Nearest-neighbour upsampling by an integer factor (torch ``Upsample``)."""
        n, c, h, w = self.shape(x)
        assert isinstance(h, int) and isinstance(w, int)
        scales = self.const(np.array([1, 1, factor, factor], np.float32))
        return self.node("Resize", [x, "", scales], name=name,
                         shape=(n, c, h * factor, w * factor), mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    def flatten(self, x: str, *, name: str) -> str:
        """Flatten everything after the batch dimension."""
        shp = self.shape(x)
        rest = math.prod(int(d) for d in shp[1:])
        return self.node("Flatten", [x], name=name, shape=(shp[0], rest), axis=1)

    def gemm(self, x: str, out: int, *, name: str) -> str:
        """torch ``Linear`` on a 2-D input: Gemm with the (out, in) weight, ``transB=1``."""
        n, cin = self.shape(x)
        assert isinstance(cin, int)
        w = self.weight(f"{name}.weight", (out, cin), cin)
        b = self.bias(f"{name}.bias", out)
        return self.node("Gemm", [x, w, b], name=name, shape=(n, out), transB=1)

    def linear(self, x: str, out: int, *, name: str, bias: bool = True) -> str:
        """torch ``Linear`` on an N-D input: MatMul with an (in, out) weight, then Add."""
        shp = self.shape(x)
        cin = shp[-1]
        assert isinstance(cin, int)
        w = self.weight(f"{name}.weight", (cin, out), cin)
        new = (*shp[:-1], out)
        y = self.node("MatMul", [x, w], name=f"{name}.matmul" if bias else name, shape=new)
        if not bias:
            return y
        return self.node("Add", [y, self.bias(f"{name}.bias", out)], name=name, shape=new)

    def matmul(self, a: str, b: str, *, name: str) -> str:
        """Batched MatMul of two activations (e.g. attention scores)."""
        sa, sb = self.shape(a), self.shape(b)
        return self.node("MatMul", [a, b], name=name, shape=(*sa[:-1], sb[-1]))

    def add(self, a: str, b: str, *, name: str) -> str:
        """Elementwise Add (residual connections); shape of ``a``."""
        return self.node("Add", [a, b], name=name, shape=self.shape(a))

    def mul(self, a: str, b: str, *, name: str) -> str:
        """Elementwise Mul; shape of ``a``."""
        return self.node("Mul", [a, b], name=name, shape=self.shape(a))

    def concat(self, xs: Sequence[str], *, axis: int, name: str) -> str:
        """Concat along ``axis``."""
        shapes = [self.shape(x) for x in xs]
        total = sum(int(s[axis]) for s in shapes)
        new = list(shapes[0])
        new[axis] = total
        return self.node("Concat", list(xs), name=name, shape=tuple(new), axis=axis)

    def split(self, x: str, parts: int, *, axis: int, name: str) -> list[str]:
        """Split into ``parts`` equal pieces (no split sizes needed in opset 13+)."""
        shp = list(self.shape(x))
        if int(shp[axis]) % parts:
            raise InternalError(f"{name}: cannot split {shp[axis]} into {parts}")
        shp[axis] = int(shp[axis]) // parts
        outs = [f"{name}.{k}" for k in range(parts)]
        self.node("Split", [x], name=name, outputs=outs, shapes=[tuple(shp)] * parts, axis=axis)
        return outs

    def softmax(self, x: str, *, name: str, axis: int = -1) -> str:
        """Softmax over ``axis``."""
        return self._same("Softmax", x, name, axis=axis)

    def layernorm(self, x: str, *, name: str, eps: float = 1e-6) -> str:
        """LayerNorm over the last axis, with learnable weight and bias."""
        d = self.shape(x)[-1]
        assert isinstance(d, int)
        w = self.param(f"{name}.weight", 1.0 + 0.1 * self.rng.standard_normal(d, np.float32))
        b = self.param(f"{name}.bias", 0.1 * self.rng.standard_normal(d, dtype=np.float32))
        return self._same("LayerNormalization", x, name, (w, b), axis=-1, epsilon=eps)

    def reshape(self, x: str, shape: Sequence[int], *, name: str) -> str:
        """Reshape; 0 copies the input dimension (keeps a symbolic batch), -1 is inferred."""
        src = self.shape(x)
        out: list[Dim] = [src[i] if d == 0 else d for i, d in enumerate(shape)]
        if -1 in out:
            known = math.prod(int(d) for d in out if d != -1 and isinstance(d, int))
            total = math.prod(int(d) for d in src if isinstance(d, int))
            sym = sum(1 for d in src if isinstance(d, str)) - sum(
                1 for d in out if isinstance(d, str))
            if sym:
                raise InternalError(f"{name}: -1 with a symbolic dimension folded away")
            out[out.index(-1)] = total // known
        return self.node("Reshape", [x, self.const(np.array(shape, np.int64))], name=name,
                         shape=tuple(out))

    def transpose(self, x: str, perm: Sequence[int], *, name: str) -> str:
        """Transpose with ``perm``."""
        src = self.shape(x)
        return self.node("Transpose", [x], name=name, shape=tuple(src[p] for p in perm),
                         perm=list(perm))

    # ------------------------------------------------------------------ result
    def build(self, *, doc: str = "") -> onnx.ModelProto:
        """The finished model (opset 17, IR 8); its graph is checked structurally."""
        if not self.outputs:
            raise InternalError(f"builder {self.name}: no outputs declared")
        # Filled in place: helper.make_graph/make_model would copy every weight twice.
        model = onnx.ModelProto()
        model.ir_version = IR_VERSION
        model.producer_name = "onnx-partitioner models"
        model.doc_string = doc
        model.opset_import.append(helper.make_opsetid("", OPSET))
        graph = model.graph
        graph.name = self.name
        graph.node.extend(self.nodes)
        graph.input.extend(self.inputs)
        graph.output.extend(self.outputs)
        # Each array is dropped once copied, so peak memory stays near twice the weights
        # (VGG16: 553 MB) rather than three times; the builder is single-use after this.
        params, self.params = self.params, []
        for k, (name, arr) in enumerate(params):
            t = graph.initializer.add()
            t.name = name
            t.data_type = TensorProto.FLOAT
            t.dims.extend(arr.shape)
            t.raw_data = arr.astype("<f4", copy=False).tobytes()
            params[k] = (name, np.empty(0, np.float32))
            del arr
        return model
