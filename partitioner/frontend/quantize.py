"""Per-layer int8 variants of a prepared model (QUANT), made by ONNX Runtime's quantiser.

:func:`quantize_model` quantises exactly the nodes of some layers with
``onnxruntime.quantization.quantize_static`` (QDQ format, uint8 activations, per-channel
int8 weights, MinMax calibration over the ``--calibration`` arrays) and regroups the
result into the *same* layers, so that the existing slicer
(:func:`partitioner.frontend.slicing.extract_layers`) cuts it into stages unchanged:

* every node of the prepared model keeps its name and its layer;
* a ``QuantizeLinear`` of a tensor produced by a quantised layer joins that layer, so the
  int8 tensor between it and its ``DequantizeLinear`` is what crosses a cut after that
  layer (QUANT's cheaper ``g'``: a quarter of the float32 bytes);
* every other new node (the ``DequantizeLinear`` of an activation, the ``QuantizeLinear``
  of a float tensor that a quantised layer reads, the ``DequantizeLinear`` of a weight)
  joins the layers that read its output; a layer beyond the first gets its own copy
  (outputs ``<name>__layer<k>``, as :mod:`partitioner.frontend.layers` copies constant
  nodes), so a cut never carries a dequantised float tensor that the int8 one could carry.

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

import dataclasses
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
from partitioner.frontend.inference import infer_types
from partitioner.frontend.layers import build_layer_graph
from partitioner.frontend.prepare import topological_order
from partitioner.frontend.stagefile import save_model
from partitioner.frontend.tensors import node_inputs

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


# --------------------------------------------------------------------------- calibration


def _inputs(prepared: PreparedModel) -> tuple[ir.TensorInfo, ...]:
    return prepared.graph.inputs


def load_calibration(path: str | os.PathLike[str], prepared: PreparedModel
                     ) -> dict[str, np.ndarray]:
    """The ``--calibration FILE.npz`` arrays: one per model input, keyed by input name,
    with a leading sample axis (``images`` of shape ``(16, 1, 3, 320, 320)``).

    Raises:
        UserError: not a readable npz file (pickled objects are refused), a model input
            missing, an array that is no model input, a wrong shape or dtype, inputs with
            different sample counts, no sample.
    """
    file = Path(path)
    where = f"--calibration {file}"
    if not file.is_file():
        fail(f"{where}: no such file")
    try:
        with np.load(file, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                fail(f"{where}: not an .npz archive (one array per model input expected)")
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError) as err:
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        fail(f"{where}: not a readable .npz archive ({why})")
    specs = {t.name: t for t in _inputs(prepared)}
    for name in arrays:
        if name not in specs:
            fail(f"{where}: array {name!r} is not an input of model {prepared.graph.name!r} "
                 f"(inputs: {', '.join(specs)})")
    counts = set()
    for name, t in specs.items():
        if name not in arrays:
            fail(f"{where}: model input {name!r} is missing")
        arr = arrays[name]
        if arr.ndim != len(t.shape) + 1 or tuple(arr.shape[1:]) != tuple(t.shape):
            fail(f"{where}: input {name!r} has shape {list(arr.shape)}, expected "
                 f"[samples, {', '.join(str(d) for d in t.shape)}]")
        if arr.dtype.name != t.dtype:
            fail(f"{where}: input {name!r} has dtype {arr.dtype.name}, expected {t.dtype}")
        counts.add(int(arr.shape[0]))
    if len(counts) > 1:
        fail(f"{where}: the inputs have different sample counts ({sorted(counts)})")
    if counts == {0}:
        fail(f"{where}: no samples (the leading axis is 0)")
    return arrays


def random_calibration(prepared: PreparedModel, n: int = 8, seed: int = 0
                       ) -> dict[str, np.ndarray]:
    """``n`` seeded random samples per input in the calibration format (floats N(0, 1),
    small integers for index-like inputs: :func:`partitioner.backend.verify.sample_inputs`).
    The caller warns that noise figures measured on them say little about real inputs."""
    from partitioner.backend.verify import sample_inputs

    if n < 1:
        fail(f"calibration: need at least one sample, got {n}")
    from stagebundle.manifest import TensorSpec

    stacked = [TensorSpec(t.name, (n, *t.shape), t.dtype) for t in _inputs(prepared)]
    return sample_inputs(stacked, seed)


def _samples(arrays: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The calibration arrays as one feed dict per sample."""
    count = min((int(a.shape[0]) for a in arrays.values()), default=0)
    return [{k: np.ascontiguousarray(a[i]) for k, a in arrays.items()} for i in range(count)]


def calibration_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the calibration arrays."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


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
        int8_outputs: per quantised layer, ``(float tensor, 8-bit tensor)`` for each of its
            outputs that another layer (or the destination) reads and that it hands on
            quantised (uint8 activations): when that tensor crosses a cut after the layer,
            the 8-bit one is sent.
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
    key = _key(prepared, chosen, calibration_digest(calibration))
    if use_cache and key in _MEMO:
        return _MEMO[key]
    qmodel = _cached_or_quantized(prepared, chosen, calibration, key, use_cache)
    variant = _regroup(prepared, qmodel, chosen, key)
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


