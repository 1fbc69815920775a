"""The exception types of the project (shared with the runtime through ``stagebundle``).

``UserError`` is bad input (a missing file, an unfixed dynamic dimension, an infeasible
cap): the CLI prints its message as one line on stderr and exits with ``exit_code``.
``InternalError`` is a bug in this project; it is never caught to be hidden.

Raise user errors through :func:`fail` so every message has the same shape.
"""

from __future__ import annotations

from stagebundle.errors import InternalError, UserError, fail

__all__ = ["UserError", "InternalError", "InfeasibleError", "fail"]


class InfeasibleError(UserError):
    """No plan meets the constraints; the message names the constraint that cannot be met."""

    exit_code = 2
