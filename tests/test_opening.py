"""Opening bundles ahead: the next bundle opens during the warm-up, never while timed."""

from __future__ import annotations

import threading
import time

import pytest

from partitioner.analysis.opening import BundleOpener
from partitioner.analysis.profiler import (
    BundleTimer,
    ProfileSettings,
    bundle_ranges,
    capture_intermediates,
    profile_bundles,
    sample_inputs,
    start_profile,
)
from partitioner.errors import UserError


class Recorder:
    """An open function: records which thread opened which bundle."""

    def __init__(self, fail_on: tuple[int, int] | None = None,
                 gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[tuple[int, int], str]] = []
        self.fail_on = fail_on
        self.gate = gate

    def __call__(self, first: int, last: int) -> str:
        self.calls.append(((first, last), threading.current_thread().name))
        if self.gate is not None:
            self.gate.wait(10)
        if (first, last) == self.fail_on:
            raise UserError(f"layers {first}..{last}: cannot be opened")
        return f"session {first}..{last}"


def opening_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("bundle-open")]


def test_the_next_bundle_is_opened_ahead_and_handed_over() -> None:
    opened = Recorder()
    opener = BundleOpener(opened)
    opener.expect([(0, 0), (1, 1), (2, 2)])
    assert opener.take(0, 0) == "session 0..0"  # nothing ahead yet: opened here
    opener.start_next()
    opener.settle()
    assert opener.take(1, 1) == "session 1..1"
    assert opener.take(2, 2) == "session 2..2"  # never started ahead: opened here
    here = threading.current_thread().name
    assert [b for b, _ in opened.calls] == [(0, 0), (1, 1), (2, 2)]
    assert opened.calls[0][1] == here and opened.calls[2][1] == here
    assert opened.calls[1][1].startswith("bundle-open")
    assert opener.ahead_seconds > 0
    opener.close()
    assert not opening_threads()


def test_a_bundle_asked_for_out_of_order_is_opened_then() -> None:
    opened = Recorder()
    opener = BundleOpener(opened)
    opener.expect([(0, 0), (1, 1)])
    opener.take(0, 0)
    opener.start_next()  # (1, 1) ahead
    assert opener.take(5, 5) == "session 5..5"  # not the one ahead: it is dropped
    assert opener.take(1, 1) == "session 1..1"  # and opened again when asked for
    assert [b for b, _ in opened.calls] == [(0, 0), (1, 1), (5, 5), (1, 1)]
    opener.close()


def test_an_error_opening_ahead_is_raised_when_that_bundle_is_taken() -> None:
    opener = BundleOpener(Recorder(fail_on=(1, 1)))
    opener.expect([(0, 0), (1, 1)])
    opener.take(0, 0)
    opener.start_next()
    opener.settle()  # waiting does not raise: the error belongs to bundle 1..1
    with pytest.raises(UserError, match=r"layers 1\.\.1: cannot be opened"):
        opener.take(1, 1)
    opener.close()


def test_close_waits_for_an_opening_under_way() -> None:
    gate = threading.Event()
    opened = Recorder(gate=gate)
    opener = BundleOpener(opened)
    opener.expect([(0, 0), (1, 1)])
    gate.set()
    opener.take(0, 0)
    gate.clear()
    opener.start_next()
    threading.Timer(0.05, gate.set).start()
    opener.close()  # returns once the opening finished; the thread is gone
    assert gate.is_set() and not opening_threads()
    assert [b for b, _ in opened.calls] == [(0, 0), (1, 1)]


class WatchedTimer(BundleTimer):
    """A real timer (ONNX Runtime sessions) that logs when bundles open and runs are timed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.openings: list[tuple[float, float, str]] = []
        self.timed: list[tuple[float, float]] = []

    def runner(self, first: int, last: int):
        started = time.perf_counter()
        once = super().runner(first, last)
        self.openings.append((started, time.perf_counter(), threading.current_thread().name))
        calls = 0

        def watched() -> float:
            nonlocal calls
            calls += 1
            t0 = time.perf_counter()
            seconds = once()
            if calls > self.settings.warmup:  # a timed run
                self.timed.append((t0, time.perf_counter()))
            return seconds

        return watched


def test_no_bundle_opens_while_another_is_timed(tmp_path) -> None:
    from models import save_model
    from partitioner.frontend import load_model

    cnn = load_model(save_model("tiny_cnn", tmp_path / "cnn.onnx"))
    settings = ProfileSettings(runs=5, warmup=3, trim=0.2, threads=1)
    captured = capture_intermediates(cnn, sample_inputs(cnn.graph), 1)
    n = len(cnn.graph.layers)
    profile = start_profile(tmp_path / "p.json", cnn.graph, "host", settings)
    with WatchedTimer(cnn, captured, settings) as timer:
        profile = profile_bundles(profile, bundle_ranges(n, n), timer.measure, None,
                                  expect=timer.expect)
    assert {(b.first, b.last) for b in profile.bundles} == set(bundle_ranges(n, n))
    ahead = [(a, b) for a, b, thread in timer.openings if thread.startswith("bundle-open")]
    assert len(ahead) == len(bundle_ranges(n, n)) - 1  # every bundle after the first
    assert len(timer.timed) == settings.runs * len(bundle_ranges(n, n))
    for opened, done in ahead:
        assert not any(t0 < done and opened < t1 for t0, t1 in timer.timed)
    assert not opening_threads()
