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

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import pytest

from tests.test_runtime_fixtures import ROOT, SYSTEM_TOML, TOKEN, Built

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
class Workers:
    """``runtime serve`` processes, one per device."""

    built: Built
    work: Path
    prefix: tuple[str, ...] = ()  # e.g. ("ip", "netns", "exec", NS)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def hosts(self) -> dict[str, str]:
        return {d: f"{i['host']}:{i['port']}" for d, i in self.info.items()}

    def start(self, device: str, timeout: float = 60.0, host: str = "127.0.0.1"
              ) -> dict[str, Any]:
        pf = self.work / f"{device}.port.json"
        pf.unlink(missing_ok=True)
        log = open(self.work / f"{device}.log", "ab")  # noqa: SIM115 (the child owns it)
        proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "runtime.cli", "serve",
             str(self.built.bundle), "--device", device, "--listen", f"{host}:0", "--token-file",
             str(self.built.token_file), "--port-file", str(pf), "--threads", "1",
             "--debug-slowdown", "1", "--metrics-port", "0", "--quiet"],
            cwd=ROOT, stdout=log, stderr=log)
        log.close()
        self.procs[device] = proc
        end = time.monotonic() + timeout
        while not pf.exists():
            if proc.poll() is not None or time.monotonic() > end:
                self.kill(device)
                raise RuntimeError(f"worker {device} did not start: "
                                   + (self.work / f"{device}.log").read_text()[-2000:])
            time.sleep(0.05)
        self.info[device] = json.loads(pf.read_text())
        return self.info[device]

    def kill(self, device: str) -> None:
        proc = self.procs.pop(device, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        for device in list(self.procs):
            self.kill(device)

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
    workers = Workers(built, work)
    try:
        for d in DEVICES:
            workers.start(d)
    except BaseException:
        workers.stop()
        raise
    return workers


@pytest.fixture
def built(tmp_path: Path) -> Built:
    """A fresh solver-made bundle per test (switches write ``BUNDLE/adapt/``)."""
    return build_solved(tmp_path / "b")


@pytest.fixture
def workers(built: Built, tmp_path: Path) -> Iterator[Workers]:
    w = start_workers(built, tmp_path)
    yield w
    w.stop()
