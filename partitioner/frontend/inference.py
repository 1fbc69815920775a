"""Shape inference on a skeleton of the model (no weight is read), with the fall-backs
real models need: ONNX Runtime's symbolic inference for its contrib ops, and the shapes of
``Loop`` outputs that ONNX inference leaves open (:func:`loop_output_types`).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto

from partitioner.errors import fail
from partitioner.frontend.inputs import model_inputs
from partitioner.frontend.subgraphs import loop_output_types
from partitioner.frontend.tensors import graph_attrs, is_external, static_shape, tensor_nbytes

__all__ = ["infer_types"]

# Initialisers up to this size are kept in the inference skeleton (shape inference needs
# the *values* of Reshape targets, axes, pads...); larger ones become typed inputs.
_SKELETON_MAX_BYTES = 64 << 10


def _initializer_bytes(tensor: TensorProto) -> int:
    # From dims and dtype: ByteSize() on a large in-memory tensor costs ~1 s per 100 MB.
    if is_external(tensor):
        return 1 << 62
    return tensor_nbytes(tuple(tensor.dims), tensor.data_type)


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without large initialisers (they become inputs of the same type and shape)."""
    graph = model.graph
    g = onnx.GraphProto(name=graph.name)
    g.node.extend(graph.node)
    g.input.extend(model_inputs(graph))
    inputs = {v.name for v in g.input}
    for tensor in graph.initializer:
        if _initializer_bytes(tensor) <= _SKELETON_MAX_BYTES:
            g.initializer.append(tensor)
        elif tensor.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    g.sparse_initializer.extend(graph.sparse_initializer)
    for out in graph.output:
        # Outputs keep only their element type: stale symbolic dims must not survive.
        vi = g.output.add()
        vi.name = out.name
        if out.type.WhichOneof("value") == "tensor_type":
            vi.type.tensor_type.elem_type = out.type.tensor_type.elem_type
        else:
            vi.type.CopyFrom(out.type)
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.graph.CopyFrom(g)
    return skeleton


def _onnx_infer(skeleton: onnx.ModelProto, label: str) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(skeleton, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError:
        # Strict mode stops at the first op it cannot handle (e.g. a custom domain);
        # the lenient pass infers the rest and the caller names what stayed unknown.
        try:
            return onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
        except Exception as err:  # noqa: BLE001 - any failure here is the model's fault
            fail(f"{label}: ONNX shape inference failed: {str(err).splitlines()[0]}")


def infer_types(model: onnx.ModelProto, label: str) -> tuple[dict[str, onnx.TypeProto],
                                                         dict[str, onnx.NodeProto]]:
    """Types of every tensor ONNX shape inference can determine, by name, and the inferred
    copies of the control-flow nodes (their sub-graphs carry the inside shapes), by their
    first output."""
    skeleton = _skeleton(model)
    inferred = _onnx_infer(skeleton, label)
    hints = loop_output_types(inferred.graph)
    if hints:
        # ONNX leaves loop outputs without a shape; given as hints, they reach consumers.
        for out in skeleton.graph.output:
            if out.name in hints:
                out.type.CopyFrom(hints.pop(out.name))
        skeleton.graph.value_info.extend(
            onnx.helper.make_value_info(name, t) for name, t in hints.items())
        inferred = _onnx_infer(skeleton, label)
    types: dict[str, onnx.TypeProto] = {
        t.name: onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
        for t in model.graph.initializer}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        types[vi.name] = vi.type
    control = {n.output[0]: n for n in g.node if n.output and any(graph_attrs(n))}
    if any(o and (o not in types or static_shape(types[o]) is None)
           for node in skeleton.graph.node for o in node.output):
        # ONNX inference does not know ONNX Runtime's contrib ops (com.microsoft FusedConv,
        # Attention, ...); ORT's symbolic inference does. Only fill what is still unknown.
        for name, t in _symbolic_types(skeleton).items():
            if name not in types or static_shape(types[name]) is None:
                types[name] = t
    return types, control


def _symbolic_types(skeleton: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Static types from onnxruntime's symbolic shape inference ({} if it cannot run)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return {}
    # Its public ``infer_shapes`` saves "sym_shape_infer_temp.onnx" into the working
    # directory when inference is incomplete and then raises; run its steps ourselves so
    # nothing is written and the partial result is kept.
    try:
        engine = SymbolicShapeInference(2**31 - 1, True, False, 0)
        engine._preprocess(skeleton)
        while engine.run_:
            engine._infer_impl()
        engine._update_output_from_vi()
        inferred = engine.out_mp_
    except Exception:  # noqa: BLE001 - best effort; the caller names what stays unknown
        return {}
    g = inferred.graph
    return {vi.name: vi.type for vi in list(g.value_info) + list(g.output)
            if static_shape(vi.type) is not None}
