"""Per-layer int8 variants of a prepared model (QUANT), made by ONNX Runtime's quantiser.

:func:`quantize_model` quantises exactly the nodes of some layers with
``onnxruntime.quantization.quantize_static`` (QDQ format, uint8 activations, per-channel
int8 weights, MinMax calibration over the ``--calibration`` arrays) and regroups the
result into the *same* layers, so that the existing slicer
(:func:`partitioner.frontend.slicing.extract_layers`) cuts it into stages unchanged:

* every node of the prepared model keeps its name and its layer;
* a ``QuantizeLinear`` of an activation joins the layer that produces the tensor (a model
  input's: its first reader), so the 8-bit tensor between it and its
  ``DequantizeLinear`` is what crosses a cut after that layer (QUANT's cheaper ``g'``: a
  quarter of the float32 bytes). That holds for the output of a quantised layer, and also
  for a float layer's output that a quantised layer reads (ORT quantises a tensor for
  every reader once one reader is quantised);
* every other new node (the ``DequantizeLinear`` of an activation or of a weight) joins
  the layers that read its output; a layer beyond the first gets its own copy (outputs
  ``<name>__layer<k>``, as :mod:`partitioner.frontend.layers` copies constant nodes), so
  a cut never carries a dequantised float tensor that the 8-bit one could carry.

So every ORT *node unit* (the DQs into an op, the op, the Qs out of it) lies inside one
layer, and ORT's CPU optimiser fuses the same units in a stage file as in the whole model.
Putting a float layer's output Q in the reading layer instead made the chain differ from
the whole model: between a DQ and a Q, ORT quantises a float Conv's weights itself and
runs it as ``QLinearConv`` (resnet18: up to 0.16 at 3 of 20 cuts), which a cut between
the Conv and the Q prevents.

The quantiser's pre-processing (``quant_pre_process``: symbolic shape inference and ORT's
graph optimiser) is *not* run: the prepared model already has static inferred shapes and
folded shape code, and the optimiser would fuse and rename nodes across layer boundaries
(Conv + BatchNormalization, Conv + activation), leaving no node-exact map back to the
layers and changing the float model the variant is compared with. ``BatchNormalization``
is left in float: ORT quantises its rank-1 scale per channel on axis 1, which does not
exist (it warns and falls back to one scale for all channels); exported detectors fold
BN into the conv anyway.

Activations are uint8 (ORT's advice for x86 CPUs, U8S8), not int8: with int8 activations
ORT's CPU optimiser rewrites a QuantizeLinear/DequantizeLinear pair to uint8 only when the
Q feeds a single DQ, and whether it does differs between a stage file and the whole model
(a stage holds only some of a tensor's DQ copies), so the chained stages were not
bit-identical to the whole quantised model (up to 0.19 on yolo_small's outputs, measured
on every single cut); with uint8 they are, at every cut.

Noise (QUANT's rho): for one input, the mean of ``|o - o_q|`` over all elements of all
model outputs taken together; for a set of inputs, its mean (:func:`measure_noise`,
:class:`NoiseMeter`).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from partitioner import ir
from partitioner.errors import fail
from partitioner.frontend.calibration import (
    calibration_digest,
    calibration_samples,
    load_calibration,
    random_calibration,
)
from partitioner.frontend.qdq_layers import regroup
from partitioner.frontend.stagefile import save_model

if TYPE_CHECKING:
    from partitioner.frontend import PreparedModel

__all__ = [
    "QUANTIZABLE_OPS",
    "QuantizedModel",
    "NoiseMeter",
    "load_calibration",
    "random_calibration",
    "calibration_digest",
    "candidate_layers",
    "quantize_model",
    "measure_noise",
    "noise_of",
    "cache_dir",
    "DEFAULT_CANDIDATES",
]

log = logging.getLogger("partitioner.quantize")

#: A layer is a quantisation candidate when it holds one of these (the ops ORT's QDQ
#: quantiser turns into int8 kernels; the cheap ops around them follow).
QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: QUANT quantises the 12 heaviest layers (``--quantize-layers`` default).
DEFAULT_CANDIDATES = 12
# Ops left in float inside a quantised layer (see the module docstring).
_KEEP_FLOAT = frozenset({"BatchNormalization"})
# Above this many weight bytes the quantiser writes external data (protobuf's 2 GB).
_EXTERNAL_BYTES = 1 << 30
_CACHE_ENV = "PARTITIONER_CACHE"
_FORMAT = "qdq-u8s8-perchannel-minmax-v1"  # part of the cache key: what the file holds


# --------------------------------------------------------------------------- candidates


def _quantizable(layer: ir.Layer) -> bool:
    return any(op in QUANTIZABLE_OPS for op in layer.ops)


def candidate_layers(graph: ir.LayerGraph, spec: int | str | Sequence[str] = DEFAULT_CANDIDATES
                     ) -> tuple[int, ...]:
    """The layers that may run as int8 (``--quantize-layers K|NAME,...``), sorted.

    Args:
        graph: the model's layer graph.
        spec: K, the K heaviest quantisable layers by FLOPs (ties: the earlier layer);
            or layer names as ``partitioner inspect`` prints them (a list, or one
            comma-separated string).

    Raises:
        UserError: K < 1, an unknown name, a named layer without an op ORT quantises, a
            model without any quantisable layer.
    """
    if isinstance(spec, str):
        stripped = spec.strip()
        spec = int(stripped) if stripped.isdigit() else [
            s.strip() for s in stripped.split(",") if s.strip()]
    quantizable = [layer for layer in graph.layers if _quantizable(layer)]
    if isinstance(spec, int):
        if spec < 1:
            fail(f"--quantize-layers {spec}: expected K >= 1 or layer names")
        if not quantizable:
            fail(f"model {graph.name!r}: no layer holds an op ONNX Runtime's quantiser "
                 f"quantises ({', '.join(QUANTIZABLE_OPS)})")
        heaviest = sorted(quantizable, key=lambda x: (-x.flops, x.index))[:spec]
        return tuple(sorted(x.index for x in heaviest))
    by_name = {layer.name: layer for layer in graph.layers}
    chosen: list[int] = []
    for name in spec:
        layer = by_name.get(name)
        if layer is None:
            fail(f"--quantize-layers: model {graph.name!r} has no layer {name!r} (see "
                 f"partitioner inspect)")
        if not _quantizable(layer):
            fail(f"--quantize-layers: layer {name!r} ({', '.join(dict.fromkeys(layer.ops))}) "
                 f"holds no op ONNX Runtime's quantiser quantises "
                 f"({', '.join(QUANTIZABLE_OPS)})")
        chosen.append(layer.index)
    if not chosen:
        fail("--quantize-layers: no layer named")
    return tuple(sorted(set(chosen)))


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class QuantizedModel:
    """The prepared model with the nodes of ``layers`` quantised.

    Attributes:
        prepared: a ``PreparedModel`` of the quantised model: same layers (indices, names,
            ``LayerGraph.name`` and ``sha256``), ``layers[k].nodes`` indexing the
            quantised model's nodes; what the slicer, routing and the back end take.
        layers: the quantised layers, sorted.
        int8_outputs: per layer, ``(float tensor, 8-bit tensor)`` for each of its outputs
            that another layer (or the destination) reads and that it hands on quantised
            (uint8 activations): when that tensor crosses a cut after the layer, the 8-bit
            one is sent. Quantised layers, and float layers whose output a quantised layer
            reads, have entries.
        key: the cache key (model fingerprint, layer set, calibration digest, format).
    """

    prepared: PreparedModel
    layers: tuple[int, ...]
    int8_outputs: Mapping[int, tuple[tuple[str, str], ...]]
    key: str

    @property
    def int8_of(self) -> dict[str, str]:
        """Float tensor name -> the int8 tensor sent instead of it."""
        return {f: q for pairs in self.int8_outputs.values() for f, q in pairs}


def cache_dir() -> Path | None:
    """Where quantised variants are kept: ``$PARTITIONER_CACHE/quantized`` (unset:
    ``~/.cache/partitioner/quantized``; set to the empty string: no disk cache)."""
    root = os.environ.get(_CACHE_ENV)
    if root == "":
        return None
    base = Path(root) if root else Path.home() / ".cache" / "partitioner"
    return base / "quantized"


def _fingerprint(prepared: PreparedModel) -> str:
    shapes = sorted((k, tuple(v)) for k, v in prepared.shapes.items())
    return f"{prepared.graph.sha256}|{prepared.graph.granularity}|{shapes}"


def _key(prepared: PreparedModel, layers: Sequence[int], digest: str) -> str:
    import onnxruntime

    text = (f"{_fingerprint(prepared)}|{list(layers)}|{digest}|{_FORMAT}|"
            f"ort{onnxruntime.__version__}")
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# in-process memo: the planner's noise model and the back end quantise the same sets
_MEMO: dict[str, QuantizedModel] = {}
_MEMO_MAX = 64


def quantize_model(prepared: PreparedModel, layers: Sequence[int],
                   calibration: Mapping[str, np.ndarray], *, use_cache: bool = True
                   ) -> QuantizedModel:
    """The whole prepared model with exactly the nodes of ``layers`` quantised by
    ``onnxruntime.quantization.quantize_static`` (see the module docstring).

    Args:
        prepared: the front end's model.
        layers: layer indices to quantise (each must hold a ``QUANTIZABLE_OPS`` op).
        calibration: arrays in the ``--calibration`` format (:func:`load_calibration`).
        use_cache: reuse a variant made before for the same model, layers and calibration
            (in this process, and on disk under :func:`cache_dir`).

    Raises:
        UserError: an unknown or non-quantisable layer, or ORT failing to quantise.
    """
    graph = prepared.graph
    chosen = tuple(sorted(set(int(k) for k in layers)))
    for k in chosen:
        if not 0 <= k < len(graph.layers):
            fail(f"quantize: model {graph.name!r} has no layer {k} (0..{len(graph.layers) - 1})")
        if not _quantizable(graph.layers[k]):
            fail(f"quantize: layer {k} {graph.layers[k].name!r} holds no op ONNX Runtime's "
                 f"quantiser quantises ({', '.join(QUANTIZABLE_OPS)})")
    digest = calibration_digest(calibration)
    key = _key(prepared, chosen, digest)
    if use_cache and key in _MEMO:
        return _MEMO[key]
    ranges = _ranges_file(prepared, digest) if use_cache else None
    qmodel = _cached_or_quantized(prepared, chosen, calibration, key, use_cache, ranges)
    regrouped, int8 = regroup(prepared, qmodel, chosen)
    variant = QuantizedModel(regrouped, chosen, int8, key)
    if use_cache:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = variant
    return variant


def _named_copy(prepared: PreparedModel, work: Path) -> tuple[Path, list[str]]:
    """The prepared model saved under ``work`` with every node named; the node names."""
    model = prepared.model
    names = [n.name for n in model.graph.node]
    unnamed = [i for i, n in enumerate(names) if not n]
    taken = set(names)
    if unnamed:
        # the quantiser selects nodes by name: give the nameless ones a unique one (in the
        # copy; the prepared model itself is left alone)
        shell = onnx.ModelProto()
        shell.CopyFrom(model)
        for i in unnamed:
            name, n = f"node{i}", 0
            while name in taken:
                n += 1
                name = f"node{i}_{n}"
            taken.add(name)
            shell.graph.node[i].name = names[i] = name
        model = shell
    path = work / "float.onnx"
    save_model(model, path, base_dir=prepared.base_dir, external_data="float.onnx.data")
    return path, names


def _process_dir() -> Path:
    """A folder for this process's calibration ranges when there is no disk cache."""
    global _RANGES_DIR
    if _RANGES_DIR is None:
        _RANGES_DIR = Path(tempfile.mkdtemp(prefix="partitioner-ranges-"))
        atexit.register(shutil.rmtree, _RANGES_DIR, True)
    return _RANGES_DIR


