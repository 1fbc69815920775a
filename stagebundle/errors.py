"""The exception types shared by the compiler and the runtime.

``UserError`` is bad input (a missing file, a tampered bundle, an unfixed dynamic
dimension): command-line tools print its message as one line on stderr and exit with
``exit_code``; :class:`OneLineParser` does the same for a bad option. ``InternalError`` is
a bug in this project; it is never caught to be hidden. Raise user errors through
:func:`fail` so every message has the same shape.
"""

from __future__ import annotations

import argparse
import os
from typing import NoReturn

__all__ = ["UserError", "InternalError", "fail", "OneLineParser", "check_threads"]


class UserError(Exception):
    """Bad input from the user. ``str(err)`` is a single line naming what is wrong."""

    exit_code = 2


class InternalError(Exception):
    """A bug in the project (an invariant that should hold did not)."""


def fail(message: str, *, error: type[UserError] = UserError) -> NoReturn:
    """Raise a user error whose message is ``message`` folded onto one line."""
    raise error(" ".join(str(message).split()))


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other user error
    (argparse prints the whole usage first); its sub-command parsers are of this class too.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} "
                     f"(see {self.prog} --help)\n")


def check_threads(threads: int | None, what: str = "--threads") -> None:
    """``None`` (ONNX Runtime's choice) or 1 up to ``max(64, 4 x this host's cores)``.

    ORT starts every intra-op thread when a session opens: a typo such as 100000 would
    hold a worker or a profile for minutes (and gigabytes) before anything is reported.
    """
    if threads is None:
        return
    cap = max(64, 4 * (os.cpu_count() or 1))
    if not 1 <= threads <= cap:
        fail(f"{what} {threads}: must be in 1..{cap} (4x this host's {os.cpu_count()} cores, "
             f"at least 64)")
