"""Workers that hold the model (``runtime serve --model``) build the stages of new plans.

Three real ``runtime serve --model tiny_cnn.onnx`` processes on loopback (ports from
``--port-file``) start with no stage. The executor's side compiles plans with the real
back end into folders the workers never see and sends only the manifests
(:func:`runtime.ensure.ensure_units`); each worker builds its units from its own model
copy, verifies them and serves them. Checked: the built files are byte-identical to the
compiled ones (read back from the worker's ``--store``), the chained outputs equal ONNX
Runtime on the whole model, a plan with row parts is built too, and a wrong model file,
a wrong expected digest and a missing token are each refused with one line while the
worker keeps serving what it served.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from runtime.ensure import EnsureError, ensure_units
from runtime.executor import RemoteExecutor
from runtime.stages import BundleView, open_bundle
from stagebundle.load import sha256_file
from tests.test_runtime_fixtures import DEVICES, ROOT, TOKEN, Built, build, reference, sample

NEW = "adapt/p1"  # the key the newly planned bundle is served under


@dataclass
class ModelWorkers:
    """``runtime serve --model`` processes, one per device."""

    work: Path
    procs: dict[str, subprocess.Popen[bytes]]
    hosts: dict[str, str]

    def store(self, device: str) -> Path:
        return self.work / f"store-{device}"

    def alive(self, device: str) -> bool:
        return self.procs[device].poll() is None

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.kill()
            proc.wait(10)


def serve_model(model: Path, device: str, work: Path, token_file: Path | None,
                timeout: float = 60.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``runtime serve --model``; the process and its ``host:port``."""
    pf = work / f"{device}.port.json"
    pf.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--model", str(model),
           "--device", device, "--listen", "127.0.0.1:0", "--port-file", str(pf),
           "--store", str(work / f"store-{device}"), "--threads", "1", "--quiet"]
    if token_file is not None:
        cmd += ["--token-file", str(token_file)]
    with open(work / f"{device}.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log)
    end = time.monotonic() + timeout
    while not pf.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"worker {device} did not start: "
                               + (work / f"{device}.log").read_text()[-2000:])
        time.sleep(0.05)
    return proc, f"127.0.0.1:{json.loads(pf.read_text())['port']}"


def split_plan_bundle(built: Built, out: Path) -> Path:
    """tiny_cnn planned anew: conv1..conv2 split by rows over edge and hub, the rest on
    the cloud (stages and parts the first bundle does not have)."""
    from partitioner import ir
    from partitioner.analysis.system import load_system
    from partitioner.backend import compile_bundle
    from partitioner.frontend import load_model

    plan = ir.Plan("optimal", "latency", (
        ir.Stage(None, None, 0, 1, id=0, parts=(ir.Part("edge", None, (0, 3)),
                                                 ir.Part("hub", None, (4, 7)))),
        ir.Stage("cloud", None, 2, 3, id=1)), ir.Estimate(0, 0, 0, 0, 0), 0.0)
    return Path(compile_bundle(load_model(built.model), plan, load_system(built.system), out,
                               force=True))


def run_on(built: Built, hosts: dict[str, str], views: dict[str, BundleView], key: str,
           x: np.ndarray) -> np.ndarray:
    """One request on plan ``key`` (the executor switches to it first)."""
    with RemoteExecutor(views, hosts, token=TOKEN, timeout=30.0) as ex:
        ex.switch_plan(key)
        out = ex.infer({"input": x})
        assert ex.records[-1]["plan"] == key
    return next(iter(out.values()))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Built, ModelWorkers]]:
    built = build(tmp_path_factory.mktemp("model-worker"), fallbacks=False)
    work = tmp_path_factory.mktemp("model-workers")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    hosts: dict[str, str] = {}
    try:
        for d in DEVICES:
            procs[d], hosts[d] = serve_model(built.model, d, work, built.token_file)
        workers = ModelWorkers(work, procs, hosts)
        ensure_units(hosts, built.bundle, TOKEN)  # the compiled plan, as "main"
        yield built, workers
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(10)


