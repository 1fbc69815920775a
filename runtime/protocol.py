"""The framed binary protocol the workers and the executor speak over TCP.

A frame is a fixed 20-byte prefix, a small UTF-8 JSON header and a body of raw tensor
bytes::

    magic b"DNNP" | version u8 | flags u8 | reserved u16 | header_len u32 | body_len u64
    header (JSON object, header_len bytes)
    body   (body_len bytes; each tensor at a 64-byte aligned offset)

The header lists the tensors (``name``, ``dtype``, ``shape``, ``offset``, ``nbytes``), so the
receiver can turn the body into numpy arrays (views of the receive buffer) without a copy. Nothing
is ever unpickled: the only decoder is ``json.loads`` plus a numpy view on a whitelisted
dtype. Every field is checked before a tensor is built (see :func:`decode_tensors`), and the
prefix is checked against the receiver's size caps *before* any header or body byte is read,
so an oversized message costs the receiver nothing.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MAGIC",
    "VERSION",
    "PREFIX",
    "ALIGN",
    "DTYPES",
    "MAX_HEADER",
    "ProtocolError",
    "Frame",
    "pack_prefix",
    "unpack_prefix",
    "encode",
    "parse_header",
    "decode_tensors",
    "ensure_request",
]

MAGIC = b"DNNP"
VERSION = 1
PREFIX = struct.Struct("!4sBBHIQ")
ALIGN = 64  # tensor offsets are aligned so ORT and numpy get well-aligned buffers
MAX_HEADER = 256 * 1024  # routes, ids and timings are small; anything larger is refused

# Tensor element types that may cross the wire (numpy names, as in the manifest).
DTYPES: frozenset[str] = frozenset({
    "float16", "float32", "float64", "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64", "bool",
})
_MAX_RANK = 16
# dtype objects by name and names by dtype: ``arr.dtype.name`` and ``np.dtype(name)`` are
# microseconds each, a noticeable part of a ~0.1 ms hop
_DTYPE = {name: np.dtype(name) for name in DTYPES}
_NAME = {dtype: name for name, dtype in _DTYPE.items()}  # native byte order only


def _not_json(value: object) -> Any:
    raise TypeError(f"{value.__class__.__name__} in a frame header is not JSON")


# One compact JSON encoder and scanner, made once: ``json.dumps`` / ``json.loads`` build
# theirs per call (a few microseconds each of a ~0.1 ms hop). Without the C accelerator
# (never in CPython) the stock functions are used.
_C_ENCODE = json.encoder.c_make_encoder and json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, _not_json, json.encoder.encode_basestring_ascii, None, ":", ",", False, False,
    True)
_JSON = json.JSONEncoder(separators=(",", ":"))
_SCAN = json.scanner.c_make_scanner and json.scanner.c_make_scanner(  # type: ignore[attr-defined]
    json.JSONDecoder())


def _dumps(doc: Mapping[str, Any]) -> bytes:
    if _C_ENCODE:
        return "".join(_C_ENCODE(doc, 0)).encode()
    return _JSON.encode(doc).encode()


def _loads(text: str) -> Any:
    if _SCAN:
        try:
            doc, end = _SCAN(text, 0)
        except StopIteration:
            raise json.JSONDecodeError("no JSON value", text, 0) from None
        if end == len(text):
            return doc
    return json.loads(text)  # trailing text (or no scanner): the stock path decides


class ProtocolError(Exception):
    """A malformed, oversized or truncated frame (``code`` says which kind)."""

    def __init__(self, message: str, code: str = "malformed") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Frame:
    """A decoded frame: the header and its tensors (views into ``body``)."""

    header: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    body_len: int = 0


def pack_prefix(header_len: int, body_len: int) -> bytes:
    """The 20-byte prefix of a frame."""
    return PREFIX.pack(MAGIC, VERSION, 0, 0, header_len, body_len)


def unpack_prefix(data: bytes | bytearray, max_header: int, max_body: int) -> tuple[int, int]:
    """Check a prefix against the receiver's caps; returns ``(header_len, body_len)``."""
    magic, version, _flags, _reserved, header_len, body_len = PREFIX.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a runtime frame")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if header_len == 0 or header_len > max_header:
        raise ProtocolError(f"header of {header_len} B exceeds the cap of {max_header} B",
                            "too_large")
    if body_len > max_body:
        raise ProtocolError(f"body of {body_len} B exceeds the cap of {max_body} B",
                            "too_large")
    return header_len, body_len


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


_PAD = bytes(ALIGN)


