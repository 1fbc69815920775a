"""``partitioner compile MODEL --system SYSTEM [plan options] -o BUNDLE_DIR``.

Plans exactly like ``partitioner plan`` (same options) and writes the deployment bundle:
one ONNX file per stage plus ``manifest.json`` (see :mod:`partitioner.backend.manifest`).
"""

from __future__ import annotations

import argparse

from partitioner.cli import plan_cmd
from partitioner.cli.common import plan_from_args, print_json, progress_enabled

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every option of ``plan`` (its --json included), so the two cannot drift apart.
    plan_cmd.add_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="BUNDLE_DIR",
                        help="bundle directory to create")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip running the chained stages against the whole model")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing non-empty BUNDLE_DIR")
    parser.add_argument("--triton", action="store_true",
                        help="also write a Triton model repository per device")


def run(args: argparse.Namespace) -> int:
    from partitioner.backend.emit import check_output, compile_bundle
    from partitioner.backend.explain import explain, format_text
    from partitioner.backend.manifest import load_bundle

    check_output(args.output, force=args.force)  # before the (slow) load and solve
    made = plan_from_args(args)
    out = compile_bundle(made.prepared, made.plan, made.system, args.output,
                         verify=args.verify, force=args.force, triton=args.triton,
                         table=made.table, progress=progress_enabled(args))
    doc = explain(load_bundle(out))
    if args.json:
        print_json(doc)
    else:
        print(format_text(doc))
    return 0
