"""The manifest's JSON fields read and checked: one-line errors naming where.

Part of the bundle schema (:mod:`stagebundle.manifest` re-exports the public names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from stagebundle.errors import fail

INPUT, OUTPUT = "input", "output"

# Where a tensor comes from / goes to: a stage id, the model input, the model output.
Endpoint = int | Literal["input", "output"]
Rows = tuple[int, int]

__all__ = ["INPUT", "OUTPUT", "Endpoint", "Rows", "as_object", "required", "as_int", "as_str",
           "as_list", "as_endpoint", "as_rows"]


def as_object(doc: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        fail(f"{where}: expected an object, found {type(doc).__name__}")
    return doc


def required(doc: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in as_object(doc, where):
        fail(f"{where}: missing required key {key!r}")
    return doc[key]


def as_int(value: Any, where: str, *, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        fail(f"{where}: {value!r} is not an integer >= {minimum}")
    return value


def as_str(value: Any, where: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or "\x00" in value:
        fail(f"{where}: {value!r} is not a non-empty string")
    return value


def as_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        fail(f"{where}: expected a list, found {type(value).__name__}")
    return value


def as_endpoint(value: Any, where: str) -> Endpoint:
    if value in (INPUT, OUTPUT):
        return value  # type: ignore[no-any-return]
    return as_int(value, f"{where}: endpoint")


def as_rows(value: Any, where: str) -> Rows | None:
    if value is None:
        return None
    items = as_list(value, f"{where}: rows")
    if len(items) != 2:
        fail(f"{where}: rows must be [first, last]")
    a, b = (as_int(x, f"{where}: rows") for x in items)
    if a > b:
        fail(f"{where}: rows [{a}, {b}] are empty")
    return a, b