_RANGES_DIR: Path | None = None


def _ranges_file(prepared: PreparedModel, digest: str) -> Path:
    """Where the calibration ranges of the model on these inputs are kept. ORT's
    calibrator measures every tensor of every quantisable op, whichever nodes are then
    quantised, so one calibration serves every layer set (the noise model's many)."""
    import onnxruntime

    text = f"{_fingerprint(prepared)}|{digest}|{_FORMAT}|ort{onnxruntime.__version__}"
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    return (cache_dir() or _process_dir()) / f"{key}.ranges.json"


def _quantize(prepared: PreparedModel, layers: tuple[int, ...],
              calibration: Mapping[str, np.ndarray], out: Path, ranges: Path | None
              ) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    samples = calibration_samples(calibration)
    if not samples:
        fail("quantize: the calibration data has no samples")
    work = Path(tempfile.mkdtemp(prefix=".quantize-", dir=out.parent))
    try:
        src, names = _named_copy(prepared, work)
        nodes = [names[i] for k in layers for i in prepared.graph.layers[k].nodes]
        ops = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - _KEEP_FLOAT)
        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self._it = iter(samples)

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self._it, None)

        reader = Reader()
        # a cached calibration is read; a new one is written aside and moved into place
        target = ranges if ranges is not None and ranges.is_file() else work / "ranges.json"
        big = sum(prepared.graph.initializer_bytes.values()) > _EXTERNAL_BYTES
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # its "run pre-processing" advice
        try:
            quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=ops, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=nodes, use_external_data_format=big,
                            extra_options={"ActivationSymmetric": False,
                                           "WeightSymmetric": True},
                            calibration_cache_path=str(target))
        except Exception as err:  # noqa: BLE001 - the quantiser raises many types
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            what = ", ".join(prepared.graph.layers[k].name for k in layers)
            fail(f"quantize: ONNX Runtime cannot quantise layers {what} of model "
                 f"{prepared.graph.name!r}: {first}")
        finally:
            logging.getLogger().setLevel(level)
        if ranges is not None and target != ranges and target.is_file():
            _store(target.rename(target.with_name(ranges.name)), ranges.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cached_or_quantized(prepared: PreparedModel, layers: tuple[int, ...],
                         calibration: Mapping[str, np.ndarray], key: str, use_cache: bool,
                         ranges: Path | None) -> onnx.ModelProto:
    root = cache_dir() if use_cache else None
    if root is not None:
        hit = root / f"{key}.onnx"
        if hit.is_file():
            try:
                return onnx.load(str(hit))
            except Exception:  # noqa: BLE001 - a damaged cache entry is made again
                log.warning("quantize: cache entry %s unreadable, quantising again", hit)
    tmp = Path(tempfile.mkdtemp(prefix="partitioner-quantize-"))
    try:
        out = tmp / f"{key}.onnx"
        _quantize(prepared, layers, calibration, out, ranges)
        model = onnx.load(str(out))
        if root is not None:
            _store(out, root)
        return model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _store(file: Path, root: Path) -> None:
    """Copy a file (and its ``.data`` file) into the cache atomically; best effort."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        data = file.with_name(file.name + ".data")
        for src in ([data] if data.exists() else []) + [file]:  # the data before the model
            fd, name = tempfile.mkstemp(prefix=f".{src.name}.", dir=root)
            os.close(fd)
            staged = Path(name)
            shutil.copyfile(src, staged)
            os.replace(staged, root / src.name)
    except OSError as err:
        log.warning("quantize: cannot cache the variant in %s: %s", root, err)


# --------------------------------------------------------------------------- noise


def noise_of(reference: Sequence[Sequence[np.ndarray]],
             quantised: Sequence[Sequence[np.ndarray]]) -> float:
    """QUANT's rho: per input, mean |o - o_q| over all elements of all outputs taken
    together; then the mean over inputs."""
    per_input = []
    for ref, got in zip(reference, quantised, strict=True):
        total = sum(float(np.abs(r.astype(np.float64) - q.astype(np.float64)).sum())
                    for r, q in zip(ref, got, strict=True))
        count = sum(int(r.size) for r in ref)
        per_input.append(total / max(count, 1))
    return float(np.mean(per_input)) if per_input else 0.0


def _session(model: onnx.ModelProto, base_dir: Path | None, what: str) -> Any:
    from partitioner.backend.verify import session

    work = Path(tempfile.mkdtemp(prefix="partitioner-noise-"))
    try:
        path = work / "model.onnx"
        save_model(model, path, base_dir=base_dir, external_data="model.onnx.data")
        return session(path, what)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class NoiseMeter:
    """Measures rho of variants against the float model on fixed inputs; the float
    outputs are computed once (the planner's noise model measures many layer sets)."""

    def __init__(self, prepared: PreparedModel, inputs: Mapping[str, np.ndarray],
                 calibration: Mapping[str, np.ndarray]) -> None:
        self.prepared = prepared
        self.calibration = calibration
        self.samples = calibration_samples(inputs)
        if not self.samples:
            fail("noise: no input samples to measure on")
        self.names = [t.name for t in prepared.graph.outputs]
        sess = _session(prepared.model, prepared.base_dir, f"model {prepared.graph.name!r}")
        self.reference = [sess.run(self.names, s) for s in self.samples]

    def outputs(self, variant: QuantizedModel) -> list[list[np.ndarray]]:
        """The variant's model outputs on every sample (ORT)."""
        sess = _session(variant.prepared.model, None,
                        f"quantised model {self.prepared.graph.name!r}")
        return [sess.run(self.names, s) for s in self.samples]

    def _variant(self, layers: Sequence[int] | QuantizedModel) -> QuantizedModel | None:
        if isinstance(layers, QuantizedModel):
            return layers if layers.layers else None
        return quantize_model(self.prepared, layers, self.calibration) if layers else None

    def noise(self, layers: Sequence[int] | QuantizedModel) -> float:
        """rho of the variant with ``layers`` quantised (no layer: 0.0 without running)."""
        variant = self._variant(layers)
        return 0.0 if variant is None else noise_of(self.reference, self.outputs(variant))

    def top1_agreement(self, layers: Sequence[int] | QuantizedModel, output: int = 0
                       ) -> float:
        """For a classifier: the share of inputs whose arg-max of model output ``output``
        (per row of its first axis) is the float model's (QUANT's accuracy proxy)."""
        variant = self._variant(layers)
        if variant is None:
            return 1.0
        same = total = 0
        for ref, got in zip(self.reference, self.outputs(variant), strict=True):
            a, b = ref[output], got[output]
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            same += int(np.sum(a.argmax(axis=1) == b.argmax(axis=1)))
            total += a.shape[0]
        return same / max(total, 1)


def measure_noise(prepared: PreparedModel, layers: Sequence[int] | QuantizedModel,
                  inputs: Mapping[str, np.ndarray],
                  calibration: Mapping[str, np.ndarray] | None = None) -> float:
    """QUANT's rho of the model with ``layers`` quantised, on ``inputs`` (calibration
    format: a leading sample axis), ORT running the float and the quantised model.
    ``calibration`` defaults to ``inputs`` (not needed when a variant is given)."""
    return NoiseMeter(prepared, inputs, calibration if calibration is not None else inputs
                      ).noise(layers)