def _quantize(prepared: PreparedModel, layers: tuple[int, ...],
              calibration: Mapping[str, np.ndarray], out: Path) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    samples = _samples(calibration)
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
        big = sum(prepared.graph.initializer_bytes.values()) > _EXTERNAL_BYTES
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # its "run pre-processing" advice
        try:
            quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=ops, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=nodes, use_external_data_format=big,
                            extra_options={"ActivationSymmetric": False,
                                           "WeightSymmetric": True})
        except Exception as err:  # noqa: BLE001 - the quantiser raises many types
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            what = ", ".join(prepared.graph.layers[k].name for k in layers)
            fail(f"quantize: ONNX Runtime cannot quantise layers {what} of model "
                 f"{prepared.graph.name!r}: {first}")
        finally:
            logging.getLogger().setLevel(level)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _cached_or_quantized(prepared: PreparedModel, layers: tuple[int, ...],
                         calibration: Mapping[str, np.ndarray], key: str, use_cache: bool
                         ) -> onnx.ModelProto:
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
        _quantize(prepared, layers, calibration, out)
        model = onnx.load(str(out))
        if root is not None:
            _store(out, root)
        return model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _store(file: Path, root: Path) -> None:
    """Copy a quantised file (and its data file) into the cache atomically; best effort."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        data = file.with_name(file.name + ".data")
        for src in ([data] if data.exists() else []) + [file]:  # the data before the model
            staged = Path(tempfile.mkstemp(prefix=f".{src.name}.", dir=root)[1])
            shutil.copyfile(src, staged)
            os.replace(staged, root / src.name)
    except OSError as err:
        log.warning("quantize: cannot cache the variant in %s: %s", root, err)


# --------------------------------------------------------------------------- regrouping


def _regroup(prepared: PreparedModel, qmodel: onnx.ModelProto, layers: tuple[int, ...],
             key: str) -> QuantizedModel:
    """Assign the quantised model's nodes to the prepared model's layers (module
    docstring), copy shared new nodes per layer, and build its layer graph."""
    from partitioner.frontend import PreparedModel as Prepared

    graph = prepared.graph
    fmodel = prepared.model
    layer_of_name: dict[str, int] = {}
    for layer in graph.layers:
        for i in layer.nodes:
            name = fmodel.graph.node[i].name
            layer_of_name[name or f"node{i}"] = layer.index
    # the float producer layer of each tensor (model outputs are renamed by the quantiser)
    float_producer: dict[str, int] = {}
    for layer in graph.layers:
        for i in layer.nodes:
            for o in fmodel.graph.node[i].output:
                float_producer[o] = layer.index
    quantised = set(layers)
    g = qmodel.graph
    _write_types(qmodel, f"quantised model {graph.name!r}")
    order = topological_order(g, f"quantised model {graph.name!r}")
    nodes = [g.node[i] for i in order]
    produced_by: dict[str, int] = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in node_inputs(n):
            consumers.setdefault(name, []).append(i)
    outputs = {o.name for o in g.output}
    original = [n.name in layer_of_name for n in nodes]

    def producing_layer(tensor: str) -> int | None:
        p = produced_by.get(tensor)
        if p is not None and original[p]:
            return layer_of_name[nodes[p].name]
        return None

    needs: dict[int, set[int]] = {}
    int8: dict[int, list[tuple[str, str]]] = {}
    for i in reversed(range(len(nodes))):
        n = nodes[i]
        if original[i]:
            continue
        src = producing_layer(n.input[0]) if n.input else None
        if n.op_type == "QuantizeLinear" and src in quantised:
            assert src is not None
            needs[i] = {src}
            continue
        need: set[int] = set()
        for o in n.output:
            for u in consumers.get(o, ()):
                need |= {layer_of_name[nodes[u].name]} if original[u] else needs.get(u, set())
            if o in outputs and o in float_producer:
                need.add(float_producer[o])
        if not need:  # read by nothing: stays with what it reads (or the first layer)
            need = {src if src is not None else 0}
        needs[i] = need
    # int8 tensors handed on by a quantised layer: its Q's output, where the float tensor
    # it quantises leaves the layer (read by a later layer or the destination)
    for i, need in needs.items():
        n = nodes[i]
        if n.op_type != "QuantizeLinear" or need != {producing_layer(n.input[0])}:
            continue
        (k,) = need
        float_name = _float_name(n.input[0], outputs)
        if k in quantised and float_name in graph.layers[k].produces:
            int8.setdefault(k, []).append((float_name, n.output[0]))
    new_nodes, layer_of = _localise(g, nodes, original, needs, layer_of_name)
    del g.node[:]
    g.node.extend(new_nodes)
    qgraph, stats = build_layer_graph(qmodel, name=graph.name, sha256=graph.sha256,
                                      granularity=graph.granularity, layer_of=layer_of)
    added = {n.name for n in qmodel.graph.node} - set(layer_of_name)
    fixed = []
    for layer, old in zip(qgraph.layers, graph.layers, strict=True):
        # row geometry is kept only for layers the quantiser left alone
        touched = any(qmodel.graph.node[i].name in added for i in layer.nodes)
        fixed.append(dataclasses.replace(layer, name=old.name,
                                         rows=None if touched else old.rows))
    qgraph = dataclasses.replace(qgraph, layers=tuple(fixed))
    variant = Prepared(model=qmodel, graph=qgraph, path=None, base_dir=None, stats=stats,
                       shapes=prepared.shapes, folded=prepared.folded)
    return QuantizedModel(variant, layers, {k: tuple(v) for k, v in sorted(int8.items())}, key)


def _write_types(model: onnx.ModelProto, label: str) -> None:
    """Inferred types of every node output (the Q/DQ outputs the quantiser adds have
    none), as the layer graph needs a static shape for each cut tensor."""
    types, _ = infer_types(model, label)
    g = model.graph
    outputs = {o.name for o in g.output}
    inits = {t.name for t in g.initializer}
    del g.value_info[:]
    for node in g.node:
        for o in node.output:
            if o and o in types and o not in outputs and o not in inits:
                g.value_info.add(name=o).type.CopyFrom(types[o])


def _float_name(q_input: str, outputs: set[str]) -> str:
    """The model's name of the float tensor a Q reads: a model output the quantiser
    renamed (``X_QuantizeLinear_Input``) is ``X`` again after its DQ."""
    suffix = "_QuantizeLinear_Input"
    if q_input.endswith(suffix) and q_input[: -len(suffix)] in outputs:
        return q_input[: -len(suffix)]
    return q_input


def _localise(g: onnx.GraphProto, nodes: list[onnx.NodeProto], original: list[bool],
              needs: Mapping[int, set[int]], layer_of_name: Mapping[str, int]
              ) -> tuple[list[onnx.NodeProto], list[int]]:
    """The node list with a copy of each new node per further layer that needs it, in a
    topological order grouped by layer; and the layer of each node."""
    types = {vi.name: vi for vi in g.value_info}
    copy_of: dict[tuple[str, int], str] = {}
    out: list[tuple[int, float, onnx.NodeProto]] = []
    for i, n in enumerate(nodes):
        if original[i]:
            k = layer_of_name[n.name]
            _rewire(n, copy_of, k)
            out.append((k, float(i), n))
            continue
        need = sorted(needs[i])
        home = need[0]  # keeps the names (a model output's DQ: its producer's layer)
        for k in need:
            node = n if k == home else _clone(n, k, copy_of, types, g)
            _rewire(node, copy_of, k)
            out.append((k, i + (0.0 if k == home else 0.5), node))
    out.sort(key=lambda t: (t[0], t[1]))
    return [n for _, _, n in out], [k for k, _, _ in out]


def _clone(n: onnx.NodeProto, k: int, copy_of: dict[tuple[str, int], str],
           types: Mapping[str, onnx.ValueInfoProto], g: onnx.GraphProto) -> onnx.NodeProto:
    clone = onnx.NodeProto()
    clone.CopyFrom(n)
    for j, o in enumerate(clone.output):
        if o:
            copy_of[(o, k)] = clone.output[j] = f"{o}__layer{k}"
            if o in types:
                vi = g.value_info.add()
                vi.CopyFrom(types[o])
                vi.name = clone.output[j]
    clone.name = f"{n.name}__layer{k}"
    return clone


def _rewire(n: onnx.NodeProto, copy_of: Mapping[tuple[str, int], str], k: int) -> None:
    for j, name in enumerate(n.input):
        if (name, k) in copy_of:
            n.input[j] = copy_of[(name, k)]


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
        self.samples = _samples(inputs)
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

    def noise(self, layers: Sequence[int] | QuantizedModel) -> float:
        """rho of the variant with ``layers`` quantised (no layer: 0.0 without running)."""
        variant = layers if isinstance(layers, QuantizedModel) else (
            quantize_model(self.prepared, layers, self.calibration) if layers else None)
        if variant is None or not variant.layers:
            return 0.0
        return noise_of(self.reference, self.outputs(variant))


def measure_noise(prepared: PreparedModel, layers: Sequence[int] | QuantizedModel,
                  inputs: Mapping[str, np.ndarray],
                  calibration: Mapping[str, np.ndarray] | None = None) -> float:
    """QUANT's rho of the model with ``layers`` quantised, on ``inputs`` (calibration
    format: a leading sample axis), ORT running the float and the quantised model.
    ``calibration`` defaults to ``inputs`` (not needed when a variant is given)."""
    return NoiseMeter(prepared, inputs, calibration if calibration is not None else inputs
                      ).noise(layers)
