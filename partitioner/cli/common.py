"""Options and helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from partitioner.errors import fail

__all__ = ["add_model_options", "parse_shapes", "print_json", "progress_enabled"]


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``MODEL``, ``--shape NAME=D0,D1,...`` (repeatable) and ``--granularity``."""
    parser.add_argument("model", metavar="MODEL", help="an .onnx file")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...",
                        help="fix the dynamic dimensions of an input (repeatable)")
    parser.add_argument("--granularity", choices=("major", "node"), default="major",
                        help="partition points between major layers (default) or every node")


def parse_shapes(items: list[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``--shape`` values; a malformed one is a user error naming it."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        if not sep or not name:
            fail(f"--shape {item!r}: expected NAME=D0,D1,...")
        try:
            values = tuple(int(d) for d in dims.split(","))
        except ValueError:
            fail(f"--shape {item!r}: dimensions must be integers")
        if any(v <= 0 for v in values):
            fail(f"--shape {item!r}: dimensions must be positive")
        shapes[name] = values
    return shapes


def print_json(doc: Any) -> None:
    """One JSON document on stdout, nothing else."""
    json.dump(doc, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars go to stderr, only when it is a terminal and ``--quiet`` is not set."""
    return sys.stderr.isatty() and not getattr(args, "quiet", False)
