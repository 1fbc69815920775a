"""Shared fixtures of the runtime tests: a compiled 3-stage bundle and real worker processes.

The bundle is the zoo's ``tiny_cnn`` split by hand over three devices (edge: conv1, hub:
conv2..conv3, cloud: fc), compiled by the real back end, plus the fallback bundles the
runtime compiles with the real solver for the system without the hub / without the cloud.
Workers are ``runtime serve`` subprocesses on loopback, on ports the OS picks; every
process is killed in teardown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ("edge", "hub", "cloud")
TOKEN = "s3cret-token-for-tests"

SYSTEM_TOML = """
[[device]]
name = "edge"
class = "edge"
flops = 3.62e9
memory_bandwidth = 719e6
network_bandwidth = 1.11e7

[[device]]
name = "hub"
class = "hub"
flops = 236e9
memory_bandwidth = 25.6e9
network_bandwidth = 1.25e8

[[device]]
name = "cloud"
class = "cloud"
flops = 11300e9
memory_bandwidth = 484.4e9
network_bandwidth = 1.25e8

[[link]]
between = ["edge", "hub"]
bandwidth = 1.0e7

[[link]]
between = ["edge", "cloud"]
bandwidth = 1.0e6

[[link]]
between = ["hub", "cloud"]
bandwidth = 1.0e7

[application]
source = "edge"
destination = "edge"
"""


@dataclass
class Built:
    """The model, system file and bundle (with fallbacks) the tests share."""

    model: Path
    system: Path
    bundle: Path
    token_file: Path


def build(root: Path, *, fallbacks: bool = True) -> Built:
    """Compile ``tiny_cnn`` into a 3-stage bundle under ``root`` (plus fallbacks)."""
    import models
    from partitioner import ir
    from partitioner.analysis.system import load_system
    from partitioner.backend import compile_bundle
    from partitioner.frontend import load_model
    from runtime.replan import compile_fallbacks

    root.mkdir(parents=True, exist_ok=True)
    model, system = root / "tiny_cnn.onnx", root / "system.toml"
    onnx.save(models.build_model("tiny_cnn"), str(model))
    system.write_text(SYSTEM_TOML)
    prepared = load_model(model)
    est = ir.Estimate(0.0, 0.0, 0.0, 0.0, 0.0)
    plan = ir.Plan("optimal", "latency", (ir.Stage("edge", None, 0, 0),
                                          ir.Stage("hub", None, 1, 2),
                                          ir.Stage("cloud", None, 3, 3)), est, 0.0)
    bundle = compile_bundle(prepared, plan, load_system(system), root / "bundle", force=True)
    if fallbacks:
        made = compile_fallbacks(bundle, model, system)
        assert set(made) == {"hub", "cloud"} and all(made.values())
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    return Built(model, system, Path(bundle), token_file)


def reference(model: Path, x: np.ndarray) -> np.ndarray:
    """The whole model run by one ONNX Runtime session."""
    import onnxruntime as ort

    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]


def sample(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)


@dataclass
class Cluster:
    """``runtime serve`` processes, one per device (``prefix`` runs them elsewhere, e.g.
    ``("ip", "netns", "exec", NS)``; ``extra`` adds serve arguments)."""

    built: Built
    work: Path
    prefix: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    info: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def hosts(self) -> dict[str, str]:
        return {d: f"{i.get('host', '127.0.0.1')}:{i['port']}" for d, i in self.info.items()}

    def start(self, device: str, port: int = 0, grpc: bool = False, timeout: float = 60.0,
              host: str = "127.0.0.1") -> dict[str, Any]:
        pf = self.work / f"{device}.port.json"
        pf.unlink(missing_ok=True)
        cmd = [*self.prefix, sys.executable, "-m", "runtime.cli", "serve",
               str(self.built.bundle), "--device", device, "--listen", f"{host}:{port}",
               "--token-file", str(self.built.token_file), "--port-file", str(pf),
               "--threads", "1", "--quiet", *self.extra]
        if grpc:
            cmd += ["--grpc-port", "0"]
        log = open(self.work / f"{device}.log", "ab")  # noqa: SIM115 (the child owns it)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log)
        log.close()
        self.procs[device] = proc
        end = time.monotonic() + timeout
        while not pf.exists():
            if proc.poll() is not None or time.monotonic() > end:
                self.kill(device)
                why = "exited" if proc.poll() is not None else f"did not start in {timeout} s"
                raise RuntimeError(f"worker {device} {why}: "
                                   + (self.work / f"{device}.log").read_text()[-2000:])
            time.sleep(0.05)
        self.info[device] = json.loads(pf.read_text())
        return self.info[device]

    def kill(self, device: str) -> None:
        proc = self.procs.pop(device, None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait(10)

    def stop(self) -> None:
        for device in list(self.procs):
            self.kill(device)

    def start_all(self, devices: Iterable[str], grpc: tuple[str, ...] = ()) -> Self:
        """A worker per device; if one fails to start, the others are stopped too."""
        try:
            for d in devices:
                self.start(d, grpc=d in grpc)
        except BaseException:
            self.stop()
            raise
        return self


def start_cluster(built: Built, work: Path, grpc: tuple[str, ...] = ()) -> Cluster:
    return Cluster(built, work).start_all(DEVICES, grpc)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("runtime-bundle"))


@pytest.fixture(scope="module")
def cluster(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_cluster(built, tmp_path_factory.mktemp("workers"), grpc=("hub",))
    yield c
    c.stop()
