"""Hand-built schema-2 bundles for the stage-graph runtime tests (no back end involved).

Small conv models are made with ``onnx.helper``; their stage and part files are cut here
by hand, and the manifest is written with the :mod:`stagebundle` dataclasses and
``dumps`` (SHA-256 by ``stagebundle.load.sha256_file``), so the runtime is tested
against the schema alone, independent of the compiler's back end.

* :func:`skip_bundle`: three stages on three devices; stage 0 sends its skip tensor ``s``
  straight to stage 2 (the middle stage never sees it) and the model output ``a`` straight
  to the destination (one tensor fanned out to two consumers).
* :func:`parts_bundle`: a conv stack whose middle (or first) stage is split by output rows
  into 2-4 parts on different devices. Part ``k``'s input is the rows its output rows need
  through every layer (the halo), with each conv's top/bottom padding adjusted at the
  borders: for output rows ``[a, b]`` a layer (kernel F, stride S, padding P) reads input
  rows ``[a*S - P, b*S - P + F - 1]``; what falls outside the tensor becomes that part's
  padding (docs/STAGE_GRAPH.md, "Row parts").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from stagebundle.load import sha256_file
from stagebundle.manifest import (
    MANIFEST,
    Bundle,
    ModelSpec,
    PartSpec,
    Piece,
    Send,
    StageSpec,
    TensorSpec,
    dumps,
)
from tests.test_runtime_fixtures import TOKEN, Built

C, W = 4, 8  # channels of every activation, width of every tensor


@dataclass(frozen=True)
class Conv:
    """A conv layer (square kernel ``k``, stride ``s`` on both axes, padding ``p``)."""

    name: str
    weight: np.ndarray
    k: int = 3
    s: int = 1
    p: int = 1
    relu: bool = True

    def out_height(self, h: int) -> int:  # (the width too: the kernel is square)
        return (h + 2 * self.p - self.k) // self.s + 1


def convs(seed: int, specs: Sequence[tuple[str, int, int, int, int, bool]]) -> list[Conv]:
    """Layers ``(name, in_channels, k, s, p, relu)`` with random weights."""
    rng = np.random.default_rng(seed)
    return [Conv(n, (rng.standard_normal((C, cin, k, k)) * 0.3).astype(np.float32), k, s, p,
                 relu) for n, cin, k, s, p, relu in specs]


def _vi(name: str, shape: Sequence[int]) -> Any:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def save_model(path: Path, nodes: list[Any], inits: list[Any],
               inputs: Sequence[tuple[str, Sequence[int]]],
               outputs: Sequence[tuple[str, Sequence[int]]]) -> Path:
    graph = helper.make_graph(nodes, path.stem, [_vi(n, s) for n, s in inputs],
                              [_vi(n, s) for n, s in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def conv_nodes(layers: Sequence[Conv], src: str, dst: str,
               pads: Sequence[tuple[int, int]] | None = None) -> tuple[list[Any], list[Any]]:
    """Nodes and weights of ``layers`` from tensor ``src`` to ``dst``; ``pads``: per layer
    (top, bottom) padding of the height axis (default: the layer's own)."""
    nodes, inits = [], []
    cur = src
    for i, layer in enumerate(layers):
        top, bottom = (layer.p, layer.p) if pads is None else pads[i]
        last = i == len(layers) - 1
        conv_out = dst if last and not layer.relu else f"{layer.name}_conv"
        inits.append(numpy_helper.from_array(layer.weight, f"{layer.name}_w"))
        nodes.append(helper.make_node("Conv", [cur, f"{layer.name}_w"], [conv_out],
                                      name=layer.name, kernel_shape=[layer.k, layer.k],
                                      strides=[layer.s, layer.s],
                                      pads=[top, layer.p, bottom, layer.p]))
        cur = conv_out
        if layer.relu:
            cur = dst if last else f"{layer.name}_relu"
            nodes.append(helper.make_node("Relu", [conv_out], [cur], name=f"{layer.name}r"))
    return nodes, inits


def part_geometry(layers: Sequence[Conv], height: int, rows: tuple[int, int]
                  ) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Input rows (halo included) that output ``rows`` of ``layers`` need, and each
    layer's (top, bottom) padding on that slice (the rule of the module doc, backwards)."""
    heights = [height]
    for layer in layers:
        heights.append(layer.out_height(heights[-1]))
    lo, hi = rows
    pads: list[tuple[int, int]] = []
    for layer, h_in in zip(reversed(layers), reversed(heights[:-1]), strict=True):
        want_lo, want_hi = lo * layer.s - layer.p, hi * layer.s - layer.p + layer.k - 1
        lo, hi = max(0, want_lo), min(h_in - 1, want_hi)
        pads.append((lo - want_lo, want_hi - hi))
    return (lo, hi), pads[::-1]


def split_rows(height: int, n: int) -> list[tuple[int, int]]:
    """``n`` row ranges of nearly equal size tiling ``[0, height - 1]``."""
    cuts = [round(i * height / n) for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1] - 1) for i in range(n)]


