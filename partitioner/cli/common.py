"""Options and helpers shared by the sub-commands."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from partitioner.errors import fail

if TYPE_CHECKING:
    from partitioner.ir import Objective
    from partitioner.pipeline import PlanResult

__all__ = ["add_model_options", "parse_shapes", "print_json", "progress_enabled",
           "add_plan_options", "objective_from_args", "plan_options", "plan_from_args",
           "check_writable", "os_error_line", "stdout_to_stderr"]


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``MODEL``, ``--shape NAME=D0,D1,...`` (repeatable) and ``--granularity``."""
    parser.add_argument("model", metavar="MODEL", help="an .onnx file")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...",
                        help="fix the dynamic dimensions of an input (repeatable)")
    parser.add_argument("--granularity", choices=("major", "node"), default="major",
                        help="partition points between major layers (default) or every node")


# An input of more elements (1 PiB of float32) is a typo; ONNX's dims are int64 anyway.
MAX_SHAPE_ELEMENTS = 1 << 48


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
        if math.prod(values) > MAX_SHAPE_ELEMENTS:
            fail(f"--shape {item!r}: {math.prod(values):.3g} elements, more than any host "
                 f"holds (at most {MAX_SHAPE_ELEMENTS:.3g})")
        if shapes.get(name, values) != values:
            fail(f"--shape {item!r}: input {name!r} is already given as "
                 f"{','.join(map(str, shapes[name]))}")
        shapes[name] = values
    return shapes


