"""Hand-built models and a minimal LayerGraph builder for the slicing and backend tests.

They do not depend on the front end, so these tests pin the slicing contract on their own:
every node (or every given group of nodes) is one layer, and the cuts are computed here the
way SPEC §2 defines them (every tensor produced at or before ``k`` and read after ``k``,
model inputs still needed, model outputs produced early).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from partitioner.frontend.slicing import tensor_info
from partitioner.ir import Cut, Layer, LayerGraph, TensorInfo

__all__ = ["Prepared", "layer_graph", "prepare", "skip_dag", "run_model"]


@dataclass(frozen=True)
class Prepared:
    """Stands in for ``partitioner.frontend.PreparedModel`` (same attribute names)."""

    model: onnx.ModelProto
    graph: LayerGraph
    path: Path | None = None
    base_dir: Path | None = None


def layer_graph(model: onnx.ModelProto, groups: list[list[int]] | None = None,
                name: str = "m") -> LayerGraph:
    """A LayerGraph whose layer ``k`` is the nodes ``groups[k]`` (default: one node each)."""
    model = onnx.shape_inference.infer_shapes(model)
    g = model.graph
    groups = groups or [[i] for i in range(len(g.node))]
    inits = {t.name for t in g.initializer}
    infos: dict[str, TensorInfo] = {}
    for vi in (*g.input, *g.value_info, *g.output):
        if vi.name not in inits:
            infos[vi.name] = tensor_info(vi)
    layer_of = {i: k for k, grp in enumerate(groups) for i in grp}
    produced_at = {o: layer_of[i] for i, n in enumerate(g.node) for o in n.output}
    last_read: dict[str, int] = {}
    for i, n in enumerate(g.node):
        for x in n.input:
            if x in infos:
                last_read[x] = max(last_read.get(x, -1), layer_of[i])
    outs = [o.name for o in g.output]
    for o in outs:
        last_read[o] = len(groups)
    cuts = []
    for k in range(-1, len(groups)):
        live = [t for t in infos if produced_at.get(t, -1) <= k < last_read.get(t, -1)]
        cuts.append(Cut(k, tuple(live), sum(infos[t].nbytes for t in live)))
    # Rough FLOPs, enough for the solver to prefer a fast device for the convolutions.
    flops = [sum(10**6 if g.node[i].op_type == "Conv" else 10**3 for i in grp) for grp in groups]
    # The tensor DAG edges, as the front end records them (stage-graph routing reads them);
    # a Constant's output is copied into every stage that reads it, so it is no edge.
    const = {o for n in g.node if n.op_type == "Constant" for o in n.output}
    consumes = [tuple(dict.fromkeys(x for i in grp for x in g.node[i].input
                                    if x in infos and x not in const
                                    and produced_at.get(x, -1) != k))
                for k, grp in enumerate(groups)]
    produces = [tuple(dict.fromkeys(o for i in grp for o in g.node[i].output
                                    if last_read.get(o, -1) > k and o not in const))
                for k, grp in enumerate(groups)]
    layers = tuple(
        Layer(k, f"layer{k}", tuple(g.node[i].op_type for i in grp), tuple(grp), flops[k], 0,
              0, 0, cuts[k + 1].nbytes, consumes=consumes[k], produces=produces[k])
        for k, grp in enumerate(groups))
    return LayerGraph(name, hashlib.sha256(model.SerializeToString()).hexdigest(), "node",
                      layers, tuple(cuts),
                      tuple(infos[vi.name] for vi in g.input if vi.name not in inits),
                      tuple(infos[o] for o in outs), infos)


def prepare(model: onnx.ModelProto, groups: list[list[int]] | None = None,
            base_dir: Path | None = None, name: str = "m") -> Prepared:
    inferred = onnx.shape_inference.infer_shapes(model)
    return Prepared(inferred, layer_graph(model, groups, name), None, base_dir)


def _w(name: str, shape: tuple[int, ...], seed: int) -> TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)


def skip_dag() -> onnx.ModelProto:
    """A DAG whose skips cross several cuts, with two outputs (one produced early).

    x -> conv1 -> relu(a) -> conv2(b) -> add(a) -> conv3(d) -> concat(a, x, d) -> conv4 -> y
    plus ``early = relu(a) * k`` as a second model output produced at layer 2 and a
    Constant node read by two layers.
    """
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),  # 0
        helper.make_node("Relu", ["c1"], ["a"], name="relu1"),  # 1
        helper.make_node("Constant", [], ["k"], name="k",  # 2
                         value=numpy_helper.from_array(np.array(0.5, np.float32))),
        helper.make_node("Mul", ["a", "k"], ["early"], name="early"),  # 3
        helper.make_node("Conv", ["a", "w2"], ["b"], pads=[1, 1, 1, 1], name="conv2"),  # 4
        helper.make_node("Add", ["b", "a"], ["c"], name="add"),  # 5
        helper.make_node("Conv", ["c", "w3"], ["d0"], pads=[1, 1, 1, 1], name="conv3"),  # 6
        helper.make_node("Mul", ["d0", "k"], ["d"], name="scale"),  # 7
        helper.make_node("Concat", ["a", "x", "d"], ["e"], axis=1, name="concat"),  # 8
        helper.make_node("Conv", ["e", "w4"], ["y"], name="conv4"),  # 9
    ]
    graph = helper.make_graph(
        nodes, "skip_dag",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8]),
         helper.make_tensor_value_info("early", TensorProto.FLOAT, [1, 4, 8, 8])],
        initializer=[_w("w1", (4, 3, 3, 3), 1), _w("w2", (4, 4, 3, 3), 2),
                     _w("w3", (4, 4, 3, 3), 3), _w("w4", (2, 11, 1, 1), 4)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def run_model(model: onnx.ModelProto | str | Path,
              feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run with ONNX Runtime (bytes or a path) and return outputs by name.

    Graph optimisations are off so that fusions (Conv+Relu across a cut in the full model,
    not in the stage) cannot change rounding: chained stages must then match bit for bit.
    """
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))
