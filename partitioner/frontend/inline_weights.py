"""Read an ``.onnx`` file without copying its big inline weights into memory.

``onnx.load`` reads the whole file into one byte string and parses it: for a model whose
weights are inline, the bytes and the parsed proto are both held (2x the model for a
moment) and the proto keeps every weight for as long as the model lives (upb frees a
message's memory only with the whole message, not when a field is cleared:
benchmarks/compile_memory.py, issue 16). :func:`read_model` instead walks the file's
protobuf fields and parses them piece by piece, and leaves the bytes of every top-level
initialiser larger than :data:`LAZY_MIN_BYTES` in the file: such a tensor becomes an
*inline reference*, an external-data entry (``location`` = the model file itself,
``offset``, ``length``) marked with :data:`INLINE_KEY`. Everything that reads weights
already resolves external data against the model's folder (``PreparedModel.base_dir``);
the stage writer (:mod:`partitioner.frontend.stagefile`) writes an inline reference back
*inline*, byte for byte as the eagerly loaded tensor, so bundles do not change.

The result equals ``onnx.load(path, load_external_data=False)`` except for those tensors
(a repeated or split message field is merged by protobuf exactly as one occurrence is).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError
from onnx import ModelProto, TensorProto

from partitioner.frontend.tensors import tensor_nbytes

__all__ = ["read_model", "is_inline_ref", "encode_varint", "INLINE_KEY", "LAZY_MIN_BYTES",
           "MODEL_GRAPH", "GRAPH_INITIALIZER", "TENSOR_RAW_DATA"]

# Not below inference._SKELETON_MAX_BYTES: shape inference reads the values of smaller
# initialisers (Reshape targets, pads), larger ones it sees as typed inputs either way. The
# constant folder reads inline references from the file (prepare._constant_values).
LAZY_MIN_BYTES = 64 << 10
# The external-data key that marks an inline reference (never written to a bundle file:
# the stage writer rewrites every external-data entry).
INLINE_KEY = "partitioner.inline"
_BATCH = 4 << 20  # merge small fields in batches of this many bytes
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9  # field numbers in onnx.proto
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


class _Unsupported(Exception):
    """A wire type this reader does not walk (groups): the caller parses eagerly."""


def encode_varint(n: int) -> bytes:
    """``n`` as a protobuf varint."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class _Reader:
    """Protobuf wire fields of a file, read from a position it keeps itself."""

    def __init__(self, f: BinaryIO, size: int) -> None:
        self.f, self.size, self.pos = f, size, 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise DecodeError("truncated message")
        self.pos += n
        return data

    def seek(self, pos: int) -> None:
        if pos > self.size:
            raise DecodeError("truncated message")
        self.f.seek(pos)
        self.pos = pos

    def varint(self) -> tuple[int, bytes]:
        raw = bytearray()
        while True:
            b = self.read(1)
            raw += b
            if not b[0] & 0x80:
                break
            if len(raw) > 10:
                raise DecodeError("bad varint")
        value = 0
        for i, byte in enumerate(raw):
            value |= (byte & 0x7F) << (7 * i)
        return value, bytes(raw)

    def key(self) -> tuple[int, int, bytes]:
        key, raw = self.varint()
        wire = key & 7
        if wire in (3, 4):
            raise _Unsupported("group")
        if wire not in (_VARINT, _FIXED64, _LEN, _FIXED32) or key >> 3 == 0:
            raise DecodeError(f"bad wire type {wire} or field number 0")
        return key >> 3, wire, raw

    def length(self) -> tuple[int, bytes]:
        n, raw = self.varint()
        if self.pos + n > self.size:
            raise DecodeError("truncated message")
        return n, raw

    def value(self, wire: int) -> bytes:
        """The encoded value of a field (after its key)."""
        if wire == _VARINT:
            return self.varint()[1]
        if wire == _FIXED64:
            return self.read(8)
        if wire == _FIXED32:
            return self.read(4)
        n, raw = self.length()
        return raw + self.read(n)