def test_a_model_worker_builds_a_new_plan_byte_identical_and_serves_it(setup, tmp_path):
    built, workers = setup
    x = sample(3)
    want = reference(built.model, x)
    main = open_bundle(built.bundle)
    np.testing.assert_allclose(run_on(built, workers.hosts, {"main": main}, "main", x), want,
                               rtol=1e-5, atol=1e-5)
    new_dir = split_plan_bundle(built, tmp_path / "p1")  # never shown to the workers
    new = open_bundle(new_dir, key=NEW)
    replies = ensure_units(workers.hosts, new, TOKEN, key=NEW)
    assert replies["edge"]["built"] == ["0.0"] and replies["hub"]["built"] == ["0.1"]
    assert replies["cloud"]["built"] == ["1"]
    for unit in new.units():  # what each worker wrote is what compile wrote, byte for byte
        copy = workers.store(unit.device) / NEW.replace("/", "__") / unit.file
        assert copy.read_bytes() == (new_dir / unit.file).read_bytes(), unit.key
    got = run_on(built, workers.hosts, {"main": main, NEW: new}, NEW, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # ensuring the same plan again builds nothing; the old plan still serves
    again = ensure_units(workers.hosts, new, TOKEN, key=NEW)
    assert all(r["built"] == [] for r in again.values())
    np.testing.assert_allclose(run_on(built, workers.hosts, {"main": main}, "main", x), want,
                               rtol=1e-5, atol=1e-5)


def _tampered(bundle: BundleView, stage: int, key: str) -> BundleView:
    """The plan with a wrong expected digest for stage ``stage``'s file."""
    from dataclasses import replace

    stages = list(bundle.bundle.stages)
    stages[stage] = replace(stages[stage], sha256="0" * 64)
    return BundleView(key, replace(bundle.bundle, stages=tuple(stages)))


def test_a_wrong_expected_sha256_is_refused_and_the_worker_keeps_serving(setup):
    built, workers = setup
    main = open_bundle(built.bundle)
    bad = _tampered(open_bundle(built.bundle), 1, "adapt/bad-digest")
    with pytest.raises(EnsureError) as err:
        ensure_units(workers.hosts, bad, TOKEN, key="adapt/bad-digest")
    message = str(err.value)
    assert "\n" not in message
    assert "device hub" in message and "stage 1 (hub)" in message and "sha256" in message
    assert "expects 0000000000000000" in message
    assert all(workers.alive(d) for d in DEVICES)
    assert not (workers.store("hub") / "adapt__bad-digest").exists()  # nothing left behind
    x = sample(4)
    np.testing.assert_allclose(run_on(built, workers.hosts, {"main": main}, "main", x),
                               reference(built.model, x), rtol=1e-5, atol=1e-5)


def test_a_plan_under_a_served_key_with_other_stages_is_refused(setup, tmp_path):
    built, workers = setup
    other = open_bundle(split_plan_bundle(built, tmp_path / "other"))  # as "main"
    with pytest.raises(EnsureError, match="a new plan needs a new key"):
        ensure_units(workers.hosts, other, TOKEN, key="main")


def test_an_unauthenticated_ensure_is_refused(setup):
    built, workers = setup
    for token in (None, "wrong-token"):
        with pytest.raises(EnsureError) as err:
            ensure_units(workers.hosts, open_bundle(built.bundle), token, key="adapt/anon")
        assert "\n" not in str(err.value) and "wrong token" in str(err.value)
    for d in DEVICES:  # nothing was built
        assert not (workers.store(d) / "adapt__anon").exists()
        assert workers.alive(d)


def test_a_worker_with_another_model_file_is_refused_by_fingerprint(setup, tmp_path):
    built, workers = setup
    model = onnx.load(str(built.model))
    w = model.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + 1.0, w.name))
    other = tmp_path / "tiny_cnn.onnx"  # same name, same graph, other weights
    onnx.save(model, str(other))
    proc, address = serve_model(other, "hub", tmp_path, built.token_file)
    try:
        hosts = {**workers.hosts, "hub": address}
        with pytest.raises(EnsureError) as err:
            ensure_units(hosts, open_bundle(built.bundle), TOKEN, devices=["hub"])
        message = str(err.value)
        assert "\n" not in message and "model fingerprint" in message
        assert proc.poll() is None  # still serving (health answers)
        from runtime.executor import probe
        from runtime.transport import parse_address

        assert probe(parse_address(address))
    finally:
        proc.kill()
        proc.wait(10)


