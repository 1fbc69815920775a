"""``python -m models``: list the zoo, or build one model into an ONNX file.

Usage::

    python -m models list [--json]
    python -m models build NAME -o FILE.onnx [--batch N] [--dynamic-batch]
                           [--image-size N] [--seed N] [--external-data] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import models
from partitioner.errors import UserError
from stagebundle.errors import OneLineParser

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    ls = sub.add_parser("list", help="the models that can be built")
    ls.add_argument("--json", action="store_true", help="one JSON document on stdout")
    b = sub.add_parser("build", help="build a model with random weights into an .onnx file")
    b.add_argument("name", metavar="NAME", help="a name from `list`")
    b.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="file to write")
    b.add_argument("--batch", type=int, default=1, help="static batch size (default 1)")
    b.add_argument("--dynamic-batch", action="store_true",
                   help='make the batch dimension symbolic ("batch"); fix it with --shape')
    b.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="input height = width (sequence length for lstm_small)")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    b.add_argument("--external-data", action="store_true",
                   help="store the weights in FILE.onnx.data beside the model")
    b.add_argument("--json", action="store_true", help="one JSON document on stdout")
    return parser


def _list(args: argparse.Namespace) -> int:
    rows = []
    for name in models.list_models():
        info = models.MODELS[name]
        pub = models.PUBLISHED.get(name, {})
        rows.append({"name": name, "image_size": info.image_size,
                     "description": info.description,
                     "published_params": pub.get("params"), "published_macs": pub.get("macs")})
    if args.json:
        json.dump({"models": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for r in rows:
            print(f"{r['name']:<14} {r['description']}")
    return 0


def _build(args: argparse.Namespace) -> int:
    path = models.save_model(args.name, args.output, external_data=args.external_data,
                             batch=args.batch, image_size=args.image_size,
                             dynamic_batch=args.dynamic_batch, seed=args.seed)
    data = path.parent / f"{path.name}.data"
    has_data = args.external_data and data.is_file()
    size = path.stat().st_size + (data.stat().st_size if has_data else 0)
    doc = {"model": args.name, "path": str(path), "bytes": size,
           "data_file": str(data) if has_data else None}
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"wrote {path} ({size / 1e6:.1f} MB"
              + (f", weights in {data.name})" if has_data else ")"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a one-line error for bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _list(args) if args.command == "list" else _build(args)
    except UserError as err:
        print(f"models {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
