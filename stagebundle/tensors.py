"""The tensors of a bundle manifest: :class:`TensorSpec` (a tensor crossing a boundary)
and the sends (:class:`Send` of :class:`Piece` s) that route them between units.

Read and written by :mod:`stagebundle.manifest` (re-exported there, the names its
importers use); see its module doc for the terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stagebundle.dtypes import is_known_dtype, nbytes
from stagebundle.errors import fail
from stagebundle.fields import (
    Endpoint,
    Rows,
    as_endpoint,
    as_int,
    as_list,
    as_rows,
    as_str,
    required,
)

__all__ = ["MAX_TENSOR_BYTES", "TensorSpec", "Piece", "Send", "tensor_list", "send_list"]

# A declared tensor sizes a worker's receive buffers: bound it so that a manifest cannot
# make a worker accept (or allocate) an absurd body. 4 GiB is far above any activation of
# the models this project targets (ViT-B/16's largest is 2.4 MB at batch 1).
MAX_TENSOR_BYTES = 1 << 32


@dataclass(frozen=True)
class TensorSpec:
    """A tensor crossing a boundary: name, static shape, dtype name.

    Attributes:
        source: where it comes from (JSON ``from``): a stage id or ``"input"``; None for
            the model's own lists and for outputs.
        targets: where it goes (JSON ``to``): stage ids and/or ``"output"``.
        transfer: ``"direct"`` or ``"forwarded"`` for a routed input, else None.
        rows: the rows of the full tensor's height axis (axis 2) this spec covers (its
            ``shape`` is then the sliced shape); None for the whole tensor.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: Endpoint | None = None
    targets: tuple[Endpoint, ...] = ()
    transfer: str | None = None
    rows: Rows | None = None

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "shape": list(self.shape),
                               "dtype": self.dtype}
        if self.source is not None:
            doc["from"] = self.source
        if self.transfer is not None:
            doc["transfer"] = self.transfer
        if self.targets:
            doc["to"] = list(self.targets)
        if self.rows is not None:
            doc["rows"] = list(self.rows)
        return doc

    @staticmethod
    def from_json(doc: Any, where: str = "tensor") -> TensorSpec:
        name = as_str(required(doc, "name", where), f"{where}: name")
        where = f"{where} {name!r}"
        shape = as_list(required(doc, "shape", where), f"{where}: shape")
        shape_t = tuple(as_int(d, f"{where}: shape") for d in shape)
        dtype = required(doc, "dtype", where)
        if not is_known_dtype(dtype):
            fail(f"{where}: unknown dtype {dtype!r}")
        if len(shape_t) > 16 or nbytes(shape_t, dtype) > MAX_TENSOR_BYTES:
            fail(f"{where}: shape {list(shape_t)} declares more than {MAX_TENSOR_BYTES} bytes "
                 f"(or over 16 dimensions)")
        src = doc.get("from")
        transfer = doc.get("transfer")
        if transfer not in (None, "direct", "forwarded"):
            fail(f"{where}: transfer {transfer!r} is not 'direct' or 'forwarded'")
        rows = as_rows(doc.get("rows"), where)
        if rows is not None and (len(shape_t) < 3 or shape_t[2] != rows[1] - rows[0] + 1):
            fail(f"{where}: rows {list(rows)} do not match the height of shape "
                 f"{list(shape_t)}")
        return TensorSpec(str(name), shape_t, str(dtype),
                          None if src is None else as_endpoint(src, where),
                          tuple(as_endpoint(t, where) for t in as_list(doc.get("to", []), where)),
                          transfer, rows)


def tensor_list(docs: Any, where: str) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_json(d, where) for d in as_list(docs, where))


@dataclass(frozen=True)
class Piece:
    """One tensor of a send: the whole tensor (``rows`` None) or rows of its height."""

    name: str
    rows: Rows | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "rows": None if self.rows is None else list(self.rows)}


@dataclass(frozen=True)
class Send:
    """What one unit sends to another unit (key) or to ``"output"``, as one frame."""

    to: str
    tensors: tuple[Piece, ...]

    def to_json(self) -> dict[str, Any]:
        return {"to": self.to, "tensors": [p.to_json() for p in self.tensors]}

    @staticmethod
    def from_json(doc: Any, where: str) -> Send:
        to = as_str(required(doc, "to", where), f"{where}: to")
        pieces = []
        for p in as_list(required(doc, "tensors", where), f"{where}: tensors"):
            name = as_str(required(p, "name", where), f"{where}: tensor name")
            pieces.append(Piece(str(name), as_rows(p.get("rows"), f"{where} {name!r}")))
        return Send(str(to), tuple(pieces))


def send_list(docs: Any, where: str) -> tuple[Send, ...]:
    return tuple(Send.from_json(d, f"{where} send") for d in as_list(docs, f"{where}: sends"))
