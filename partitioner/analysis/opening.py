"""Open the next bundle while the one before it warms up (issue 16: the profiler's set-up).

Opening a bundle's ONNX Runtime session is mostly ORT pre-packing the bundle's weights for
its kernels: on AlexNet about 0.11 s a bundle, as long as the bundle's 10 warm-up runs.
The warm-up's timings are thrown away, so the warm-up is when the next bundle can be
opened, on a second thread (ORT releases the GIL while it builds a session). The opening
is always waited for before the timed runs start: nothing is opened while a bundle is
timed, and the profile holds the same numbers as when bundles are opened one at a time.
The cost is memory: two bundles' sessions are alive at once.

:class:`BundleOpener` keeps the order the bundles will be asked for (:meth:`expect`), opens
one ahead (:meth:`start_next`), and hands it over when it is asked for (:meth:`take`); a
bundle asked for out of order, or before it was opened ahead, is opened there and then.
An error opening a bundle ahead is raised when that bundle is taken, never dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

__all__ = ["BundleOpener"]

T = TypeVar("T")
Bundle = tuple[int, int]


class BundleOpener(Generic[T]):
    """Opens bundles with ``open_bundle(first, last)``, one ahead on a background thread.

    Attributes:
        ahead_seconds: seconds the background thread spent opening bundles (overlapped
            with warm-up runs, so not part of anyone's waiting).
    """

    def __init__(self, open_bundle: Callable[[int, int], T]) -> None:
        self._open_bundle = open_bundle
        self._upcoming: deque[Bundle] = deque()
        self._pending: tuple[Bundle, Future[T]] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.ahead_seconds = 0.0

    def expect(self, bundles: Iterable[Bundle]) -> None:
        """The bundles :meth:`take` will be asked for next, in that order."""
        self._upcoming = deque(bundles)

    def take(self, first: int, last: int) -> T:
        """Bundle ``first..last``, opened: the one opened ahead when it is that one."""
        wanted = (first, last)
        if wanted in self._upcoming:
            while self._upcoming.popleft() != wanted:
                pass
        pending, self._pending = self._pending, None
        if pending is not None:
            bundle, future = pending
            if bundle == wanted:
                return future.result()  # raises what opening it raised
            # opened ahead but asked for out of order: let it finish, then drop it (it is
            # opened again, and any error raised then, when it is asked for)
            wait([future])
        return self._open_bundle(first, last)

    def start_next(self) -> None:
        """Start opening the next expected bundle (nothing when none, or one is open)."""
        if self._pending is not None or not self._upcoming:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bundle-open")
        bundle = self._upcoming[0]
        self._pending = (bundle, self._pool.submit(self._timed_open, *bundle))

    def settle(self) -> float:
        """Wait until no bundle is being opened; the seconds waited."""
        if self._pending is None:
            return 0.0
        started = time.perf_counter()
        wait([self._pending[1]])
        return time.perf_counter() - started

    def close(self) -> None:
        """Wait for an opening under way, drop what was opened ahead, stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending = None
        self._upcoming.clear()

    def _timed_open(self, first: int, last: int) -> T:
        started = time.perf_counter()
        try:
            return self._open_bundle(first, last)
        finally:
            self.ahead_seconds += time.perf_counter() - started
