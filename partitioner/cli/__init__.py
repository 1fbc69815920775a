"""The ``partitioner`` command: one sub-module per sub-command.

Each sub-command module defines ``add_arguments(parser)`` and ``run(args) -> int``. It is
imported only when its sub-command runs, so ``partitioner inspect`` never imports mip.
User errors become one line on stderr and a non-zero exit (see ``partitioner.errors``);
so do ``OSError``s (an output that cannot be written) and ``MemoryError``s (a ``--shape``
too big for this host), with exit code 2, and bad options (argparse's usage errors).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from partitioner import __version__
from partitioner.errors import UserError
from stagebundle.errors import OneLineParser

__all__ = ["main", "COMMANDS"]

# name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("partitioner.cli.inspect_cmd", "show the major layers, FLOPs, weights and cuts"),
    "profile": ("partitioner.cli.profile_cmd", "measure bundles of layers on this host"),
    "plan": ("partitioner.cli.plan_cmd", "choose a device (and frequency) for every layer"),
    "compile": ("partitioner.cli.compile_cmd", "plan and emit one ONNX file per stage"),
    "explain": ("partitioner.cli.explain_cmd", "describe a compiled bundle"),
    "demo": ("partitioner.cli.demo_cmd",
             "build, plan, compile, serve on loopback and run a zoo model end to end"),
}


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="partitioner", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    parser = _parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        status = int(module.run(args) or 0)
        sys.stdout.flush()  # an unwritable stdout fails here, as one line (below)
        return status
    except UserError as err:
        print(f"partitioner {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        # An output that cannot be written (-o under a file, a read-only place, a full
        # disk): the user's environment, not a bug, so one line and exit 2.
        from partitioner.cli.common import os_error_line

        print(f"partitioner {args.command}: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except MemoryError as err:
        # A tensor too big for this host (a huge --shape): one line naming the allocation.
        detail = " ".join(str(err).split()) or "an allocation failed"
        print(f"partitioner {args.command}: error: out of memory: {detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"partitioner {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
