"""The rule of an early-exit head (DISS §6.4), one definition for every executor.

A stage that ends in an exit head carries ``exit = {"output", "probability",
"threshold"}`` in the manifest. After the stage ran, :func:`exit_taken` says whether the
request leaves there:

* threshold mode (``threshold`` set): when the softmax confidence of the head's output
  (:func:`confidence`: its largest class probability, the least over a batch) is at least
  the threshold, as BranchyNet decides;
* probability mode (``threshold`` null): a deterministic draw from the request id, so the
  share of requests that leave is the declared probability and a request is decided the
  same way by every executor and on every retry (fail-over cannot change the answer).

The back end's verification never takes an exit (it checks every output); the local
executor and the workers take them with this rule.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["confidence", "exit_taken", "draw", "exit_after"]


def confidence(logits: np.ndarray) -> float:
    """Largest softmax probability along the last axis; the least over the other axes."""
    x = np.asarray(logits, dtype=np.float64)
    if x.size == 0:
        return 0.0
    x = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return float((z.max(axis=1) / z.sum(axis=1)).min())


def draw(request_id: str, output: str) -> float:
    """A number in [0, 1) fixed by the request id and the head (probability mode)."""
    digest = hashlib.sha256(f"{output}\0{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def exit_taken(rule: Mapping[str, Any] | None, produced: Mapping[str, np.ndarray],
               request_id: str) -> bool:
    """Whether a request leaves at the exit head ``rule`` given what the stage produced."""
    if not rule:
        return False
    output = str(rule.get("output"))
    threshold = rule.get("threshold")
    if threshold is not None:
        arr = produced.get(output)
        return arr is not None and confidence(arr) >= float(threshold)
    return draw(request_id, output) < float(rule.get("probability") or 0.0)


def exit_after(unit: Any, produced: Mapping[str, np.ndarray], request_id: str) -> str | None:
    """The exit output a request leaves by after ``unit`` ran (a
    :class:`stagebundle.manifest.Unit`), or None when it goes on."""
    rule = getattr(unit, "exit", None)
    if rule and exit_taken(rule, produced, request_id):
        return str(rule.get("output"))
    return None
