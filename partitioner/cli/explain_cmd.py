"""``partitioner explain BUNDLE_DIR [--json] [--plot FILE.png|svg]``."""

from __future__ import annotations

import argparse

from partitioner.cli.common import print_json

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", metavar="BUNDLE_DIR", help="a bundle written by compile")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--plot", metavar="FILE", default=None,
                        help="also draw the timeline and partition to FILE (.png or .svg)")


def run(args: argparse.Namespace) -> int:
    from partitioner.backend.explain import explain, format_text
    from partitioner.backend.manifest import load_bundle

    doc = explain(load_bundle(args.bundle))
    if args.plot:
        from partitioner.backend.draw import plot

        doc["plot"] = str(plot(doc, args.plot))
    if args.json:
        print_json(doc)
    else:
        print(format_text(doc))
        if args.plot:
            print(f"plot written to {doc['plot']}")
    return 0