def t(name: str, shape: Sequence[int], source: Any = None, targets: Sequence[Any] = (),
      rows: tuple[int, int] | None = None) -> TensorSpec:
    return TensorSpec(name, tuple(shape), "float32", source, tuple(targets),
                      "direct" if source is not None else None, rows)


def sliced(shape: Sequence[int], rows: tuple[int, int]) -> tuple[int, ...]:
    return (*shape[:2], rows[1] - rows[0] + 1, *shape[3:])


def write_bundle(root: Path, model: Path, inputs: Sequence[TensorSpec],
                 outputs: Sequence[TensorSpec], stages: Sequence[StageSpec],
                 input_sends: Sequence[Send], schema: int = 2) -> Path:
    """Write ``root/manifest.json`` for stage files already in ``root``."""
    bundle = Bundle(path=root,
                    model=ModelSpec(model.stem, sha256_file(model), "node", tuple(inputs),
                                    tuple(outputs)),
                    plan={"status": "hand-built", "objective": "latency"},
                    stages=tuple(stages), input_sends=tuple(input_sends), source=None,
                    destination=None, transfer="direct" if schema == 2 else "forwarded",
                    schema_version=schema,
                    producer="tests (hand-built)")
    (root / MANIFEST).write_text(dumps(bundle.to_json()) + "\n")
    return root


def _stage(sid: int, device: str, root: Path, file: str, inputs: Sequence[TensorSpec],
           outputs: Sequence[TensorSpec], sends: Sequence[Send], last: bool = False
           ) -> StageSpec:
    return StageSpec(sid, device, None, sid, sid, file, sha256_file(root / file),
                     tuple(inputs), tuple(outputs), (), None if last else sid + 1,
                     sends=tuple(sends))


def token_file(root: Path) -> Path:
    path = root / "token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, 0o600)
    return path


# --------------------------------------------------------------------------- skip


def skip_bundle(root: Path, height: int = 8, schema: int = 2) -> Built:
    """x -> conv a -> conv b -> conv c; y = c + s, s = conv1x1(x); outputs y and a.

    Stage 0 (edge): x -> a, s; stage 1 (hub): a -> b; stage 2 (cloud): b, s -> y.
    ``schema=1``: the same stages as a schema-1 chain (no sends; each stage relays what
    later stages need: the hub forwards ``s`` and the cloud forwards ``a``).
    """
    root.mkdir(parents=True, exist_ok=True)
    la, lb, lc, ls = convs(3, [("ca", 3, 3, 1, 1, True), ("cb", C, 3, 1, 1, True),
                               ("cc", C, 3, 1, 1, False), ("cs", 3, 1, 1, 0, False)])
    full = (1, C, height, W)
    xin = (1, 3, height, W)
    n_a, i_a = conv_nodes([la], "x", "a")
    n_s, i_s = conv_nodes([ls], "x", "s")
    n_b, i_b = conv_nodes([lb], "a", "b")
    n_c, i_c = conv_nodes([lc], "b", "c")
    add = helper.make_node("Add", ["c", "s"], ["y"], name="skip_add")
    model = save_model(root / "skip.onnx", n_a + n_s + n_b + n_c + [add],
                       i_a + i_s + i_b + i_c, [("x", xin)], [("y", full), ("a", full)])
    bundle = root / "bundle"
    bundle.mkdir()
    save_model(bundle / "stage0_edge.onnx", n_a + n_s, i_a + i_s, [("x", xin)],
               [("a", full), ("s", full)])
    save_model(bundle / "stage1_hub.onnx", n_b, i_b, [("a", full)], [("b", full)])
    save_model(bundle / "stage2_cloud.onnx", n_c + [add], i_c, [("b", full), ("s", full)],
               [("y", full)])
    stages = [
        _stage(0, "edge", bundle, "stage0_edge.onnx", [t("x", xin, "input")],
               [t("a", full, None, [1, "output"]), t("s", full, None, [2])],
               [Send("1", (Piece("a"),)), Send("2", (Piece("s"),)),
                Send("output", (Piece("a"),))]),
        _stage(1, "hub", bundle, "stage1_hub.onnx", [t("a", full, 0)],
               [t("b", full, None, [2])], [Send("2", (Piece("b"),))]),
        _stage(2, "cloud", bundle, "stage2_cloud.onnx", [t("b", full, 1), t("s", full, 0)],
               [t("y", full, None, ["output"])], [Send("output", (Piece("y"),))], last=True),
    ]
    if schema == 1:
        relay = {1: (t("s", full, 0, [2]),), 2: (t("a", full, 0, ["output"]),)}
        stages = [replace(s, sends=(), forward=relay.get(s.id, ())) for s in stages]
    write_bundle(bundle, model, [t("x", xin)], [t("y", full), t("a", full)], stages,
                 [Send("0", (Piece("x"),))] if schema == 2 else [], schema)
    return Built(model, root / "no-system.toml", bundle, token_file(root))