def test_runtime_run_prepares_model_workers_from_the_bundle_alone(setup, tmp_path):
    """``runtime run BUNDLE --hosts`` against ``--model`` workers: the bundle's plans are
    ensured first (fresh workers, so they are built), then the request runs."""
    built, _ = setup
    procs = {}
    try:
        hosts = {}
        for d in DEVICES:
            procs[d], hosts[d] = serve_model(built.model, d, tmp_path, built.token_file)
        x = sample(5)
        np.save(tmp_path / "x.npy", x)
        out = tmp_path / "out.npz"
        run = subprocess.run(
            [sys.executable, "-m", "runtime.cli", "run", str(built.bundle), "--hosts",
             ",".join(f"{d}={a}" for d, a in hosts.items()), "--input",
             f"input={tmp_path / 'x.npy'}", "--token-file", str(built.token_file),
             "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        got = next(iter(np.load(out).values()))
        np.testing.assert_allclose(got, reference(built.model, x), rtol=1e-5, atol=1e-5)
        for d in DEVICES:
            stage = next(u for u in open_bundle(built.bundle).units() if u.device == d)
            assert sha256_file(tmp_path / f"store-{d}" / "main" / stage.file) == stage.sha256
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(10)


BLOCKED = ("mip", "torch", "tqdm", "matplotlib", "onnxscript")


def test_the_builder_needs_no_solver_tqdm_or_torch(setup, tmp_path):
    """``--model`` works on the lean install (onnx, numpy, onnxruntime): building every
    unit of a plan with row parts imports none of the compiler's other dependencies."""
    built, _ = setup
    new_dir = split_plan_bundle(built, tmp_path / "p1")
    script = f"""
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from pathlib import Path
from runtime.build import ModelBuilder
doc = json.loads(Path({str(new_dir / 'manifest.json')!r}).read_text())
b = ModelBuilder({str(built.model)!r}, {str(tmp_path / 'store')!r})
out = []
for i, d in enumerate(('edge', 'hub', 'cloud')):
    folder = Path({str(tmp_path)!r}) / ('out' + str(i))
    folder.mkdir()
    out += b.build(doc, d, folder)
print(json.dumps(out))
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == ["0.0", "0.1", "1"]


def test_runtime_run_adapt_needs_only_the_bundle_and_hosts(tmp_path):
    """A bundle from ``partitioner compile`` records its model and system (``planning``):
    ``runtime run BUNDLE --hosts ... --adapt`` against ``--model`` workers then needs
    nothing else; every request is answered once."""
    from partitioner.backend.planning import planning_inputs
    from stagebundle import load_bundle
    from tests.test_adapt_fixtures import build_solved

    built = build_solved(tmp_path / "b", fallbacks=False)
    inputs = planning_inputs(load_bundle(built.bundle))
    assert inputs.model == built.model.resolve() and inputs.objective.kind == "latency"
    assert {d.name for d in inputs.system.devices} == set(DEVICES)
    procs = {}
    try:
        hosts = {}
        for d in DEVICES:
            procs[d], hosts[d] = serve_model(built.model, d, tmp_path, built.token_file)
        np.save(tmp_path / "x.npy", sample(6))
        run = subprocess.run(
            [sys.executable, "-m", "runtime.cli", "run", str(built.bundle), "--hosts",
             ",".join(f"{d}={a}" for d, a in hosts.items()), "--input",
             f"input={tmp_path / 'x.npy'}", "--token-file", str(built.token_file),
             "--repeat", "12", "--adapt", "--json", "-o", str(tmp_path / "out.npz")],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        doc = json.loads(run.stdout)
        assert doc["summary"]["ok"] == 12
        assert doc["summary"]["lost"] == 0 and doc["summary"]["duplicated"] == 0
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(10)


def test_on_demand_fail_over_has_model_workers_build_the_fallback(tmp_path):
    """A device dies; the executor's re-planner compiles a fallback on its own disk and
    the surviving ``--model`` workers build its units (no shared storage needed)."""
    from runtime.replan import Replanner

    built = build(tmp_path / "b", fallbacks=False)
    procs = {}
    try:
        hosts = {}
        for d in DEVICES:
            procs[d], hosts[d] = serve_model(built.model, d, tmp_path, built.token_file)
        ensure_units(hosts, built.bundle, TOKEN)
        replanner = Replanner(built.bundle, built.model, built.system, token=TOKEN)
        with RemoteExecutor(built.bundle, hosts, token=TOKEN, timeout=60.0,
                            attempt_timeout=10.0, replanner=replanner) as ex:
            replanner.bind(ex)
            x = sample(7)
            ex.infer({"input": x})
            procs["hub"].kill()
            procs["hub"].wait(10)
            got = next(iter(ex.infer({"input": x}).values()))
            plan = ex.records[-1]["plan"]
        assert plan == "fallback/without-hub"
        np.testing.assert_allclose(got, reference(built.model, x), rtol=1e-5, atol=1e-5)
        fallback = open_bundle(built.bundle / "fallback" / "without-hub")
        for unit in fallback.units():  # built by the survivor that runs it, in its store
            copy = tmp_path / f"store-{unit.device}" / "fallback__without-hub" / unit.file
            assert sha256_file(copy) == unit.sha256, unit.key
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("args, message", [
    (["BUNDLE", "--model", "MODEL"], "give a BUNDLE_DIR or --model MODEL.onnx"),
    ([], "give a BUNDLE_DIR or --model MODEL.onnx"),
    (["--model", "MISSING"], "no such file"),
    (["--model", "MODEL", "--grpc-port", "0"], "--grpc-port needs a BUNDLE_DIR"),
    (["BUNDLE", "--store", "STORE"], "--store goes with --model"),
])
def test_serve_model_bad_options_are_one_line_errors(setup, tmp_path, args, message):
    built, _ = setup
    subst = {"BUNDLE": str(built.bundle), "MODEL": str(built.model),
             "MISSING": str(tmp_path / "missing.onnx"), "STORE": str(tmp_path / "s")}
    run = subprocess.run([sys.executable, "-m", "runtime.cli", "serve", "--device", "hub",
                          *[subst.get(a, a) for a in args]], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], run.stderr


def test_ensure_takes_the_manifest_text_with_its_sha256(setup, tmp_path):
    """``runtime.adapt`` sends the manifest file's text and its sha256: a ``--model``
    worker builds from it, and refuses text whose sha256 is not the one sent."""
    import hashlib

    from runtime.transport import connect, parse_address, recv_frame, send_frame

    built, workers = setup
    new_dir = split_plan_bundle(built, tmp_path / "p2")
    text = (new_dir / "manifest.json").read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()

    def ask(header: dict) -> dict:
        with connect(parse_address(workers.hosts["cloud"]), 60.0, None) as sock:
            send_frame(sock, {**header, "token": TOKEN})
            return recv_frame(sock, max_body=0, frame_timeout=120.0).header

    bad = ask({"type": "ensure", "plan": "adapt/p2", "manifest": text, "sha256": "0" * 64})
    assert bad["type"] == "error" and "sha256" in bad["message"]
    good = ask({"type": "ensure", "plan": "adapt/p2", "manifest": text, "sha256": digest})
    assert good["type"] == "ensured" and good["built"] == ["1"]
