"""A worker from the lean install (numpy, onnxruntime, onnx; no solver, no torch) serves.

The install command is the README's ("Lean worker (edge devices)"), run as written in a
fresh venv made from a copy of the repository. The venv must really lack the compiler's
dependencies; its ``runtime serve`` processes then serve every device of a bundle compiled
here, and this test's executor (the main environment) gets the whole model's output back.
Slow: it runs pip (fast from pip's cache; CI has PyPI access).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from test_readme import (
    LEAN_WORKER,
    _run,
    commands,
    copy_repository,
    environment,
    section,
    stop,
)

import models


def _serve(runtime: Path, bundle: Path, device: str, workdir: Path
           ) -> tuple[subprocess.Popen[bytes], Path, Path]:
    port_file, log = workdir / f"{device}.port.json", workdir / f"{device}.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [str(runtime), "serve", str(bundle), "--device", device, "--listen",
             "127.0.0.1:0", "--port-file", str(port_file)],
            stdout=sink, stderr=subprocess.STDOUT, env=environment(with_repo_on_path=False))
    return proc, port_file, log


@pytest.mark.slow
def test_lean_install_serves_a_bundle(tmp_path: Path) -> None:
    import onnxruntime as ort

    from partitioner import pipeline
    from partitioner.data import example_system_path
    from runtime.executor import RemoteExecutor

    # 1. the README's lean install, as written, in a fresh venv
    repo = copy_repository(tmp_path / "repo")
    [install] = commands(section(LEAN_WORKER)[0].text)
    assert "--no-deps" in install and "mip" not in install and "torch" not in install
    _run(install, [], repo, environment(with_repo_on_path=False), timeout=1800)
    lean = repo / ".venv" / "bin"
    probe = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None"
             " for m in ('mip', 'torch', 'tqdm', 'onnxruntime', 'numpy', 'stagebundle',"
             " 'runtime')}))")
    found = json.loads(subprocess.run(
        [str(lean / "python"), "-c", probe], capture_output=True, text=True, check=True,
        cwd=tmp_path, env=environment(with_repo_on_path=False)).stdout)
    assert found == {"mip": False, "torch": False, "tqdm": False, "onnxruntime": True,
                     "numpy": True, "stagebundle": True, "runtime": True}

    # 2. a bundle compiled here (the full install), served by lean workers
    model = tmp_path / "tiny.onnx"
    models.save_model("tiny_cnn", model)
    result = pipeline.compile(model, example_system_path(), tmp_path / "bundle")
    assert result.bundle is not None
    devices = sorted({d for s in result.plan.stages for d in s.devices})
    workers = [_serve(lean / "runtime", result.bundle, d, tmp_path) for d in devices]
    try:
        hosts: dict[str, str] = {}
        deadline = time.monotonic() + 180
        for device, (proc, port_file, log) in zip(devices, workers, strict=True):
            while not port_file.exists():
                assert proc.poll() is None, f"lean worker {device} exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"lean worker {device} did not start"
                time.sleep(0.2)
            info = json.loads(port_file.read_text())
            hosts[device] = f"{info['host']}:{info['port']}"

        # 3. a request from this (the main) environment returns the whole model's output
        graph = result.prepared.graph
        rng = np.random.default_rng(3)
        inputs = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in graph.inputs}
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        expected = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs),
                            strict=True))
        executor = RemoteExecutor(result.bundle, hosts, timeout=60.0)
        try:
            outputs = executor.infer(inputs)
        finally:
            executor.close()
        assert set(outputs) == set(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(outputs[name], value, rtol=1e-4, atol=1e-5)
    finally:
        stop([proc for proc, _, _ in workers])
    for device, (_, _, log) in zip(devices, workers, strict=True):
        assert "Traceback" not in log.read_text(), f"{device}:\n{log.read_text()}"
