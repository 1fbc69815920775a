"""Row parts of a split stage: one ONNX submodel per part (DISTREDGE).

A stage with ``parts`` is computed by several devices at once, each producing a band of
rows (height axis) of the stage's last 4-D output. A part's file reads only the input
rows its band needs, halo included, under the model's tensor names; every Conv / pool
gets the padding of its band (the rows clipped at a border of the full tensor become
padding, see :mod:`partitioner.frontend.rows`), so the bands put side by side are the
whole stage's output, bit for bit. The receiver concatenates the bands along the height
(``stagebundle.graph.assemble``); the sender cuts each part's input rows
(``stagebundle.graph.take_rows``).

Rows are propagated backwards over the stage's node DAG, not only along a chain: a tensor
read by two nodes (a residual) is computed over the union of what they need, and a node
that needs fewer rows of it reads them through a ``Slice``. Other stage outputs than the
last (a skip tensor a later stage reads) are cut into consecutive bands too, at the same
relative heights as the last output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from partitioner import ir
from partitioner.errors import fail
from partitioner.frontend.rows import (
    constant_names,
    layer_geometry,
    node_row_op,
    op_input_rows,
    shape_map,
    spatial_pads,
)
from partitioner.frontend.slicing import SubModel, extract_layers, value_info
from partitioner.ir import TensorInfo

__all__ = ["PartModel", "build_parts", "check_splittable", "check_part_rows"]

HEIGHT = 2
Rows = tuple[int, int]
Need = Rows | None  # None: the whole tensor (an operand that broadcasts over the rows)


@dataclass(frozen=True)
class PartModel:
    """Part ``index`` of a split stage.

    ``inputs`` / ``outputs`` pair the FULL tensor of each ONNX input / output with the rows
    of it the part reads / produces (None: the whole tensor); the part's file has the
    sliced shapes under the same names.
    """

    index: int
    device: str
    frequency: str | None
    rows: tuple[int, int]
    model: SubModel
    inputs: tuple[tuple[TensorInfo, tuple[int, int] | None], ...]
    outputs: tuple[tuple[TensorInfo, tuple[int, int] | None], ...]


def check_splittable(prepared: Any, first: int, last: int) -> None:
    """Refuse a layer range that cannot be split by rows, naming the first layer and why."""
    model, graph = prepared.model, prepared.graph
    shapes, const = shape_map(model), constant_names(model)
    for k in range(first, last + 1):
        layer = graph.layers[k]
        geo = layer_geometry(model, layer, shapes, const)
        if isinstance(geo, str):
            fail(f"layers {first}..{last}: layer {k} ({layer.name}) cannot be split by "
                 f"rows: {geo}")


def check_part_rows(parts: Sequence[ir.Part], height: int, what: str) -> None:
    """Parts must tile rows ``0..height-1`` exactly once, in order, each non-empty."""
    expect = 0
    for i, p in enumerate(parts):
        a, b = p.rows
        if a != expect or b < a:
            fail(f"{what}: part {i} ({p.device}) has rows {a}..{b}; expected rows starting at "
                 f"{expect}, in order and non-empty")
        expect = b + 1
    if expect != height:
        fail(f"{what}: the parts cover rows 0..{expect - 1} of an output with {height} rows")


def _hull(a: Need, b: Need) -> Need:
    if a is None or b is None:
        return None
    return (min(a[0], b[0]), max(a[1], b[1]))


@dataclass(frozen=True)
class _Node:
    index: int
    op: ir.RowOp
    data: tuple[str, ...]


class _Stage:
    """The stage's data nodes with their row geometry, for backward row propagation."""

    def __init__(self, sub: SubModel, what: str) -> None:
        self.sub = sub
        self.model = sub.shell  # the weights stay shared with the source model
        self.shapes = shape_map(sub.shell, sub.weights)
        for t in (*sub.inputs, *sub.outputs):
            self.shapes[t.name] = tuple(t.shape)
        self.const = constant_names(sub.shell, sub.weights)
        self.nodes: list[_Node] = []
        for i, node in enumerate(sub.shell.graph.node):
            if all(n in self.const for n in node.input if n):
                continue  # Constant nodes and weight-only nodes are copied unchanged
            row = node_row_op(node, self.shapes, self.const)
            if isinstance(row, str):
                fail(f"{what}: node {node.name or node.op_type!r} cannot be split by rows: {row}")
            data = tuple(n for n in node.input if n and n not in self.const)
            self.nodes.append(_Node(i, row, data))

    def height(self, name: str) -> int:
        return self.shapes[name][HEIGHT]

    def propagate(self, wanted: Mapping[str, Rows], what: str
                  ) -> tuple[dict[str, Need], dict[tuple[int, str], Need],
                             dict[int, tuple[int, int]]]:
        """Backwards from ``wanted`` output rows: the rows every tensor is computed over,
        the rows each node reads of each input, and each Conv / pool's band padding."""
        need: dict[str, Need] = dict(wanted)
        reads: dict[tuple[int, str], Need] = {}
        pads: dict[int, tuple[int, int]] = {}
        graph_nodes = self.model.graph.node
        for n in reversed(self.nodes):
            outs = [o for o in graph_nodes[n.index].output if o in need]
            if not outs:
                continue  # nothing this part computes needs it
            band: Need = need[outs[0]]
            for o in outs[1:]:
                band = _hull(band, need[o])
            for o in graph_nodes[n.index].output:
                if o:
                    need[o] = band
            if band is None:
                fail(f"{what}: a broadcast operand feeds a row-local op")
            if n.op.kernel == 1 and n.op.stride == 1 and not (n.op.pad_top or n.op.pad_bottom):
                ins = {x: (band if self.height(x) == n.op.out_height else None) for x in n.data}
            else:
                lo, hi, top, bottom = op_input_rows(n.op, *band)
                if hi < lo:
                    fail(f"{what}: rows {band[0]}..{band[1]} of node "
                         f"{graph_nodes[n.index].name!r} read only padding")
                pads[n.index] = (top, bottom)
                ins = {n.data[0]: (lo, hi)}
            for x, rows in ins.items():
                reads[(n.index, x)] = rows
                need[x] = rows if x not in need else _hull(need[x], rows)
        return need, reads, pads


