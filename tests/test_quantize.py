"""Per-layer int8 variants (QUANT), model side: calibration files, candidate layers, the
variant ORT's quantiser makes and how it is regrouped into the model's layers, noise."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import models
from partitioner.errors import UserError
from partitioner.frontend import load_model
from partitioner.frontend import quantize as Q
from partitioner.frontend.slicing import extract_layers


@pytest.fixture(autouse=True)
def no_disk_cache(monkeypatch):
    monkeypatch.setenv("PARTITIONER_CACHE", "")


@pytest.fixture(scope="module")
def tiny():
    return load_model(models.build_model("tiny_cnn"))


@pytest.fixture(scope="module")
def yolo11():
    return load_model(models.build_model("yolo11_small", image_size=64))


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# --------------------------------------------------------------------------- calibration


def test_calibration_file_round_trip(tmp_path, tiny):
    arrays = Q.random_calibration(tiny, 3, seed=4)
    assert arrays["input"].shape == (3, 1, 3, 32, 32) and arrays["input"].dtype == np.float32
    np.savez(tmp_path / "cal.npz", **arrays)
    loaded = Q.load_calibration(tmp_path / "cal.npz", tiny)
    np.testing.assert_array_equal(loaded["input"], arrays["input"])
    # other arrays (labels) are left out; float64 is converted to the input's float32
    np.savez(tmp_path / "more.npz", input=arrays["input"].astype(np.float64),
             labels=np.arange(3))
    more = Q.load_calibration(tmp_path / "more.npz", tiny.graph)
    assert set(more) == {"input"} and more["input"].dtype == np.float32
    np.testing.assert_array_equal(more["input"], arrays["input"])
    assert Q.calibration_digest(loaded) == Q.calibration_digest(arrays)
    assert Q.calibration_digest(Q.random_calibration(tiny, 3, seed=5)) != \
        Q.calibration_digest(arrays)


@pytest.mark.parametrize("content, message", [
    ({"images": np.zeros((2, 1, 3, 32, 32), np.float32)}, "no array for model input 'input'"),
    ({}, "no array for model input 'input'"),
    ({"input": np.zeros((2, 3, 32, 32), np.float32)}, r"shape \[2, 3, 32, 32\], expected "
                                                      r"\(samples, 1, 3, 32, 32\)"),
    ({"input": np.zeros((2, 1, 3, 16, 16), np.float32)}, "input 'input' has shape"),
    ({"input": np.zeros((2, 1, 3, 32, 32), np.int32)}, "dtype int32, expected float32"),
    ({"input": np.zeros((0, 1, 3, 32, 32), np.float32)}, "no samples"),
    ({"input": np.full((1, 1, 3, 32, 32), np.nan, np.float32)}, "non-finite"),
])
def test_bad_calibration_files_give_one_line_errors(tmp_path, tiny, content, message):
    path = tmp_path / "cal.npz"
    np.savez(path, **content)
    with pytest.raises(UserError, match=message) as err:
        Q.load_calibration(path, tiny)
    assert str(path) in _one_line(err)


def test_calibration_that_is_not_an_npz_or_holds_objects(tmp_path, tiny):
    text = tmp_path / "cal.npz"
    text.write_text("not an archive\n")
    with pytest.raises(UserError, match="cannot read it as .npz") as err:
        Q.load_calibration(text, tiny)
    _one_line(err)
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match="cannot read it as .npz"):  # no pickle, ever
        Q.load_calibration(pickled, tiny)
    with pytest.raises(UserError, match="no such file"):
        Q.load_calibration(tmp_path / "missing.npz", tiny)


# --------------------------------------------------------------------------- candidates


def test_candidates_are_the_heaviest_quantisable_layers(yolo11):
    layers = yolo11.graph.layers
    picked = Q.candidate_layers(yolo11.graph, 5)
    assert len(picked) == 5 and list(picked) == sorted(picked)
    lightest_picked = min(layers[k].flops for k in picked)
    others = [x.flops for x in layers if x.index not in picked and
              any(op in Q.QUANTIZABLE_OPS for op in x.ops)]
    assert max(others) <= lightest_picked
    assert Q.candidate_layers(yolo11.graph, "5") == picked  # the CLI's spelling
    assert len(Q.candidate_layers(yolo11.graph)) == Q.DEFAULT_CANDIDATES == 12
    names = [layers[picked[0]].name, layers[picked[-1]].name]
    assert Q.candidate_layers(yolo11.graph, names) == (picked[0], picked[-1])
    assert Q.candidate_layers(yolo11.graph, ",".join(reversed(names))) == \
        (picked[0], picked[-1])


def test_unknown_or_unquantisable_layers_give_one_line_errors(yolo11):
    with pytest.raises(UserError, match="no layer 'model.99.conv'") as err:
        Q.candidate_layers(yolo11.graph, ["model.0.conv", "model.99.conv"])
    _one_line(err)
    with pytest.raises(UserError, match="K >= 1"):
        Q.candidate_layers(yolo11.graph, 0)
    lstm = load_model(models.build_model("lstm_small"))
    name = next(x.name for x in lstm.graph.layers
                if not any(op in Q.QUANTIZABLE_OPS for op in x.ops))
    with pytest.raises(UserError, match=f"layer '{name}' .* holds no op") as err:
        Q.candidate_layers(lstm.graph, [name])
    _one_line(err)
    with pytest.raises(UserError, match="holds no op ONNX Runtime's quantiser"):
        Q.quantize_model(lstm, [next(x.index for x in lstm.graph.layers if x.name == name)],
                         Q.random_calibration(lstm, 2))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, inside the calibrator
def test_a_model_ort_cannot_quantise_gives_a_one_line_error(tiny):
    # infinite activations: the quantiser finds no scale ("scale issue")
    bad = {"input": np.full((2, 1, 3, 32, 32), np.inf, np.float32)}
    with pytest.raises(
            UserError, match="ONNX Runtime cannot quantise layers conv1 of model") as err:
        Q.quantize_model(tiny, [0], bad, use_cache=False)
    _one_line(err)


# --------------------------------------------------------------------------- variants


def test_variant_quantises_exactly_the_chosen_layers(yolo11):
    chosen = Q.candidate_layers(yolo11.graph, 4)
    v = Q.quantize_model(yolo11, chosen, Q.random_calibration(yolo11, 4))
    qg, qm = v.prepared.graph, v.prepared.model
    assert [x.name for x in qg.layers] == [x.name for x in yolo11.graph.layers]
    assert qg.sha256 == yolo11.graph.sha256
    inits = {t.name: t for t in qm.graph.initializer}
    fnodes = yolo11.model.graph.node
    for old, new in zip(yolo11.graph.layers, qg.layers, strict=True):
        qnodes = [qm.graph.node[i] for i in new.nodes]
        # every node of the float layer is still in its layer, under its name
        # (ORT drops a Relu it folds into a Q, none here: SiLU is Sigmoid * Mul)
        assert {fnodes[i].name for i in old.nodes} <= {n.name for n in qnodes}
        convs = [n for n in qnodes if n.op_type == "Conv"]
        for conv in convs:
            weight = conv.input[1]
            if old.index in chosen:  # int8 weights, one scale per output channel
                dq = next(n for n in qnodes if weight in n.output)
                assert dq.op_type == "DequantizeLinear"
                q = numpy_helper.to_array(inits[dq.input[0]])
                assert q.dtype == np.int8
                assert numpy_helper.to_array(inits[dq.input[1]]).shape == (q.shape[0],)
            else:
                assert numpy_helper.to_array(inits[weight]).dtype == np.float32
    # a quantised layer's output leaves it as uint8, a quarter of the bytes
    for k in chosen:
        for fname, qname in v.int8_outputs[k]:
            t, f = qg.tensors[qname], yolo11.graph.tensors[fname]
            assert (t.dtype, t.shape, t.nbytes * 4) == ("uint8", f.shape, f.nbytes)
            assert qname in qg.layers[k].produces and fname not in qg.cuts[k + 1].tensors
    assert set(v.int8_of) == {f for pairs in v.int8_outputs.values() for f, _ in pairs}


def test_variant_keeps_the_float_model_where_nothing_is_quantised(tiny):
    v = Q.quantize_model(tiny, [1], Q.random_calibration(tiny, 3))
    feeds = {"input": Q.random_calibration(tiny, 1, seed=9)["input"][0]}
    # the first layer's stage is the float conv1 (its output Q is conv2's input)
    first_float = extract_layers(tiny, 0, 0).model
    first_q = extract_layers(v.prepared, 0, 0).model
    assert "Conv" in {n.op_type for n in first_q.graph.node}
    assert not any(t.data_type == onnx.TensorProto.INT8 for t in first_q.graph.initializer)
    (out,) = _run(first_q, feeds)
    assert out.dtype == np.uint8  # handed on quantised, as conv2 reads it
    (ref,) = _run(first_float, feeds)
    assert out.shape == ref.shape


def test_nameless_nodes_are_quantised_and_mapped(tiny):
    model = models.build_model("tiny_cnn")
    for node in model.graph.node:
        node.name = ""
    prepared = load_model(model)
    v = Q.quantize_model(prepared, [0, 2], Q.random_calibration(prepared, 2))
    assert len(v.prepared.graph.layers) == len(prepared.graph.layers)
    assert set(v.int8_outputs) >= {0, 2}
    feeds = {"input": Q.random_calibration(prepared, 1, seed=3)["input"][0]}
    (got,) = _run(v.prepared.model, feeds)
    (ref,) = _run(prepared.model, feeds)
    assert got.shape == ref.shape and 0 < float(np.abs(got - ref).mean()) < 1


def test_variants_are_cached_per_model_layers_and_calibration(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("PARTITIONER_CACHE", str(tmp_path))
    cal = Q.random_calibration(tiny, 2, seed=11)
    a = Q.quantize_model(tiny, [0, 1], cal)
    assert Q.quantize_model(tiny, [1, 0], cal) is a  # same set, same calibration
    assert Q.quantize_model(tiny, [0], cal).key != a.key
    assert Q.quantize_model(tiny, [0, 1], Q.random_calibration(tiny, 2, seed=12)).key != a.key
    files = sorted(p.name for p in (tmp_path / "quantized").iterdir())
    assert f"{a.key}.onnx" in files and not any(f.startswith(".") for f in files)
    Q._MEMO.clear()  # a new process: read back from disk, the same model
    b = Q.quantize_model(tiny, [0, 1], cal)
    assert b is not a
    assert b.prepared.model.SerializeToString() == a.prepared.model.SerializeToString()
    # one calibration serves every layer set: its ranges are kept with the variants, and
    # a set quantised with them is the set quantised after a calibration of its own
    assert len([f for f in files if f.endswith(".ranges.json")]) == 2  # two calibrations
    from_ranges = Q.quantize_model(tiny, [1, 2], cal)
    fresh = Q.quantize_model(tiny, [1, 2], cal, use_cache=False)
    assert from_ranges.prepared.model.SerializeToString() == \
        fresh.prepared.model.SerializeToString()


# --------------------------------------------------------------------------- noise


def test_noise_is_quants_rho(yolo11):
    cal = Q.random_calibration(yolo11, 4, seed=1)
    inputs = Q.random_calibration(yolo11, 3, seed=2)
    layers = Q.candidate_layers(yolo11.graph, 3)
    meter = Q.NoiseMeter(yolo11, inputs, cal)
    assert meter.noise([]) == 0.0
    v = Q.quantize_model(yolo11, layers, cal)
    per_input = []
    for i in range(3):
        feeds = {"images": inputs["images"][i]}
        ref, got = _run(yolo11.model, feeds), _run(v.prepared.model, feeds)
        diff = np.concatenate([np.abs(r - g).ravel() for r, g in zip(ref, got, strict=True)])
        per_input.append(diff.mean())
    rho = meter.noise(layers)
    assert rho > 0
    np.testing.assert_allclose(rho, np.mean(per_input), rtol=1e-6)
    assert Q.measure_noise(yolo11, v, inputs) == pytest.approx(rho, rel=1e-12)
    assert Q.measure_noise(yolo11, layers, inputs, cal) == pytest.approx(rho, rel=1e-12)


def test_top1_agreement_of_a_classifier(tiny):
    cal = Q.random_calibration(tiny, 4, seed=1)
    inputs = Q.random_calibration(tiny, 6, seed=2)
    meter = Q.NoiseMeter(tiny, inputs, cal)
    assert meter.top1_agreement([]) == 1.0
    v = Q.quantize_model(tiny, [0, 1, 2, 3], cal)
    got = meter.outputs(v)
    want = np.mean([int(np.argmax(r[0]) == np.argmax(g[0]))
                    for r, g in zip(meter.reference, got, strict=True)])
    assert meter.top1_agreement(v) == pytest.approx(want)
    assert 0.0 <= want <= 1.0