def encode(header: Mapping[str, Any],
           tensors: Mapping[str, np.ndarray] | None = None) -> list[memoryview | bytes]:
    """Buffers to send for one frame (prefix + header, then tensor data, no copies).

    ``header["tensors"]`` is filled in from ``tensors``; every array is made C-contiguous
    (a copy only when it is not already).
    """
    descs: list[dict[str, Any]] = []
    chunks: list[memoryview | bytes] = []
    offset = 0
    for name, value in (tensors or {}).items():
        arr = np.asarray(value)
        if not arr.flags.c_contiguous:  # (ascontiguousarray would make a 0-d array 1-d)
            arr = np.ascontiguousarray(arr)
        dtype = _NAME.get(arr.dtype)
        if dtype is None:
            if arr.dtype.name not in DTYPES:
                raise ProtocolError(f"tensor {name!r}: dtype {arr.dtype} cannot be sent")
            arr = arr.astype(arr.dtype.newbyteorder("="))  # the wire is native order
            dtype = arr.dtype.name
        start = _align(offset)
        if start > offset:
            chunks.append(_PAD[: start - offset])
        descs.append({"name": name, "dtype": dtype, "shape": list(arr.shape),
                      "offset": start, "nbytes": arr.nbytes})
        if arr.nbytes:
            chunks.append(arr.data.cast("B"))
        offset = start + arr.nbytes
    doc = dict(header)
    doc["tensors"] = descs
    head = _dumps(doc)
    return [pack_prefix(len(head), offset) + head, *chunks]


def parse_header(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The JSON header of a frame; anything but a JSON object is malformed."""
    try:
        doc = _loads(str(data, "utf-8"))
    # (ValueError: also an integer of more digits than Python converts, 4300 by default)
    except (ValueError, RecursionError) as err:
        raise ProtocolError(f"header is not valid JSON ({err.__class__.__name__})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("header is not a JSON object")
    return doc


def decode_tensors(header: Mapping[str, Any], body: np.ndarray | bytearray | memoryview,
                   ) -> dict[str, np.ndarray]:
    """Arrays described by ``header["tensors"]``, as zero-copy views of ``body``.

    ``body`` is the receive buffer: a 1-d ``uint8`` array (what the transport reads into)
    or any bytes-like object.

    Raises:
        ProtocolError: a descriptor is malformed, names an unknown dtype, disagrees with its
            byte length, overlaps another or runs past the body.
    """
    descs = header.get("tensors", [])
    if not isinstance(descs, list):
        raise ProtocolError("header field 'tensors' is not a list")
    out: dict[str, np.ndarray] = {}
    if not isinstance(body, np.ndarray):
        body = np.frombuffer(body, dtype=np.uint8)
    end_prev = 0
    for desc in descs:
        if type(desc) is not dict:
            raise ProtocolError("tensor descriptor is not an object")
        name, dtype = desc.get("name"), desc.get("dtype")
        shape, offset, nbytes = desc.get("shape"), desc.get("offset"), desc.get("nbytes")
        if type(name) is not str or not name or name in out:
            raise ProtocolError(f"tensor name {name!r} is missing or repeated")
        np_dtype = _DTYPE.get(dtype) if type(dtype) is str else None
        if np_dtype is None:
            raise ProtocolError(f"tensor {name!r}: dtype {dtype!r} is not allowed")
        # (JSON gives plain ints: ``type(d) is int`` also refuses true/false)
        if (type(shape) is not list or len(shape) > _MAX_RANK
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}")
        if type(offset) is not int or type(nbytes) is not int or offset < 0 or nbytes < 0:
            raise ProtocolError(f"tensor {name!r}: bad offset/nbytes")
        if math.prod(shape) * np_dtype.itemsize != nbytes:
            raise ProtocolError(f"tensor {name!r}: {nbytes} B does not match shape {shape} "
                                f"of {dtype}")
        if offset < end_prev or offset + nbytes > len(body):
            raise ProtocolError(f"tensor {name!r}: bytes {offset}..{offset + nbytes} outside "
                                f"the body or overlapping", "truncated")
        if nbytes == 0:
            try:  # a zero-size shape may still have dimensions numpy cannot hold
                out[name] = np.empty(shape, dtype=np_dtype)
            except ValueError:
                raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}") from None
        else:
            out[name] = body[offset:offset + nbytes].view(np_dtype).reshape(shape)
        end_prev = offset + nbytes
    return out


def ensure_request(plan: str, manifest: Mapping[str, Any], token: str | None) -> dict[str, Any]:
    """The header asking a worker to hold plan ``plan``'s units (``runtime.build``):
    ``{"type": "ensure", "plan": KEY, "manifest": {...}, "token": ...}``, no body.

    The manifest (unit specs and SHA-256s, no weights) travels in the header, so it must
    fit :data:`MAX_HEADER` with the rest.
    """
    header = {"type": "ensure", "plan": plan, "manifest": dict(manifest), "token": token}
    size = len(_dumps(header))
    if size > MAX_HEADER:
        raise ProtocolError(f"plan {plan}: its manifest is {size} B, more than a frame "
                            f"header may hold ({MAX_HEADER} B)", code="too_large")
    return header