def _assign_bands(stage: _Stage, main: str, parts: Sequence[ir.Part], others: Sequence[str],
                  what: str) -> list[dict[str, Rows]]:
    """Output rows of every stage output per part: the main output's rows as planned; the
    others cut at the same relative heights (each part computes its band of them on top
    of the rows its main band needs, which are usually those rows already)."""
    height = stage.height(main)
    bands: list[dict[str, Rows]] = [{main: p.rows} for p in parts]
    for o in others:
        h = stage.height(o)
        firsts = [p.rows[0] * h // height for p in parts]
        for i in range(len(parts)):
            end = firsts[i + 1] - 1 if i + 1 < len(parts) else h - 1
            if end < firsts[i]:
                fail(f"{what}: output {o!r} ({h} rows) cannot be cut into {len(parts)} bands "
                     f"like the last output (parts {i} and {i + 1} would start at row "
                     f"{firsts[i]})")
            bands[i][o] = (firsts[i], end)
    return bands


def _slice_node(src: str, dst: str, start: int, stop: int, opset: int,
                inits: list[onnx.TensorProto]) -> onnx.NodeProto:
    if opset < 10:
        return helper.make_node("Slice", [src], [dst], axes=[HEIGHT], starts=[start],
                                ends=[stop], name=f"{dst}.slice")
    names = [f"{dst}.{k}" for k in ("starts", "ends", "axes")]
    for name, value in zip(names, (start, stop, HEIGHT), strict=True):
        inits.append(numpy_helper.from_array(np.array([value], np.int64), name))
    return helper.make_node("Slice", [src, *names], [dst], name=f"{dst}.slice")


def _with_pads(node: onnx.NodeProto, in_shape: Sequence[int], shapes: Mapping[str, Any],
               top: int, bottom: int) -> onnx.NodeProto:
    """A copy of a Conv / pool with explicit pads: the band's top/bottom, the width kept."""
    geo = spatial_pads(node, in_shape, shapes)
    assert not isinstance(geo, str)  # checked when the stage was analysed
    pads = list(geo[3])
    n = len(pads) // 2
    pads[0], pads[n] = top, bottom
    out = onnx.NodeProto()
    out.CopyFrom(node)
    del out.attribute[:]
    out.attribute.extend(a for a in node.attribute if a.name not in ("pads", "auto_pad"))
    out.attribute.append(helper.make_attribute("pads", pads))
    return out


def _sliced(t: TensorInfo, rows: Need) -> TensorInfo:
    if rows is None:
        return t
    shape = list(t.shape)
    shape[HEIGHT] = rows[1] - rows[0] + 1
    per_row = t.nbytes // t.shape[HEIGHT] if t.shape[HEIGHT] else 0
    return TensorInfo(t.name, tuple(shape), t.dtype, per_row * shape[HEIGHT])


def _part_model(stage: _Stage, bands: dict[str, Rows], tag: str, what: str
                ) -> tuple[onnx.ModelProto, list[tuple[TensorInfo, Need]],
                           list[tuple[TensorInfo, Need]]]:
    sub, model = stage.sub, stage.model
    need, reads, pads = stage.propagate(bands, what)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    extra_inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    computed = {n.index for n in stage.nodes if any(o in need for o in
                                                    model.graph.node[n.index].output)}
    data_nodes = {n.index for n in stage.nodes}
    # A stage output also read inside the stage over more rows than its band is computed
    # under another name and cut to its band at the end.
    renamed = {o: f"{o}.{tag}" for o, rows in bands.items() if need[o] != rows}
    sliced: dict[tuple[str, Rows], str] = {}

    def read(name: str, rows: Need) -> str:
        have = need.get(name)
        src = renamed.get(name, name)
        if rows is None or have is None or rows == have:
            return src
        key = (name, rows)
        if key not in sliced:
            sliced[key] = f"{name}.{tag}.rows{rows[0]}_{rows[1]}"
            nodes.append(_slice_node(src, sliced[key], rows[0] - have[0],
                                     rows[1] - have[0] + 1, opset, extra_inits))
        return sliced[key]

    for i, node in enumerate(model.graph.node):
        if i in data_nodes and i not in computed:
            continue
        if i not in data_nodes:
            nodes.append(node)
            continue
        ins = [read(x, reads.get((i, x))) if (i, x) in reads else renamed.get(x, x)
               for x in node.input]
        new = _with_pads(node, stage.shapes[node.input[0]], stage.shapes, *pads[i]) \
            if i in pads else onnx.NodeProto()
        if i not in pads:
            new.CopyFrom(node)
        del new.input[:]
        new.input.extend(ins)
        del new.output[:]
        new.output.extend(renamed.get(o, o) for o in node.output)
        nodes.append(new)
    for o, rows in bands.items():
        if o in renamed:
            have = need[o]
            assert have is not None
            nodes.append(_slice_node(renamed[o], o, rows[0] - have[0], rows[1] - have[0] + 1,
                                     opset, extra_inits))
    inputs = [(t, need[t.name]) for t in sub.inputs if t.name in need]
    outputs: list[tuple[TensorInfo, Need]] = [(t, bands[t.name]) for t in sub.outputs]
    graph = helper.make_graph(
        nodes, f"{model.graph.name}_{tag}",
        [value_info(_sliced(t, r)) for t, r in inputs],
        [value_info(_sliced(t, r)) for t, r in outputs],
        initializer=[*model.graph.initializer, *extra_inits])  # the shell's: small
    part = helper.make_model(graph, opset_imports=list(model.opset_import),
                             ir_version=model.ir_version, producer_name=model.producer_name,
                             producer_version=model.producer_version,
                             functions=list(model.functions))
    return part, inputs, outputs


def build_parts(prepared: Any, stage: ir.Stage) -> list[PartModel]:
    """One :class:`PartModel` per entry of ``stage.parts``, in order.

    Raises:
        UserError: the stage has no parts, a layer of it cannot be split by rows, an output
            is not 4-D, or the parts' rows do not tile the last output exactly once.
    """
    what = f"stage {stage.id} (layers {stage.first}..{stage.last})"
    if not stage.parts:
        fail(f"{what}: has no parts to build")
    check_splittable(prepared, stage.first, stage.last)
    sub = extract_layers(prepared, stage.first, stage.last)
    for t in sub.outputs:
        if len(t.shape) != 4:
            fail(f"{what}: output {t.name!r} is {len(t.shape)}-D; row parts split 4-D (NCHW) "
                 f"outputs only")
    for t in sub.inputs:
        if len(t.shape) != 4:
            fail(f"{what}: input {t.name!r} is {len(t.shape)}-D; row parts read 4-D (NCHW) "
                 f"inputs only")
    main = sub.outputs[-1]
    check_part_rows(stage.parts, main.shape[HEIGHT], what)
    analysed = _Stage(sub, what)
    others = [t.name for t in sub.outputs[:-1]]
    bands = _assign_bands(analysed, main.name, stage.parts, others, what)
    result = []
    for k, (p, band) in enumerate(zip(stage.parts, bands, strict=True)):
        model, inputs, outputs = _part_model(analysed, band, f"part{k}", f"{what} part {k}")
        part_sub = SubModel(model, tuple(_sliced(t, r) for t, r in inputs),
                            tuple(_sliced(t, r) for t, r in outputs), stage.first, stage.last,
                            sub.base_dir, sub.weights)
        result.append(PartModel(k, p.device, p.frequency, p.rows, part_sub,
                                tuple(inputs), tuple(outputs)))
    return result
