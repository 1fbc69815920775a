"""The model zoo: valid ONNX, runnable in ONNX Runtime, torchvision-exact parameter counts.

Every model is built once per test (the large classifiers cost seconds and hundreds of MB,
so each is checked, counted and run inside a single test and then dropped). MAC counts
are checked by the front-end tests against :data:`models.PUBLISHED`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import models
from models.builder import GraphBuilder
from partitioner.errors import UserError

# Output shapes at the default input size, batch 1, from the architectures' definitions.
EXPECTED_OUTPUTS: dict[str, dict[str, tuple[int, ...]]] = {
    "alexnet": {"logits": (1, 1000)},
    "vgg11": {"logits": (1, 1000)},
    "vgg16": {"logits": (1, 1000)},
    "resnet18": {"logits": (1, 1000)},
    "resnet50": {"logits": (1, 1000)},
    "mobilenet_v2": {"logits": (1, 1000)},
    "vit_b_16": {"logits": (1, 1000)},
    "vit_tiny": {"logits": (1, 1000)},
    # Strides 8, 16, 32 of a 640x640 image; 3 anchors x (4 box + 1 objectness + 80 classes).
    "yolo_small": {"p3": (1, 255, 80, 80), "p4": (1, 255, 40, 40), "p5": (1, 255, 20, 20)},
    # The same strides; v11 Detect: 4 * reg_max (16) box channels + 80 classes.
    "yolo11_small": {"p3": (1, 144, 80, 80), "p4": (1, 144, 40, 40), "p5": (1, 144, 20, 20)},
    "lstm_small": {"logits": (1, 10)},
    "tiny_cnn": {"logits": (1, 10)},
    # early-exit models: the main output, then the exit head's (models/exits.py)
    "branchy_alexnet": {"logits": (1, 1000), "exit1": (1, 1000)},
    "resnet18_exit": {"logits": (1, 1000), "exit1": (1, 1000)},
    "tiny_branchy": {"logits": (1, 10), "exit1": (1, 10)},
}


def trainable_params(model: onnx.ModelProto) -> int:
    """Elements of all initialisers except BatchNormalization running mean / variance."""
    stats = {name for node in model.graph.node if node.op_type == "BatchNormalization"
             for name in node.input[3:5]}
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name not in stats)


def session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    src = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def random_feeds(sess: ort.InferenceSession, batch: int = 1, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal(
        [batch if isinstance(d, str) else d for d in i.shape]).astype(np.float32)
        for i in sess.get_inputs()}


def test_zoo_lists_every_model() -> None:
    assert models.list_models() == sorted(EXPECTED_OUTPUTS)


#: Models whose weights are hundreds of MB: copying them through the checker and an ONNX
#: Runtime session costs tens of seconds on a busy 2-core machine, so they are checked on
#: a weightless copy and not run (their code paths run in the small models).
HEAVY = {"alexnet", "branchy_alexnet", "vgg11", "vgg16", "vit_b_16"}


def weightless(model: onnx.ModelProto, limit: int = 1 << 20) -> onnx.ModelProto:
    """A copy whose initialisers over ``limit`` bytes become graph inputs of the same type
    and shape: every node, type and shape is still checked; only weight bytes are not."""
    copy = onnx.ModelProto()
    copy.ir_version = model.ir_version
    copy.opset_import.extend(model.opset_import)
    g = copy.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if len(t.raw_data) > limit:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims))
        else:
            g.initializer.append(t)
    return copy


@pytest.mark.parametrize("name", sorted(EXPECTED_OUTPUTS))
def test_model_is_valid_runs_and_matches_published_params(name: str) -> None:
    model = models.build_model(name)
    if name in models.PUBLISHED:
        assert trainable_params(model) == models.PUBLISHED[name]["params"]
    for node in model.graph.node:
        # Weights are named after the module that owns them, as torch.onnx names them.
        if node.op_type in ("Conv", "Gemm"):
            assert node.input[1] == f"{node.name}.weight"
    if name in HEAVY:
        model = weightless(model)
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        got = {o.name: tuple(d.dim_value for d in o.type.tensor_type.shape.dim)
               for o in inferred.graph.output}
        assert got == EXPECTED_OUTPUTS[name]
        return
    onnx.checker.check_model(model, full_check=True)
    sess = session(model)
    del model
    outputs = sess.run(None, random_feeds(sess))
    names = [o.name for o in sess.get_outputs()]
    assert dict(zip(names, (o.shape for o in outputs), strict=True)) == EXPECTED_OUTPUTS[name]
    for out in outputs:
        assert np.isfinite(out).all()
        assert out.std() > 0          # not collapsed to a constant


def test_published_figures_cover_the_torchvision_layouts() -> None:
    assert set(models.PUBLISHED) == {"alexnet", "vgg11", "vgg16", "resnet18", "resnet50",
                                     "mobilenet_v2", "vit_b_16"}
    for name, fig in models.PUBLISHED.items():
        assert fig["image_size"] == models.MODELS[name].image_size
        assert isinstance(fig["params"], int) and float(fig["macs"]) > fig["params"] / 10
        assert "torchvision" in str(fig["source"])


def test_tiny_models_stay_small() -> None:
    assert trainable_params(models.build_model("tiny_cnn")) < 100_000
    assert trainable_params(models.build_model("vit_tiny")) < 3_000_000


def test_names_follow_torchvision_module_paths() -> None:
    m = models.build_model("resnet18")
    nodes = {n.name: n for n in m.graph.node}
    inits = {t.name for t in m.graph.initializer}
    assert nodes["layer1.0.conv1"].op_type == "Conv"
    assert nodes["layer2.0.downsample.0"].op_type == "Conv"
    assert nodes["layer4.1.bn2"].op_type == "BatchNormalization"
    assert {"layer4.1.bn2.weight", "layer4.1.bn2.running_var", "fc.weight", "fc.bias"} <= inits
    # Residual Adds join the block input (or its downsample) with the branch.
    adds = [n for n in m.graph.node if n.op_type == "Add"]
    assert len(adds) == 8
    assert list(nodes["layer2.0.add"].input) == ["layer2.0.bn2", "layer2.0.downsample.1"]


def test_mobilenet_v2_has_depthwise_convs_and_relu6() -> None:
    m = models.build_model("mobilenet_v2")
    depthwise = [n for n in m.graph.node if n.op_type == "Conv"
                 and onnx.helper.get_attribute_value(
                     next(a for a in n.attribute if a.name == "group")) > 1]
    assert len(depthwise) == 17
    clips = [n for n in m.graph.node if n.op_type == "Clip"]
    assert len(clips) == 35
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
              for n in m.graph.node if n.op_type == "Constant"}
    assert {(float(consts[c.input[1]]), float(consts[c.input[2]])) for c in clips} == {(0, 6)}
    # Inverted residuals: shortcut only where stride is 1 and channels are unchanged.
    assert sum(n.op_type == "Add" for n in m.graph.node) == 10


def test_vit_has_real_attention() -> None:
    m = models.build_model("vit_tiny")
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Softmax") == 4 and ops.count("LayerNormalization") == 2 * 4 + 1
    assert ops.count("Erf") == 4
    concat = next(n for n in m.graph.node if n.name == "encoder.concat")
    assert list(concat.input) == ["class_token.expand", "patches.transpose"]
    pos = next(t for t in m.graph.initializer if t.name == "encoder.pos_embedding")
    assert list(pos.dims) == [1, (224 // 16) ** 2 + 1, 192]


def test_attention_matches_numpy_reference() -> None:
    """One ViT block's attention, recomputed in numpy from the model's own weights."""
    m = models.build_model("vit_tiny", image_size=32, seed=3)
    w = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    p = "encoder.layers.encoder_layer_0"
    # Expose the block's LayerNorm output and attention output as extra graph outputs.
    for name in (f"{p}.ln_1", f"{p}.self_attention.out_proj"):
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = session(m)
    x, attn = sess.run([f"{p}.ln_1", f"{p}.self_attention.out_proj"], random_feeds(sess))
    qkv = x @ w[f"{p}.self_attention.in_proj.weight"] + w[f"{p}.self_attention.in_proj.bias"]
    q, k, v = np.split(qkv, 3, axis=-1)
    heads, dh = 3, 64

    def split(t: np.ndarray) -> np.ndarray:
        return t.reshape(t.shape[0], t.shape[1], heads, dh).transpose(0, 2, 1, 3)

    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(dh)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = (probs @ split(v)).transpose(0, 2, 1, 3).reshape(x.shape)
    ref = ctx @ w[f"{p}.self_attention.out_proj.weight"] + w[f"{p}.self_attention.out_proj.bias"]
    np.testing.assert_allclose(attn, ref, rtol=1e-4, atol=1e-4)


def test_yolo_neck_fuses_scales_and_has_three_heads() -> None:
    m = models.build_model("yolo_small", image_size=320)
    producers = {o: n for n in m.graph.node for o in n.output}
    resizes = [n for n in m.graph.node if n.op_type == "Resize"]
    assert len(resizes) == 2
    for r in resizes:
        # Each upsampled map is concatenated with a backbone feature of the finer scale.
        concat = next(n for n in m.graph.node if r.output[0] in n.input)
        assert concat.op_type == "Concat" and len(concat.input) == 2
        other = next(i for i in concat.input if i != r.output[0])
        assert producers[other].op_type == "Mul"          # a SiLU-activated conv output
    assert [o.name for o in m.graph.output] == ["p3", "p4", "p5"]
    sess = session(m)
    shapes = [o.shape for o in sess.run(None, random_feeds(sess))]
    assert shapes == [(1, 255, 40, 40), (1, 255, 20, 20), (1, 255, 10, 10)]


def test_lstm_uses_the_onnx_lstm_op() -> None:
    m = models.build_model("lstm_small", image_size=7)
    lstms = [n for n in m.graph.node if n.op_type == "LSTM"]
    assert [n.name for n in lstms] == ["lstm.0", "lstm.1"]
    sess = session(m)
    assert sess.get_inputs()[0].shape == [1, 7, 40]
    assert sess.run(None, random_feeds(sess))[0].shape == (1, 10)


@pytest.mark.parametrize("name", ["tiny_cnn", "mobilenet_v2", "vit_tiny", "yolo_small",
                                  "lstm_small"])
def test_dynamic_batch_matches_static_model_row_by_row(name: str) -> None:
    size = {"mobilenet_v2": 64, "vit_tiny": 64, "yolo_small": 128}.get(name)
    dyn = models.build_model(name, dynamic_batch=True, image_size=size, seed=5)
    onnx.checker.check_model(dyn, full_check=True)
    for vi in list(dyn.graph.input) + list(dyn.graph.output):
        assert vi.type.tensor_type.shape.dim[0].dim_param == "batch"
    static = session(models.build_model(name, image_size=size, seed=5))
    sess = session(dyn)
    feeds = random_feeds(sess, batch=3)
    outs = sess.run(None, feeds)
    for row in range(3):
        one = {k: v[row:row + 1] for k, v in feeds.items()}
        for got, want in zip(outs, static.run(None, one), strict=True):
            np.testing.assert_allclose(got[row:row + 1], want, rtol=1e-4, atol=1e-4)


def test_static_batch_shapes_every_tensor() -> None:
    m = models.build_model("mobilenet_v2", batch=4, image_size=64)
    assert [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 64, 64]
    sess = session(m)
    assert sess.run(None, random_feeds(sess))[0].shape == (4, 1000)


def test_seed_fixes_the_weights() -> None:
    a = models.build_model("tiny_cnn", seed=7).SerializeToString()
    assert a == models.build_model("tiny_cnn", seed=7).SerializeToString()
    assert a != models.build_model("tiny_cnn", seed=8).SerializeToString()


def _torch_adaptive_avg_pool(x: np.ndarray, size: int) -> np.ndarray:
    """torch's definition: output cell i averages input rows floor(i*H/S)..ceil((i+1)*H/S)."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, size, size), np.float32)
    for i in range(size):
        r0, r1 = (i * h) // size, -(-((i + 1) * h) // size)
        for j in range(size):
            c0, c1 = (j * w) // size, -(-((j + 1) * w) // size)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out