# --------------------------------------------------------------------------- parts


def parts_bundle(root: Path, n: int, where: str, height: int = 13,
                 devices: Sequence[str] | None = None, bundle: Path | None = None) -> Built:
    """A conv stack with one stage split into ``n`` row parts on devices d0..d{n-1}.

    ``devices``: the part devices (default d0..d{n-1}); ``bundle``: where to write it
    (default ``root/bundle``; a fallback goes under ``BUNDLE/fallback/<name>``).

    ``where="middle"``: stage 0 (d0, whole) x -> a; stage 1 split: a -> b (3x3 stride 2,
    then 5x5); stage 2 (d{n-1}, whole) b -> y (1x1): rows scattered by a worker, gathered
    by a worker. ``where="edges"``: stage 0 split: x -> b (all three convs); the executor
    scatters the rows of x and gathers the rows of b. d0 also runs part 0 (a mix of whole
    stages and parts on one worker, handed over in-process).
    """
    root.mkdir(parents=True, exist_ok=True)
    head, s2, c5, tail = convs(11, [("c1", 3, 3, 1, 1, True), ("c2", C, 3, 2, 1, True),
                                        ("c5", C, 5, 1, 2, False), ("c6", C, 1, 1, 0, False)])
    devices = list(devices or [f"d{i}" for i in range(n)])
    assert len(devices) == n
    split = [s2, c5] if where == "middle" else [head, s2, c5]
    h_a, w_a = head.out_height(height), head.out_height(W)
    h_b, w_b = c5.out_height(s2.out_height(h_a)), c5.out_height(s2.out_height(w_a))
    xin, a_full, b_full = (1, 3, height, W), (1, C, h_a, w_a), (1, C, h_b, w_b)
    layers = [head, s2, c5] + ([tail] if where == "middle" else [])
    nodes, inits = conv_nodes(layers, "x", "y" if where == "middle" else "b")
    out_name = "y" if where == "middle" else "b"
    model = save_model(root / f"stack_{where}_{n}.onnx", nodes, inits, [("x", xin)],
                       [(out_name, b_full)])
    bundle = bundle or root / "bundle"
    bundle.mkdir(parents=True)
    src, src_full, src_id = ("a", a_full, 0) if where == "middle" else ("x", xin, "input")
    sid = 1 if where == "middle" else 0
    dest = "2" if where == "middle" else "output"
    parts, feeds = [], []
    for k, rows in enumerate(split_rows(h_b, n)):
        in_rows, pads = part_geometry(split, src_full[2], rows)
        file = f"stage{sid}_part{k}_{devices[k]}.onnx"
        p_nodes, p_inits = conv_nodes(split, src, "b", pads)
        save_model(bundle / file, p_nodes, p_inits, [(src, sliced(src_full, in_rows))],
                   [("b", sliced(b_full, rows))])
        parts.append(PartSpec(k, devices[k], None, rows, file, sha256_file(bundle / file),
                              (t(src, sliced(src_full, in_rows), src_id, rows=in_rows),),
                              (t("b", sliced(b_full, rows), None,
                                 [2 if where == "middle" else "output"], rows),),
                              (Send(dest, (Piece("b", rows),)),)))
        feeds.append(Send(f"{sid}.{k}", (Piece(src, in_rows),)))
    split_stage = StageSpec(sid, None, None, sid, sid, None, None,
                            (t(src, src_full, src_id),),
                            (t("b", b_full, None, [2 if where == "middle" else "output"]),),
                            (), None if where == "edges" else sid + 1, parts=tuple(parts))
    if where == "edges":
        write_bundle(bundle, model, [t("x", xin)], [t("b", b_full)], [split_stage], feeds)
    else:
        n0, i0 = conv_nodes([head], "x", "a")
        first = devices[0]
        save_model(bundle / f"stage0_{first}.onnx", n0, i0, [("x", xin)], [("a", a_full)])
        n2, i2 = conv_nodes([tail], "b", "y")
        last = devices[-1]
        save_model(bundle / f"stage2_{last}.onnx", n2, i2, [("b", b_full)], [("y", b_full)])
        stages = [
            _stage(0, first, bundle, f"stage0_{first}.onnx", [t("x", xin, "input")],
                   [t("a", a_full, None, [1])], feeds),
            split_stage,
            _stage(2, last, bundle, f"stage2_{last}.onnx", [t("b", b_full, 1)],
                   [t("y", b_full, None, ["output"])], [Send("output", (Piece("y"),))],
                   last=True),
        ]
        write_bundle(bundle, model, [t("x", xin)], [t("y", b_full)], stages,
                     [Send("0", (Piece("x"),))])
    return Built(model, root / "no-system.toml", bundle, token_file(root))


def reference(model: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of the whole model, run by one ONNX Runtime session."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))
