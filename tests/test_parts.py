"""Row parts of a stage reproduce the whole stage under ONNX Runtime (DISTREDGE mechanism).

Each part file is run on the rows of the real input the part declares (cut with
``stagebundle.graph.take_rows``, as a sender does); the parts' outputs are put back
together along the height with ``stagebundle.graph.assemble`` (as a receiver does) and
compared with the whole stage, with graph optimisations off.

Tolerance: ``max|parts - whole| <= 1e-6 * max(1, max|whole|)`` (:data:`RELATIVE`). Most
splits are bit-identical (each part runs the same kernel over the same rows with the same
padding), but ONNX Runtime's MLAS picks its convolution algorithm from the shape, so a
7x7 convolution over a 10-row band sums in another order than over the whole map:
measured up to 3.8e-7 of the scale on ``stack_a`` (float32 re-association, not a wrong
row).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from partitioner.backend.parts import PartModel, build_parts
from partitioner.errors import UserError
from partitioner.frontend.rows import input_rows, layer_rows
from partitioner.frontend.slicing import extract_layers
from partitioner.ir import Part, Stage
from stagebundle.graph import assemble, take_rows
from stagebundle.manifest import TensorSpec
from tests.test_slicing_fixtures import prepare, run_model

_rng = np.random.default_rng(0)
RELATIVE = 1e-6


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    if got.shape != want.shape:
        return False
    scale = max(1.0, float(np.max(np.abs(want))))
    return float(np.max(np.abs(got.astype(np.float64) - want))) <= RELATIVE * scale


def _w(name: str, shape: tuple[int, ...]) -> TensorProto:
    return numpy_helper.from_array((_rng.standard_normal(shape) * 0.3).astype(np.float32), name)


class _Stack:
    """A chain of ops on one 4-D tensor, each op one layer."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.c, self.h, self.w = channels, height, width
        self.x = "x"
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                   [1, channels, height, width])

    def _add(self, op: str, ins: list[str], **attrs: object) -> str:
        out = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, ins, [out], name=f"{op.lower()}{len(self.nodes)}",
                                           **attrs))
        self.x = out
        return out

    def conv(self, out_c: int, k: int, **attrs: object) -> str:
        w = f"w{len(self.nodes)}"
        self.inits.append(_w(w, (out_c, self.c, k, k)))
        self.inits.append(_w(w + "b", (out_c,)))
        self.c = out_c
        return self._add("Conv", [self.x, w, w + "b"], kernel_shape=[k, k], **attrs)

    def op(self, op: str, *extra: str, **attrs: object) -> str:
        return self._add(op, [self.x, *extra], **attrs)

    def bn(self) -> str:
        n = f"bn{len(self.nodes)}"
        c = self.c
        self.inits += [numpy_helper.from_array(v.astype(np.float32), f"{n}.{k}") for k, v in (
            ("scale", _rng.uniform(0.5, 1.5, c)), ("bias", _rng.standard_normal(c)),
            ("mean", _rng.standard_normal(c)), ("var", _rng.uniform(0.5, 2, c)))]
        return self.op("BatchNormalization", *(f"{n}.{k}" for k in ("scale", "bias", "mean",
                                                                      "var")))

    def model(self, outputs: list[str] | None = None) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                for o in (outputs or [self.x])]
        graph = helper.make_graph(self.nodes, "stack", [self.input], outs,
                                  initializer=self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        # outputs with static shapes, as the front end leaves them
        known = {vi.name: vi for vi in (*m.graph.value_info, *m.graph.output)}
        del m.graph.output[:]
        m.graph.output.extend(known[o] for o in (outputs or [self.x]))
        return m


def stack_a() -> onnx.ModelProto:
    """Kernels 3/5/3(pool)/7/1, strides 1/2/2/1/1, odd height and width."""
    s = _Stack(3, 37, 29)
    s.conv(4, 3, pads=[1, 1, 1, 1])
    s.op("Relu")
    s.conv(6, 5, strides=[2, 2], pads=[2, 2, 2, 2])
    s.op("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    s.conv(5, 7, pads=[3, 3, 3, 3])
    s.conv(3, 1)
    return s.model()


def stack_b() -> onnx.ModelProto:
    """Dilation 2, asymmetric padding, BN + Relu, AveragePool with padding, no padding."""
    s = _Stack(2, 95, 20)
    s.conv(4, 3, dilations=[2, 2], pads=[2, 1, 1, 0])
    s.bn()
    s.op("Relu")
    s.op("AveragePool", kernel_shape=[2, 2], strides=[2, 2], pads=[1, 0, 0, 1],
         count_include_pad=1)
    s.conv(4, 3, strides=[2, 2], pads=[0, 1, 1, 1])
    s.conv(3, 5, auto_pad="SAME_UPPER", strides=[2, 1])
    s.op("LeakyRelu", alpha=0.1)
    s.conv(2, 3)  # no padding: the last rows of the input are never read by some parts
    return s.model()


def residual() -> tuple[onnx.ModelProto, list[list[int]]]:
    """conv-relu (a) -> conv (b) -> add(a, b) -> relu -> conv (y), and ``a`` also leaves
    the stage: a later layer reads it (a second stage output cut into bands)."""
    s = _Stack(3, 23, 17)
    s.conv(4, 3, pads=[1, 1, 1, 1])
    a = s.op("Relu")
    b = s.conv(4, 5, pads=[2, 2, 2, 2])
    s._add("Add", [a, b])
    s.op("Relu")
    y = s.conv(4, 3, strides=[2, 2], pads=[1, 1, 1, 1])
    s.x = a
    s.op("MaxPool", kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1])
    z = s._add("Add", [s.x, y])
    groups = [[0, 1], [2, 3, 4], [5], [6, 7]]
    m = s.model([z])
    return m, groups


def _run_parts(parts: list[PartModel], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scatter the rows each part reads, run the parts, gather their rows."""
    pieces: dict[str, list[tuple[tuple[int, int] | None, np.ndarray]]] = {}
    full: dict[str, TensorSpec] = {}
    for part in parts:
        ins = {t.name: take_rows(feeds[t.name], None, rows, f"part {part.index}")
               for t, rows in part.inputs}
        got = run_model(part.model.model, ins)
        for t, rows in part.outputs:
            assert got[t.name].shape[2] == rows[1] - rows[0] + 1  # type: ignore[index]
            pieces.setdefault(t.name, []).append((rows, got[t.name]))
            full[t.name] = TensorSpec(t.name, t.shape, t.dtype)
    return {name: assemble(full[name], ps, "gather") for name, ps in pieces.items()}


def _check(model: onnx.ModelProto, first: int, last: int, splits: list[tuple[int, int]],
           groups: list[list[int]] | None = None, tmp: Path | None = None) -> list[PartModel]:
    prepared = prepare(model, groups)
    stage = Stage(None, None, first, last, id=0,
                  parts=tuple(Part(f"d{i}", None, r) for i, r in enumerate(splits)))
    parts = build_parts(prepared, stage)
    assert [p.rows for p in parts] == splits
    whole = extract_layers(prepared, first, last)
    rng = np.random.default_rng(1)
    feeds = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in whole.inputs}
    expected = run_model(whole.model, feeds)
    if tmp is not None:  # the saved files run too
        for p in parts:
            p.model.save(tmp / f"part{p.index}.onnx")
            onnx.checker.check_model(str(tmp / f"part{p.index}.onnx"))
    got = _run_parts(parts, feeds)
    assert set(got) == set(expected)
    for name in expected:
        assert _same(got[name], expected[name]), name
    return parts


def _height(model: onnx.ModelProto) -> int:
    return int(model.graph.output[-1].type.tensor_type.shape.dim[2].dim_value)


def _even(height: int, n: int) -> list[tuple[int, int]]:
    cuts = np.linspace(0, height, n + 1).astype(int)
    return [(int(a), int(b) - 1) for a, b in zip(cuts, cuts[1:], strict=False)]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("build", [stack_a, stack_b])
def test_even_parts_reproduce_the_stack_exactly(build, n, tmp_path):
    model = build()
    _check(model, 0, len(model.graph.node) - 1, _even(_height(model), n), tmp=tmp_path)


@pytest.mark.parametrize("build", [stack_a, stack_b])
def test_uneven_and_one_row_parts(build):
    model = build()
    h = _height(model)
    last = len(model.graph.node) - 1
    _check(model, 0, last, [(0, 0), (1, h - 1)])
    _check(model, 0, last, [(0, h - 2), (h - 1, h - 1)])
    _check(model, 0, last, [(0, 0), (1, 1), (2, h - 3), (h - 2, h - 1)])


def test_a_middle_stage_reads_only_its_halo():
    model = stack_a()
    # layers 2..4: conv5/s2 -> maxpool3/s2 -> conv7; input t1 is 37 rows high
    parts = _check(model, 2, 4, [(0, 2), (3, 5), (6, 9)])
    rows = [dict((t.name, r) for t, r in p.inputs)["t1"] for p in parts]
    # part 0: conv7 needs pool rows 0..5 (pad 3), pool needs conv rows 0..11, conv5 rows 0..24
    assert rows[0] == (0, 24)
    assert rows[1] == (0, 36)  # the 7x7 halo over a 10-row map: every input row
    assert rows[2] == (8, 36)  # conv7 rows 6..9 <- pool 3..9 <- conv5 5..18 <- t1 8..36
    # the front end's row geometry of the same layers says the same
    prepared = prepare(model)
    ops = [op for k in (2, 3, 4) for op in (layer_rows(prepared.model, prepared.graph)[k] or ())]
    assert [input_rows(ops, a, b)[:2] for a, b in [(0, 2), (3, 5), (6, 9)]] == rows


def test_residual_with_a_second_output_in_bands():
    model, groups = residual()
    prepared = prepare(model, groups)
    h = extract_layers(prepared, 0, 2).outputs[-1].shape[2]
    for splits in ([(0, 5), (6, h - 1)], [(0, 0), (1, 3), (4, 8), (9, h - 1)]):
        parts = _check(model, 0, 2, splits, groups)
        # the other output (``a``) is cut into consecutive bands that tile it
        bands = [dict((t.name, r) for t, r in p.outputs)["t1"] for p in parts]
        assert bands[0][0] == 0 and bands[-1][1] == 22
        assert all(a[1] + 1 == b[0] for a, b in zip(bands, bands[1:], strict=False))


def test_bad_rows_are_refused():
    model = stack_a()
    prepared = prepare(model)
    h = _height(model)
    for splits in ([(0, 3)], [(0, 3), (5, h - 1)], [(0, 4), (4, h - 1)],
                   [(1, h - 1)], [(0, h)], [(0, 3), (4, 3), (4, h - 1)]):
        stage = Stage(None, None, 0, 5, parts=tuple(Part("d", None, r) for r in splits))
        with pytest.raises(UserError, match="rows"):
            build_parts(prepared, stage)


def _flatten_model() -> onnx.ModelProto:
    s = _Stack(2, 8, 8)
    s.conv(2, 3, pads=[1, 1, 1, 1])
    s.op("Flatten")
    return s.model()


def test_a_layer_that_cannot_be_split_is_named():
    prepared = prepare(_flatten_model())
    stage = Stage(None, None, 0, 1, parts=(Part("a", None, (0, 0)), Part("b", None, (1, 1))))
    with pytest.raises(UserError, match=r"layer 1 \(layer1\) cannot be split by rows: .*Flatten"):
        build_parts(prepared, stage)


def test_ceil_mode_pool_is_split_only_when_it_adds_no_row():
    for height, ok in ((9, True), (10, False)):  # k3 s2: (9-3)%2 == 0, (10-3)%2 != 0
        s = _Stack(2, height, 6)
        s.op("MaxPool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)
        model = s.model()
        h = _height(model)
        if ok:
            _check(model, 0, 0, [(0, 1), (2, h - 1)])
        else:
            stage = Stage(None, None, 0, 0, parts=(Part("a", None, (0, 1)),
                                                   Part("b", None, (2, h - 1))))
            with pytest.raises(UserError, match="ceil_mode"):
                build_parts(prepare(model), stage)


def test_a_stage_whose_output_is_not_4d_is_refused():
    s = _Stack(2, 8, 8)
    s.conv(2, 3, pads=[1, 1, 1, 1])
    s.op("Relu")
    model = s.model()
    model.graph.node.append(helper.make_node("ReduceMean", ["t1"], ["r"], axes=[2, 3],
                                             keepdims=0))
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 2])])
    stage = Stage(None, None, 0, 2, parts=(Part("a", None, (0, 0)),))
    with pytest.raises(UserError, match="cannot be split|4-D"):
        build_parts(prepare(model), stage)


@pytest.mark.parametrize("name,size,last", [("resnet18", 64, 0), ("resnet18", 64, 4),
                                            ("alexnet", 224, 2)])
def test_zoo_stages_reproduce_exactly(name, size, last):
    """resnet18 conv1 + maxpool (7x7/2, 3x3/2), then its first residual blocks; alexnet's
    11x11/4, 5x5 and max pools."""
    import models
    from partitioner.frontend import load_model

    prepared = load_model(models.build_model(name, image_size=size))
    assert all(prepared.graph.layers[k].rows for k in range(last + 1))
    sub = extract_layers(prepared, 0, last)
    h = sub.outputs[-1].shape[2]
    stage = Stage(None, None, 0, last, parts=tuple(
        Part(f"d{i}", None, r) for i, r in enumerate(_even(h, 3))))
    parts = build_parts(prepared, stage)
    rng = np.random.default_rng(2)
    feeds = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in sub.inputs}
    expected = run_model(sub.model, feeds)
    got = _run_parts(parts, feeds)
    for key, value in expected.items():
        assert _same(got[key], value), key
