"""Fixtures of the live-adaptation tests: a solver-made bundle and real worker processes.

The bundle is the zoo's ``tiny_cnn`` planned *by the solver* on the runtime tests' system
(so the bundle's plan is the optimum of its own cost table: every layer on the hub, the
edge as source and destination), plus the fail-over bundles without each device. Workers
are ``runtime serve`` subprocesses on loopback (ports the OS picks, read back from
``--port-file``), started with ``--debug-slowdown 1`` so a test can make one of them
slow-but-alive while serving (an authenticated ``debug`` frame), and with
``--metrics-port 0``. Every process is killed in teardown.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import pytest

from tests.test_runtime_fixtures import SYSTEM_TOML, TOKEN, Built, Cluster

# the devices that run a stage of the bundle or of a fail-over bundle (a worker needs
# one); the cloud has no worker, so re-planning must leave it out
DEVICES = ("edge", "hub")


def build_solved(root: Path, *, fallbacks: bool = True) -> Built:
    """``tiny_cnn`` compiled with the solver's plan (plus fail-over bundles)."""
    import models
    from partitioner import pipeline
    from runtime.replan import compile_fallbacks

    root.mkdir(parents=True, exist_ok=True)
    model, system = root / "tiny_cnn.onnx", root / "system.toml"
    onnx.save(models.build_model("tiny_cnn"), str(model))
    system.write_text(SYSTEM_TOML)
    result = pipeline.compile(model, system, root / "bundle", force=True)
    assert result.bundle is not None
    if fallbacks:
        compile_fallbacks(result.bundle, model, system)
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    return Built(model, system, result.bundle, token_file)


@dataclass
class Workers(Cluster):
    """Workers that a test can slow down (``--debug-slowdown``) and scrape
    (``--metrics-port``)."""

    extra: tuple[str, ...] = ("--debug-slowdown", "1", "--metrics-port", "0")

    def frame(self, device: str, header: dict[str, Any]) -> dict[str, Any]:
        """One authenticated request/reply frame to ``device``'s worker."""
        from runtime.transport import connect, recv_frame, send_frame

        addr = (str(self.info[device]["host"]), int(self.info[device]["port"]))
        with connect(addr, 5.0) as sock:
            send_frame(sock, {**header, "token": TOKEN})
            return dict(recv_frame(sock, max_body=0, frame_timeout=10.0).header)

    def slow_down(self, device: str, factor: float) -> None:
        """Make ``device``'s worker slow-but-alive: each unit takes ``factor`` x longer."""
        reply = self.frame(device, {"type": "debug", "slowdown": factor})
        assert reply.get("slowdown") == factor, reply


def start_workers(built: Built, work: Path) -> Workers:
    return Workers(built, work).start_all(DEVICES)


@pytest.fixture
def built(tmp_path: Path) -> Built:
    """A fresh solver-made bundle per test (switches write ``BUNDLE/adapt/``)."""
    return build_solved(tmp_path / "b")


@pytest.fixture
def workers(built: Built, tmp_path: Path) -> Iterator[Workers]:
    w = start_workers(built, tmp_path)
    yield w
    w.stop()