@pytest.mark.parametrize(("h", "size"), [(14, 7), (1, 7), (2, 6), (12, 6), (9, 1)])
def test_adaptive_avgpool_matches_torch_definition(h: int, size: int) -> None:
    g = GraphBuilder("pool")
    x = g.input("x", (2, 3, h, h))
    y = g.adaptive_avgpool(x, size, name="avgpool") or x
    g.output(y, "y")
    data = np.random.default_rng(0).standard_normal((2, 3, h, h)).astype(np.float32)
    got = session(g.build()).run(None, {"x": data})[0]
    np.testing.assert_allclose(got, _torch_adaptive_avg_pool(data, size), rtol=1e-5, atol=1e-6)


def test_adaptive_avgpool_refuses_sizes_one_op_cannot_compute() -> None:
    g = GraphBuilder("pool")
    with pytest.raises(UserError, match="avgpool.*5x5"):
        g.adaptive_avgpool(g.input("x", (1, 3, 5, 5)), 7, name="avgpool")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"name": "resnet19"}, "unknown model 'resnet19'"),
    ({"name": "tiny_cnn", "batch": 0}, "batch"),
    ({"name": "tiny_cnn", "image_size": -3}, "image size"),
    ({"name": "yolo_small", "image_size": 100}, "yolo_small.*multiple of 32"),
    ({"name": "vit_tiny", "image_size": 100}, "vit_tiny.*patch"),
    ({"name": "alexnet", "image_size": 159}, "alexnet.*avgpool.*4x4"),
    ({"name": "tiny_cnn", "image_size": 2}, "tiny_cnn.*too small"),
])
def test_bad_arguments_are_user_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(UserError, match=match) as err:
        models.build_model(**kwargs)
    assert "\n" not in str(err.value)