def print_json(doc: Any) -> None:
    """One JSON document on stdout, nothing else.

    Flushed here, so that an unwritable stdout (a full disk) fails inside the command,
    as one line and exit 2, not in the interpreter's exit.
    """
    json.dump(doc, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars go to stderr, only when it is a terminal and ``--quiet`` is not set."""
    return sys.stderr.isatty() and not getattr(args, "quiet", False)


# --------------------------------------------------------------------------- plan options
# Shared by ``plan`` and ``compile`` (docs/INTERFACES.md: compile takes "the same
# options as plan"), so the two commands cannot drift apart.

OBJECTIVES = ("latency", "energy", "throughput", "carbon", "weighted")


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    """``MODEL --system ...`` and every option of ``partitioner plan`` except ``--json``."""
    add_model_options(parser)
    parser.add_argument("--system", required=True, metavar="SYSTEM",
                        help="system file (TOML or JSON)")
    parser.add_argument("--profiles", nargs="+", action="extend", default=[],
                        metavar="PROFILE.json", help="measured profiles (several allowed)")
    parser.add_argument("--objective", choices=OBJECTIVES, default="latency",
                        help="what to minimise (default latency)")
    parser.add_argument("--max-latency", type=float, default=None, metavar="S",
                        help="cap on single-inference latency, seconds")
    parser.add_argument("--max-energy", action="append", default=[], metavar="DEVICE=J",
                        help="cap on a device's energy per inference (repeatable)")
    parser.add_argument("--duration", type=float, default=None, metavar="S",
                        help="service duration for the carbon objective, seconds")
    parser.add_argument("--latency-weight", type=float, default=0.5,
                        help="weight of normalised latency (weighted objective)")
    parser.add_argument("--energy-weight", type=float, default=0.5,
                        help="weight of normalised edge energy (weighted objective)")
    parser.add_argument("--private", type=int, default=0, metavar="K",
                        help="pin the first K layers to trusted devices")
    parser.add_argument("--mbs", type=int, default=None, metavar="N",
                        help="maximum bundle size in layers (default: all)")
    parser.add_argument("--preload", action=argparse.BooleanOptionalAction, default=True,
                        help="model weight preloading (ODIWeP; default on)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="S",
                        help="solver time limit, seconds")
    parser.add_argument("--exit", action="append", default=[], dest="exits",
                        metavar="OUTPUT=P|OUTPUT@T",
                        help="an early-exit head: a model output with its exit probability, "
                             "or with a softmax confidence threshold (repeatable; "
                             "docs/EXITS.md)")
    parser.add_argument("--calibration", default=None, metavar="FILE.npz",
                        help="inputs (one array per model input, leading sample axis) that "
                             "measure the probability of --exit OUTPUT@T, and calibrate the "
                             "int8 variants of --quantize and measure their noise (without "
                             "it: seeded random data, noise figures meaningless)")
    parser.add_argument("--spatial", action="store_true",
                        help="a run of row-splittable layers may be split by output rows "
                             "across devices running in parallel (DISTREDGE)")
    parser.add_argument("--max-parts", type=int, default=None, metavar="N",
                        help="the most parts of one split stage (with --spatial; default: "
                             "every device)")
    parser.add_argument("--spatial-baseline", default=None, metavar="NAME",
                        help="plan by a DISTREDGE baseline: offload, equal, proportional, "
                             "coedge or aofl (same cost model)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    quant = parser.add_argument_group("per-layer quantisation (QUANT)")
    quant.add_argument("--quantize", action="store_true",
                       help="the solver may run candidate layers as int8 variants")
    quant.add_argument("--quantize-layers", default=None, metavar="K|NAME,...",
                       help="candidates: the K heaviest layers by FLOPs, or layer names "
                            "(default 12)")
    quant.add_argument("--max-noise", type=float, default=None, metavar="ETA",
                       help="cap on the predicted output noise (mean |o - o_q|); 0: "
                            "nothing int8")


def parse_weights(text: str) -> tuple[float, float]:
    """``--weights T,E``: two non-negative numbers."""
    try:
        w = tuple(float(p) for p in text.split(","))
    except ValueError:
        w = ()
    if len(w) != 2 or any(not x >= 0 for x in w):
        fail(f"--weights {text!r}: expected two non-negative numbers T,E")
    return w[0], w[1]


def objective_from_args(args: argparse.Namespace) -> Objective:
    """The :class:`partitioner.ir.Objective` of the plan options."""
    from partitioner.ir import Objective

    if getattr(args, "weights", None) is not None:
        args.latency_weight, args.energy_weight = parse_weights(args.weights)

    caps: dict[str, float] = {}
    for item in args.max_energy:
        name, sep, value = item.partition("=")
        try:
            caps[name] = float(value)
        except ValueError:
            name = ""
        if not sep or not name:
            fail(f"--max-energy {item!r}: expected DEVICE=JOULES")
    return Objective(kind=args.objective, max_latency=args.max_latency, max_energy=caps,
                     duration=args.duration, latency_weight=args.latency_weight,
                     energy_weight=args.energy_weight, time_limit=args.time_limit,
                     solver=getattr(args, "solver", None) or "CBC")


def plan_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`partitioner.pipeline.plan` for the plan options."""
    if args.mbs is not None and args.mbs < 1:
        fail(f"--mbs must be >= 1, got {args.mbs}")
    calibration = getattr(args, "calibration", None)
    if calibration is not None and not getattr(args, "quantize", False) and not any(
            "@" in e for e in getattr(args, "exits", [])):
        fail(f"--calibration {calibration}: needs --exit OUTPUT@T or --quantize (nothing "
             f"else reads it)")
    return {"profiles": list(args.profiles), "shapes": parse_shapes(args.shape),
            "granularity": args.granularity, "objective": objective_from_args(args),
            "mbs": args.mbs, "preload": args.preload, "private": args.private,
            "exits": list(getattr(args, "exits", [])),
            "calibration": getattr(args, "calibration", None),
            **spatial_options(args), **quantize_options(args)}


def spatial_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--spatial`` / ``--max-parts`` / ``--spatial-baseline`` as keyword arguments."""
    out: dict[str, Any] = {}
    spatial = getattr(args, "spatial", False)
    parts = getattr(args, "max_parts", None)
    baseline = getattr(args, "spatial_baseline", None)
    if parts is not None and not spatial and baseline is None:
        fail(f"--max-parts {parts}: only with --spatial or --spatial-baseline")
    if spatial:
        out["spatial"] = True
    if parts is not None:
        out["max_parts"] = parts
    if baseline is not None:
        out["spatial_baseline"] = baseline
    return out


def quantize_options(args: argparse.Namespace) -> dict[str, Any]:
    """The quantisation keywords of :func:`partitioner.pipeline.plan` (QUANT)."""
    if args.max_noise is not None and not args.max_noise >= 0:
        fail(f"--max-noise {args.max_noise}: must be >= 0")
    if not args.quantize:
        for value, flag in ((args.max_noise, "--max-noise"),
                            (args.quantize_layers, "--quantize-layers")):
            if value is not None:
                fail(f"{flag} needs --quantize")
        return {}
    return {"quantize": True, "quantize_layers": args.quantize_layers,
            "max_noise": args.max_noise}


def plan_from_args(args: argparse.Namespace) -> PlanResult:
    """:func:`partitioner.pipeline.plan` with the plan options of ``args``.

    The solver's C code may log on stdout; it is sent to stderr so that ``--json`` output
    stays one document. The model's big inline weights stay in its file (``lazy_weights``,
    as ``partitioner compile`` loads it): planning reads shapes and sizes, not weight bytes,
    and the plan is the same as from an eager load (tests/test_plan_lazy.py, issue 16).
    """
    from partitioner import pipeline

    options = plan_options(args)
    with stdout_to_stderr():
        return pipeline.plan(args.model, args.system, lazy_weights=True, **options)


# --------------------------------------------------------------------------- outputs


def check_writable(path: str | os.PathLike[str], what: str = "output") -> Path:
    """Fail with one line unless ``path`` can be created (or replaced) by this process.

    Checked before slow work, so that ``-o`` under a file or in a read-only place is
    reported at once. The nearest existing ancestor must be a writable directory; a
    failure to write later (a read-only file system that ``access`` does not see, a full
    disk) is still caught as an ``OSError`` by :func:`partitioner.cli.main`.
    """
    if not str(path):
        fail(f"{what}: the path is empty")
    out = Path(path)
    parent = out.parent if out.parent != Path("") else Path(".")
    ancestor = parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        fail(f"{what} {str(out)!r}: cannot be created, {str(ancestor)!r} is a file, "
             f"not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        fail(f"{what} {str(out)!r}: cannot be created, {str(ancestor)!r} is not writable")
    return out


def os_error_line(err: OSError) -> str:
    """One line for an ``OSError``: what failed on which file."""
    names = [str(n) for n in (err.filename, err.filename2) if n]
    reason = err.strerror or str(err)
    return f"{' -> '.join(repr(n) for n in names)}: {reason}" if names else reason


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Point fd 1 at stderr for the duration (C libraries printing to stdout)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout (embedded use): nothing to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        with contextlib.suppress(Exception):  # flush C stdio buffers (CBC's printf)
            ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