def is_inline_ref(t: TensorProto) -> bool:
    """Whether ``t`` is an inline reference (its bytes left in its model file)."""
    return t.data_location == TensorProto.EXTERNAL and any(
        e.key == INLINE_KEY for e in t.external_data)


def read_model(path: str | os.PathLike[str], *, lazy: bool = True) -> ModelProto:
    """The model in ``path``; with ``lazy``, its top-level initialisers above
    :data:`LAZY_MIN_BYTES` left in the file as inline references, the file parsed piece
    by piece, so its bytes and the parsed model are never held together.

    Without ``lazy`` it is ``onnx.load`` (no external data): one C-level parse of the
    file's bytes, 2x the model in memory for a moment. ``partitioner plan``, ``compile``
    and ``profile`` read lazily (AlexNet, 244 MB: 0.19 s against ``onnx.load``'s 0.45 s;
    ``plan`` on VGG-16 peaks at 54 MiB instead of 1.1 GiB, benchmarks/README.md 14.1).

    Raises:
        DecodeError: the file is truncated or not protobuf; OSError: unreadable.
    """
    path = Path(path)
    if not lazy:
        return onnx.load(str(path), load_external_data=False)
    threshold = LAZY_MIN_BYTES
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            return _walk(_Reader(f, os.fstat(f.fileno()).st_size), path.resolve().name,
                         threshold)
    except _Unsupported:
        return onnx.load(str(path), load_external_data=False)


def _walk(r: _Reader, location: str, threshold: int) -> ModelProto:
    model = ModelProto()
    batch = bytearray()
    while r.pos < r.size:
        field, wire, key = r.key()
        if field == MODEL_GRAPH and wire == _LEN:
            if batch:
                model.MergeFromString(bytes(batch))
                batch.clear()
            n, _ = r.length()
            _walk_graph(r, r.pos + n, model, location, threshold)
        else:
            batch += key + r.value(wire)
    if batch:
        model.MergeFromString(bytes(batch))
    return model


def _walk_graph(r: _Reader, end: int, model: ModelProto, location: str,
                threshold: int) -> None:
    """Merge one ``graph`` field (ending at ``end``) into ``model``, in batches."""
    batch = bytearray()

    def merge() -> None:
        model.MergeFromString(encode_varint(MODEL_GRAPH << 3 | _LEN)
                              + encode_varint(len(batch)) + bytes(batch))
        batch.clear()

    merged = False
    while r.pos < end:
        field, wire, key = r.key()
        if field == GRAPH_INITIALIZER and wire == _LEN:
            n, length_raw = r.length()
            start = r.pos
            stub = _inline_ref(r, start + n, location) if n > threshold else None
            if stub is None:
                r.seek(start)
                batch += key + length_raw + r.read(n)
            else:
                encoded = stub.SerializeToString()
                batch += key + encode_varint(len(encoded)) + encoded
        else:
            batch += key + r.value(wire)
        if len(batch) >= _BATCH:
            merge()
            merged = True
    if r.pos != end:
        raise DecodeError("truncated message")
    if batch or not merged:  # an empty graph field still sets the graph
        merge()


def _inline_ref(r: _Reader, end: int, location: str) -> TensorProto | None:
    """The tensor ending at ``end`` with its ``raw_data`` left in the file, or None when
    it is not a plain raw tensor (read it eagerly then)."""
    meta = bytearray()
    raw: tuple[int, int] | None = None
    while r.pos < end:
        field, wire, key = r.key()
        if field == TENSOR_RAW_DATA and wire == _LEN:
            if raw is not None:
                return None
            n, _ = r.length()
            raw = (r.pos, n)
            r.seek(r.pos + n)
        else:
            meta += key + r.value(wire)
    if r.pos != end or raw is None:
        return None
    t = TensorProto()
    t.ParseFromString(bytes(meta))
    if (t.HasField("data_location") or len(t.external_data)
            or t.data_type == TensorProto.STRING
            or tensor_nbytes(tuple(int(d) for d in t.dims), t.data_type) != raw[1]):
        return None
    for k, v in (("location", location), ("offset", str(raw[0])), ("length", str(raw[1])),
                 (INLINE_KEY, "1")):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    t.data_location = TensorProto.EXTERNAL
    return t