def test_save_inline_and_external_data(tmp_path: Path) -> None:
    inline = models.save_model("tiny_cnn", tmp_path / "a.onnx", seed=2)
    ext = models.save_model("tiny_cnn", tmp_path / "b.onnx", seed=2, external_data=True)
    data = tmp_path / "b.onnx.data"
    assert data.stat().st_size >= 4 * 24_000 > ext.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "b.onnx.data"]
    feeds = {"input": np.ones((1, 3, 32, 32), np.float32)}
    a, b = (session(p).run(None, feeds)[0] for p in (inline, ext))
    np.testing.assert_array_equal(a, b)
    # Saving again replaces the files rather than appending to the data file.
    size = data.stat().st_size
    models.save_model("tiny_cnn", ext, seed=2, external_data=True)
    assert data.stat().st_size == size
    np.testing.assert_array_equal(session(ext).run(None, feeds)[0], a)


def test_save_into_missing_folder_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        models.save_model("tiny_cnn", tmp_path / "no" / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_list_and_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from models.__main__ import main

    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listed["models"]] == models.list_models()
    out = tmp_path / "m.onnx"
    assert main(["build", "lstm_small", "-o", str(out), "--dynamic-batch", "--external-data",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["path"] == str(out) and Path(doc["data_file"]).is_file()
    assert session(out).get_inputs()[0].shape == ["batch", 32, 40]
    assert main(["build", "alexnet", "-o", str(tmp_path / "x.onnx"), "--batch", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch" in err
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(SystemExit) as stop:  # a bad option: argparse's one line
        main(["build", "alexnet"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-o/--output" in err and "--help)" in err


def test_python_dash_m_models_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "models", "list"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0
    assert [line.split()[0] for line in proc.stdout.splitlines()] == models.list_models()
