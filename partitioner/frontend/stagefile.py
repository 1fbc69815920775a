"""Writing stage models to disk (or bytes) without holding a second copy of them.

A stage is a weight-less *shell* (nodes, inputs, outputs, value infos) plus the source
model's own initialiser messages. :func:`save_split` writes them one tensor at a time:
into a data file next to the ``.onnx`` file (external weights copied chunk by chunk from
their source file), or after the graph in the ``.onnx`` file itself
(:func:`write_inline`: protobuf merges a message field that occurs twice). Two upb costs
are avoided on the way, both measured on vgg16's 392 MB ``classifier.0.weight``:
``TensorProto.ByteSize()`` encodes the message to size it (+799 MB for a moment) and
``ListFields()`` materialises ``raw_data`` (+399 MB); sizes come from the dims instead and
fields are copied by descriptor.

An *inline reference* (:mod:`partitioner.frontend.inline_weights`: a big inline weight the
loader left in the model file) is written back inline, byte for byte as the tensor it
stands for, its bytes copied chunk by chunk from the model file; into a data file like any
external tensor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from onnx import ModelProto, TensorProto

from partitioner.errors import InternalError, fail
from partitioner.frontend.inline_weights import (
    GRAPH_INITIALIZER,
    MODEL_GRAPH,
    TENSOR_RAW_DATA,
    encode_varint,
    is_inline_ref,
)
from partitioner.frontend.tensors import tensor_nbytes
from stagebundle.load import iter_tensors

__all__ = [
    "is_external",
    "uses_external_data",
    "save_model",
    "save_split",
    "write_inline",
    "inline_model",
    "load_externals",
    "checkable",
    "stored_externally",
    "loaded",
    "location_problem",
]

# Tensors at least this big go to the external data file when a stage is saved with one;
# smaller ones stay in the protobuf (the same default as onnx.save's size_threshold).
_EXTERNAL_THRESHOLD = 1024
# Copy external bytes in chunks so a multi-GB tensor never sits in memory whole.
_CHUNK = 16 << 20
# Stay clear of protobuf's 2 GiB hard limit when deciding that weights must go external.
_PROTO_LIMIT = 1_800_000_000


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def uses_external_data(model: ModelProto) -> bool:
    """Whether any tensor of ``model`` is stored as external data (inline references
    included: their bytes too are resolved against the model's folder)."""
    return any(is_external(t) for t in iter_tensors(model))


def stored_externally(t: TensorProto) -> bool:
    """External data proper: an inline reference is an inline tensor of its model file."""
    return is_external(t) and not is_inline_ref(t)


def _external_fields(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def location_problem(location: str) -> str | None:
    """Why an external-data ``location`` cannot name a file in the model's folder (None:
    it can). Checked by name, as ONNX does: absolute paths and ``..`` are refused (they
    would read any file of the host into a stage); a symlink in the folder is followed."""
    pure = PurePosixPath(location)
    if not location:
        return "is missing"
    if pure.is_absolute() or Path(location).is_absolute() or "\\" in location:
        return "must be a path relative to the model's folder"
    if ".." in pure.parts:
        return "leaves the model's folder ('..')"
    return None


def _resolve(base_dir: Path | None, location: str, tensor: str) -> Path:
    problem = location_problem(location)
    if problem is not None:
        fail(f"tensor {tensor!r}: external data location {location!r} {problem}")
    if base_dir is None:
        fail(f"tensor {tensor!r}: stored as external data ({location!r}) but the model's "
             f"folder is unknown")
    path = (base_dir / location)
    if not path.is_file():
        fail(f"tensor {tensor!r}: external data file {str(path)!r} not found")
    return path


def _copy_range(src: Path, offset: int, length: int | None, dst: Any) -> int:
    """Append ``length`` bytes of ``src`` from ``offset`` to the open file ``dst``."""
    copied = 0
    with open(src, "rb") as f:
        f.seek(offset)
        while length is None or copied < length:
            want = _CHUNK if length is None else min(_CHUNK, length - copied)
            chunk = f.read(want)
            if not chunk:
                break
            dst.write(chunk)
            copied += len(chunk)
    if length is not None and copied != length:
        fail(f"external data file {str(src)!r}: expected {length} bytes at offset {offset}, "
             f"found {copied}")
    return copied


def _copy_except(src: Any, dst: Any, skip: str) -> None:
    """Copy every set field of message ``src`` into ``dst`` except field ``skip``.

    Walks the descriptor rather than ``ListFields()``, which would materialise the skipped
    field's value (a copy of a tensor's ``raw_data``).
    """
    for fd in src.DESCRIPTOR.fields:
        if fd.name == skip:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else (
            fd.label == fd.LABEL_REPEATED)  # protobuf < 6 has no is_repeated
        if repeated:
            values = getattr(src, fd.name)
            if len(values):
                getattr(dst, fd.name).extend(values)
        elif src.HasField(fd.name):
            if fd.type == fd.TYPE_MESSAGE:
                getattr(dst, fd.name).CopyFrom(getattr(src, fd.name))
            else:
                setattr(dst, fd.name, getattr(src, fd.name))


def _split(model: ModelProto) -> tuple[ModelProto, list[TensorProto]]:
    """A copy of ``model`` without its top-level initialisers, and those (not copied)."""
    shell = ModelProto()
    _copy_except(model, shell, "graph")
    _copy_except(model.graph, shell.graph, "initializer")
    return shell, list(model.graph.initializer)


def save_model(model: ModelProto, path: str | os.PathLike[str], *, base_dir: Path | None = None,
               external_data: str | None = None) -> None:
    """Save a (stage) model atomically, streaming its weights.

    Args:
        model: the model; tensors stored as external data resolve against ``base_dir``.
        path: the ``.onnx`` file to write.
        base_dir: folder of the source model's external data files.
        external_data: file name (next to ``path``) for the weights. When None, weights are
            embedded unless the model already uses external data or would exceed protobuf's
            2 GB limit, in which case ``<file>.data`` is used.

    The model passed in is not modified nor copied: each weight is written on its own
    (external ones chunk by chunk from their source file), so the memory this needs is
    one tensor, not the model.
    """
    shell, weights = _split(model)
    save_split(shell, weights, path, base_dir=base_dir, external_data=external_data)


def save_split(shell: ModelProto, weights: Sequence[TensorProto], path: str | os.PathLike[str], *,
          base_dir: Path | None, external_data: str | None) -> None:
    path = Path(path)
    if external_data is None and (
            uses_external_data(shell) or any(stored_externally(t) for t in weights)
            or shell.ByteSize() + sum(_encoded_size(t) for t in weights) > _PROTO_LIMIT):
        external_data = path.name + ".data"
    out = ModelProto()
    out.CopyFrom(shell)  # nodes and value infos only: the weights are written one by one
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        with open(tmp_dir / path.name, "wb") as f:
            if external_data is None:
                write_inline(out, weights, f, base_dir=base_dir)
            else:
                if Path(external_data).name != external_data:
                    raise InternalError(f"external data name {external_data!r} must be a "
                                        f"file name")
                with open(tmp_dir / external_data, "wb") as data:
                    _write_external(out, data, base_dir, external_data)
                    for t in weights:
                        out.graph.initializer.append(
                            _externalised(t, data, base_dir, external_data))
                f.write(out.SerializeToString())
        if external_data is not None:
            os.replace(tmp_dir / external_data, path.parent / external_data)
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _field(number: int, size: int) -> bytes:
    """Key and length of a length-delimited protobuf field of ``size`` bytes."""
    return encode_varint(number << 3 | 2) + encode_varint(size)


def _meta(t: TensorProto) -> TensorProto:
    """``t`` without its ``raw_data`` (name, type, dims, external-data entries); for an
    inline reference, the tensor it stands for without ``raw_data``."""
    meta = TensorProto()
    _copy_except(t, meta, "raw_data")
    if is_inline_ref(t):  # the loader added exactly these two fields (inline_weights)
        meta.ClearField("external_data")
        meta.ClearField("data_location")
    return meta


def _raw_size(t: TensorProto) -> int | None:
    """Bytes of ``t.raw_data`` from its dims and type, without reading it (None: no raw;
    an inline reference has raw bytes, in its model file)."""
    if not t.HasField("raw_data") and not is_inline_ref(t):
        return None
    return tensor_nbytes(tuple(int(d) for d in t.dims), t.data_type)


def _ref_range(t: TensorProto, base_dir: Path | None) -> tuple[Path, int, int]:
    """Source file, offset and length of an external tensor's bytes."""
    fields = _external_fields(t)
    src = _resolve(base_dir, fields.get("location", ""), t.name)
    return src, int(fields.get("offset", 0)), int(fields["length"])


def checkable(shell: ModelProto, weights: Sequence[TensorProto], stand_in: str) -> ModelProto:
    """``shell`` plus ``weights`` whose raw payloads are left out, for the ONNX checker.

    Each raw payload becomes an external-data entry pointing at the file ``stand_in``
    (offset 0, its length): the checker only requires that such a file exists, and reads
    every tensor's metadata as it would inline. Checking this instead of an inline unit
    file spares the checker loading the file's weights (the file's bytes and the parsed
    model, twice the unit for a moment: issue 16); the sizes of the payloads hold by
    construction (:func:`write_inline` refuses a ``raw_data`` that disagrees with its dims).
    """
    out = ModelProto()
    out.CopyFrom(shell)
    for t in weights:
        stub = out.graph.initializer.add()
        raw = _raw_size(t)
        if raw is None:  # typed fields or external data: small, as they are
            stub.CopyFrom(t)
            continue
        stub.CopyFrom(_meta(t))
        for key, value in (("location", stand_in), ("offset", "0"), ("length", str(raw))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        stub.data_location = TensorProto.EXTERNAL
    return out


def _encoded_size(t: TensorProto) -> int:
    """Serialised size of ``t``. Not ``t.ByteSize()``: upb computes that by encoding the
    message, which holds a big tensor twice over for a moment."""
    raw = _raw_size(t)
    if raw is None:
        return int(t.ByteSize())
    return int(_meta(t).ByteSize()) + len(_field(TENSOR_RAW_DATA, raw)) + raw


def write_inline(shell: ModelProto, weights: Sequence[TensorProto], f: Any, *,
                 base_dir: Path | None = None) -> None:
    """The model ``shell`` plus ``weights`` as its graph's initialisers, one at a time.

    Protobuf merges a message field that occurs twice (and concatenates repeated fields),
    so the weights go in a second ``graph`` field after the shell; every parser reads the
    file as the one model, and only one tensor is ever held in a second copy (an inline
    reference's bytes are copied from its model file in ``base_dir``, none held).
    """
    f.write(shell.SerializeToString())
    if not weights:
        return
    sizes = [_encoded_size(t) for t in weights]
    body = sum(len(_field(GRAPH_INITIALIZER, n)) + n for n in sizes)
    f.write(_field(MODEL_GRAPH, body))
    for t, n in zip(weights, sizes, strict=True):
        f.write(_field(GRAPH_INITIALIZER, n))
        if is_inline_ref(t):
            src, offset, length = _ref_range(t, base_dir)
            f.write(_meta(t).SerializeToString() + _field(TENSOR_RAW_DATA, length))
            _copy_range(src, offset, length, f)
            continue
        if not t.HasField("raw_data"):
            f.write(t.SerializeToString())
            continue
        # the metadata, then raw_data from its one Python copy (SerializeToString of the
        # whole tensor would hold it two more times: upb's buffer and the bytes object)
        raw = t.raw_data
        head = _meta(t).SerializeToString() + _field(TENSOR_RAW_DATA, len(raw))
        if len(head) + len(raw) != n:  # raw_data disagrees with dims: refuse, write nothing
            fail(f"tensor {t.name!r}: raw_data holds {len(raw)} bytes, its dims and type "
                 f"say {_raw_size(t)}")
        f.write(head)
        f.write(raw)
        del raw


def _store(t: TensorProto, data: Any, base_dir: Path | None) -> tuple[int, int] | None:
    """Append the bytes of ``t`` to ``data``; (offset, length), or None if it stays inline."""
    if is_external(t):
        fields = _external_fields(t)
        src = _resolve(base_dir, fields.get("location", ""), t.name)
        length = int(fields["length"]) if "length" in fields else None
        start = data.tell()
        return start, _copy_range(src, int(fields.get("offset", 0)), length, data)
    # from the dims, not len(raw_data): reading raw_data copies the tensor
    raw_size = _raw_size(t)
    if raw_size is None or raw_size < _EXTERNAL_THRESHOLD:
        return None
    start = data.tell()
    raw = t.raw_data
    data.write(raw)
    return start, len(raw)


def _point(t: TensorProto, name: str, start: int, n: int, data: Any) -> None:
    del t.external_data[:]
    for key, value in (("location", name), ("offset", str(start)), ("length", str(n))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    t.data_location = TensorProto.EXTERNAL
    # Keep offsets page-aligned like onnx's own writer (mmap-friendly loaders).
    pad = (-data.tell()) % 4096
    if pad:
        data.write(b"\0" * pad)


def _write_external(model: ModelProto, data: Any, base_dir: Path | None, name: str) -> None:
    """Move every tensor of ``model`` (in place) to the open data file ``data``."""
    for t in iter_tensors(model):
        where = _store(t, data, base_dir)
        if where is not None:
            t.ClearField("raw_data")
            _point(t, name, *where, data)


def _externalised(t: TensorProto, data: Any, base_dir: Path | None, name: str) -> TensorProto:
    """A copy of ``t`` whose bytes went to ``data`` (a plain copy when it stays inline)."""
    stub = TensorProto()
    where = _store(t, data, base_dir)
    if where is None:
        stub.CopyFrom(t)
    else:
        _copy_except(t, stub, "raw_data")
        _point(stub, name, *where, data)
    return stub


def inline_model(model: ModelProto, base_dir: Path | None) -> ModelProto:
    """A copy of ``model`` with every external tensor loaded from ``base_dir``."""
    out = ModelProto()
    out.CopyFrom(model)
    load_externals(out, base_dir)
    return out


def load_externals(model: ModelProto, base_dir: Path | None) -> None:
    for t in _externals(iter_tensors(model)):
        _load_external(t, base_dir)


def loaded(t: TensorProto, base_dir: Path | None) -> TensorProto:
    """``t`` itself, or for an inline reference a copy with its bytes read in (the
    tensor it stands for, field for field)."""
    if not is_inline_ref(t):
        return t
    out = TensorProto()
    out.CopyFrom(t)
    _load_external(out, base_dir)
    return out


def _load_external(t: TensorProto, base_dir: Path | None) -> None:
    """Read an external tensor's bytes into ``t`` (in place)."""
    fields = _external_fields(t)
    src = _resolve(base_dir, fields.get("location", ""), t.name)
    with open(src, "rb") as f:
        f.seek(int(fields.get("offset", 0)))
        length = int(fields["length"]) if "length" in fields else -1
        t.raw_data = f.read(length)
    if length >= 0 and len(t.raw_data) != length:
        fail(f"tensor {t.name!r}: external data file {str(src)!r} holds fewer than the "
             f"{length} bytes at offset {fields.get('offset', 0)}")
    if is_inline_ref(t):  # the tensor it stands for has no data_location field
        t.ClearField("data_location")
    else:
        t.data_location = TensorProto.DEFAULT
    del t.external_data[:]


def _externals(tensors: Iterable[TensorProto]) -> list[TensorProto]:
    return [t for t in tensors if is_external(t)]
