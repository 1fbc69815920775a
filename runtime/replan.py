"""Re-planning without a lost device: fallback bundles, compiled ahead or on demand.

Why fallbacks live *inside* the bundle directory (``BUNDLE/fallback/without-<dev>/``): a
worker never loads a model from a request (issue 5, security), so every stage a worker
may be asked to run must be on its own disk, verified by the manifest's SHA-256, when it
starts or when an authenticated ``reload`` asks it to rescan that same directory. The
bundle alone does not hold what re-planning needs (the full model and the system file),
so:

* ``runtime fallback BUNDLE --model M --system S`` (or :func:`compile_fallbacks`)
  compiles, ahead of time, one bundle per device that can be lost (every device of the
  plan except the pinned source and destination); workers load them at start-up and the
  executor switches to one in a single round trip when a device dies;
* ``runtime run ... --model M --system S`` (or :class:`Replanner`) compiles a missing
  fallback on demand (any set of lost devices) and has the live workers of the new plan
  serve it (:func:`runtime.ensure.ensure_units`: a worker of the bundle directory
  rescans it, a ``runtime serve --model`` worker builds its units from its own model).

A fallback is solved with the objective *kind* of the original plan, on the analytic
cost model (plus any profiles given); caps such as ``--max-latency`` are dropped, since a
degraded system may not meet them and a slower answer beats none.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from stagebundle.errors import fail

__all__ = ["compile_without", "compile_fallbacks", "Replanner"]

log = logging.getLogger("runtime.replan")


def compile_without(bundle_dir: str | Path, model: str | Path, system_path: str | Path,
                    lost: Iterable[str], *, profiles: Sequence[Any] = ()) -> Path | None:
    """Compile the bundle's model for the system without ``lost``; ``None`` if infeasible.

    Returns the new bundle directory ``BUNDLE/fallback/without-<lost>``. The compiler's
    :func:`partitioner.pipeline.replan` does the work; it is imported only here, so a
    worker that never re-plans never imports the compiler.
    """
    from partitioner.pipeline import replan

    return replan(bundle_dir, model, system_path, lost, profiles=profiles)


def compile_fallbacks(bundle_dir: str | Path, model: str | Path, system_path: str | Path,
                      *, devices: Sequence[str] | None = None,
                      profiles: Sequence[Any] = ()) -> dict[str, Path | None]:
    """One fallback per device of ``devices`` (default: every unpinned device of the plan).

    The bundle records the pinned source and destination of the system it was compiled
    for, so the default needs only the bundle.
    """
    from stagebundle import load_bundle

    if devices is None:
        main = load_bundle(bundle_dir)
        devices = [d for d in main.devices if d not in (main.source, main.destination)]
    return {d: compile_without(bundle_dir, model, system_path, [d], profiles=profiles)
            for d in devices}


class Replanner:
    """The executor's on-demand re-planner (see the module doc).

    Called with the set of lost devices, it compiles (once per set) a fallback bundle,
    has the live workers of the new plan serve it (``runtime.ensure``: a bundle worker
    rescans its directory, a ``--model`` worker builds the units), and returns the plan
    key (``"fallback/without-..."``), or ``None`` when no plan exists.
    """

    def __init__(self, bundle_dir: str | Path, model: str | Path, system_path: str | Path,
                 *, token: str | None = None, profiles: Sequence[Any] = ()) -> None:
        # checked now: a typo must not wait for the first failure to be reported
        for what, path in (("--model", model), ("--system", system_path)):
            if not Path(path).is_file():
                fail(f"{what} {path}: no such file")
        self.bundle_dir = Path(bundle_dir)
        self.model, self.system_path = model, system_path
        self.token, self.profiles = token, profiles
        self.executor: Any = None
        self._done: dict[frozenset[str], str | None] = {}
        self._lock = threading.Lock()

    def bind(self, executor: Any) -> None:
        """The executor whose hosts get the ``ensure`` request."""
        self.executor = executor

    def __call__(self, lost: frozenset[str]) -> str | None:
        with self._lock:
            if lost in self._done:
                return self._done[lost]
            path = compile_without(self.bundle_dir, self.model, self.system_path, lost,
                                   profiles=self.profiles)
            key = None if path is None else f"fallback/{path.name}"
            if key is not None and path is not None and self.executor is not None:
                self._ensure(path, key, lost)
            self._done[lost] = key
            return key

    def _ensure(self, path: Path, key: str, lost: frozenset[str]) -> None:
        """Have the live workers of the new plan serve its units (``runtime.ensure``):
        a worker of the bundle directory rescans it, a ``--model`` worker builds them."""
        from runtime.ensure import EnsureError, ensure_units
        from runtime.stages import open_bundle
        from runtime.transport import format_address

        view = open_bundle(path, key=key)
        hosts = {d: format_address(a) for d, a in dict(self.executor.hosts).items()
                 if d not in lost}
        for dev in view.devices:
            try:
                ensure_units(hosts, view, self.token, key=key, timeout=60.0,
                             tls=getattr(self.executor, "tls", None), devices=[dev])
            except EnsureError as err:  # a dead host is simply left out
                log.warning("device %s: %s", dev, err)
