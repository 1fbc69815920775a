"""``partitioner compile MODEL --system SYSTEM [plan options] -o BUNDLE_DIR``.

Plans exactly like ``partitioner plan`` (same options, same :func:`partitioner.pipeline.plan`)
and writes the deployment bundle: one ONNX file per stage plus ``manifest.json`` (see
:mod:`partitioner.backend.manifest`).
"""

from __future__ import annotations

import argparse

from partitioner.cli import plan_cmd
from partitioner.cli.common import (
    check_writable,
    plan_options,
    print_json,
    progress_enabled,
    stdout_to_stderr,
)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every option of ``plan`` (its --json included), so the two cannot drift apart.
    plan_cmd.add_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="BUNDLE_DIR",
                        help="bundle directory to create")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip running the chained stages against the whole model "
                             "(each stage is still loaded once in ONNX Runtime)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing non-empty BUNDLE_DIR")
    parser.add_argument("--triton", action="store_true",
                        help="also write a Triton model repository per device")


def run(args: argparse.Namespace) -> int:
    from partitioner import pipeline
    from partitioner.backend.explain import explain, format_text
    from partitioner.backend.manifest import load_bundle

    check_writable(args.output, "-o")  # before the (slow) load and solve
    options = plan_options(args)
    with stdout_to_stderr():
        made = pipeline.compile(args.model, args.system, args.output, verify=args.verify,
                                force=args.force, triton=args.triton,
                                progress=progress_enabled(args), **options)
    assert made.bundle is not None
    doc = explain(load_bundle(made.bundle))
    if args.json:
        print_json(doc)
    else:
        print(format_text(doc))
    return 0
