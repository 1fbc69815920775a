"""Systems and small models for the spatial-split tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from partitioner.ir import Application, Device, Link, System


def mesh(flops: Sequence[float], *, bandwidth: float = 1.25e9, latency: float = 0.0,
         source_flops: float | None = 1e9, nic: float | None = None,
         destination: bool = False) -> System:
    """Devices ``d0, d1, ...`` with ``flops``, every pair linked, and (unless
    ``source_flops`` is None) a slow camera device ``src`` pinned as the source."""
    devices = [Device(f"d{k}", "edge", f, 25e9, nic or bandwidth) for k, f in enumerate(flops)]
    if source_flops is not None:
        devices.insert(0, Device("src", "edge", source_flops, 10e9, nic or bandwidth))
    links = tuple(Link(a.name, b.name, bandwidth, latency)
                  for i, a in enumerate(devices) for b in devices[i + 1:])
    app = Application(source="src", destination="src" if destination else None) \
        if source_flops is not None else Application()
    return System(tuple(devices), links, app)


def conv_chain(path: Path, *, height: int = 37, width: int = 11, seed: int = 0) -> Path:
    """A chain with odd heights, strides, dilation and asymmetric padding, then a
    classifier head that cannot be split (Flatten + Gemm)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    c, x = 3, "x"

    def w(name: str, shape: tuple[int, ...]) -> str:
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * 0.2).astype(np.float32), name))
        return name

    def conv(out_c: int, k: int, **attrs: object) -> None:
        nonlocal c, x
        i = len(nodes)
        ins = [x, w(f"w{i}", (out_c, c, k, k)), w(f"b{i}", (out_c,))]
        nodes.append(helper.make_node("Conv", ins, [f"c{i}"], name=f"conv{i}",
                                      kernel_shape=[k, k], **attrs))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"))
        c, x = out_c, f"r{i}"

    conv(8, 3, pads=[1, 1, 1, 1])
    conv(8, 3, strides=[2, 2], pads=[1, 0, 0, 1])
    conv(12, 3, dilations=[2, 2], pads=[2, 2, 2, 2])
    nodes.append(helper.make_node("MaxPool", [x], ["p"], name="pool", kernel_shape=[3, 3],
                                  strides=[2, 2]))
    nodes.append(helper.make_node("Flatten", ["p"], ["f"], name="flatten"))
    model = helper.make_model(helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                        [1, 3, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits),
        opset_imports=[helper.make_opsetid("", 17)])
    inferred = onnx.shape_inference.infer_shapes(model)
    flat = next(v for v in inferred.graph.value_info if v.name == "f")
    features = flat.type.tensor_type.shape.dim[1].dim_value
    model.graph.initializer.extend([
        numpy_helper.from_array((rng.standard_normal((5, features)) * 0.1).astype(np.float32),
                                "fc.w"),
        numpy_helper.from_array(np.zeros(5, np.float32), "fc.b")])
    model.graph.node.append(helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc",
                                             transB=1))
    out = path / "chain.onnx"
    onnx.save(model, out)
    return out


def one_conv(path: Path, *, height: int = 9, width: int = 7, seed: int = 1) -> Path:
    """One layer: conv(3x3, pad 1) + Relu with a 4-D output (the only splittable layer,
    so no chain of split stages exists)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((6, 3, 3, 3)) * 0.2).astype(
        np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    model = helper.make_model(helper.make_graph(
        nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                      [1, 3, height, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, height, width])],
        initializer=inits), opset_imports=[helper.make_opsetid("", 17)])
    out = path / "one.onnx"
    onnx.save(model, out)
    return out
