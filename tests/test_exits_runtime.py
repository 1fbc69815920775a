"""Early exits at run time: a request whose head is confident returns the head's output
(equal to ONNX Runtime's on the whole model) and the later stages never see it; the others
return the main output. In process, on real `runtime serve` workers, and from the CLIs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import models
from partitioner import ir, pipeline
from partitioner.analysis.exits import route_exits
from partitioner.analysis.routing import route_plan
from partitioner.backend import compile_bundle
from runtime.executor import LocalExecutor, RemoteExecutor
from runtime.transport import connect, recv_frame, send_frame
from stagebundle import load_bundle
from stagebundle.exits import confidence, draw, exit_taken
from tests.test_runtime_fixtures import ROOT, SYSTEM_TOML, TOKEN, Built, Cluster

N = 12


def _xs() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(N)]


def _reference(model: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"input": x}), strict=True))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Built, float, list[np.ndarray]]:
    """tiny_branchy on edge | hub | cloud, the exit head on the edge stage; the threshold
    is the median confidence of the inputs, so about half of them leave early."""
    root = tmp_path_factory.mktemp("exits-runtime")
    model, system = root / "tiny_branchy.onnx", root / "system.toml"
    models.save_model("tiny_branchy", model)
    system.write_text(SYSTEM_TOML)
    xs = _xs()
    conf = [confidence(_reference(model, x)["exit1"]) for x in xs]
    threshold = float(np.median(conf))
    calibration = root / "calibration.npz"
    np.savez(calibration, input=np.stack(xs))
    result = pipeline.plan(model, system, exits=[f"exit1@{threshold!r}"],
                           calibration=calibration)
    head = result.table.exits[0][1]
    assert head.threshold == threshold
    assert head.probability == pytest.approx(np.mean([c >= threshold for c in conf]))
    # a hand-made plan over three workers: conv1 + the branch | conv2, conv3 | fc
    stages = (ir.Stage("edge", None, 0, 2, exit=head), ir.Stage("hub", None, 3, 4),
              ir.Stage("cloud", None, 5, 5))
    plan = replace(result.plan, stages=stages, routes=(), placement=())
    plan = route_exits(result.prepared.graph, result.table,
                       route_plan(result.prepared.graph, result.table, plan))
    bundle = compile_bundle(result.prepared, plan, result.system, root / "bundle",
                            force=True, table=result.table)
    token = root / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    return Built(model, system, Path(bundle), token), threshold, xs


def _check(out: dict[str, np.ndarray], exit_name: str | None, ref: dict[str, np.ndarray],
           threshold: float) -> bool:
    """The result is the head's output alone when it is confident, else every output."""
    leaves = confidence(ref["exit1"]) >= threshold
    assert exit_name == ("exit1" if leaves else None)
    assert set(out) == ({"exit1"} if leaves else {"logits", "exit1"})
    for k, v in out.items():
        np.testing.assert_allclose(v, ref[k], rtol=1e-5, atol=1e-6)
    return leaves


def test_manifest_carries_the_exit_rule(setup) -> None:
    built, threshold, _ = setup
    bundle = load_bundle(built.bundle)
    rules = [s.exit for s in bundle.stages]
    assert rules[0] == {"output": "exit1", "probability": pytest.approx(0.5, abs=0.1),
                        "threshold": threshold}
    assert rules[1:] == [None, None]
    # the head's output goes straight to the destination; nothing skips the exit stage
    sends = {s.to: [t.name for t in s.tensors] for s in bundle.stages[0].sends}
    assert sends == {"output": ["exit1"], "1": ["pool1"]}
    assert [s.to for s in bundle.input_sends] == ["0"]


def test_local_executor_stops_at_the_exit(setup) -> None:
    built, threshold, xs = setup
    left = 0
    with LocalExecutor(built.bundle) as ex:
        for x in xs:
            out = ex.infer({"input": x})
            rec = ex.records[-1]
            leaves = _check(out, rec["exit"], _reference(built.model, x), threshold)
            left += leaves
            assert [t["stage"] for t in rec["timings"]] == (["0"] if leaves else
                                                             ["0", "1", "2"])
    assert 0 < left < len(xs)


def _stats(cluster: Cluster, device: str) -> dict:
    with connect(("127.0.0.1", int(cluster.info[device]["port"])), 5.0) as sock:  # type: ignore[call-overload]
        send_frame(sock, {"type": "ready", "token": TOKEN})
        return recv_frame(sock, max_body=0).header


def test_workers_return_the_exit_and_later_stages_see_no_work(setup, tmp_path: Path) -> None:
    built, threshold, xs = setup
    cluster = Cluster(built, tmp_path)
    try:
        cluster.start_all(("edge", "hub", "cloud"))
        with RemoteExecutor(built.bundle, cluster.hosts, token=TOKEN, timeout=30) as ex:
            futs = [ex.submit({"input": x}) for x in xs]  # pipelined
            outs = [f.result(60) for f in futs]
            by_id = {r["id"]: r for r in ex.records}
            exits = [by_id[f.request_id]["exit"] for f in futs]  # type: ignore[attr-defined]
        stats = {d: _stats(cluster, d) for d in ("edge", "hub", "cloud")}
    finally:
        cluster.stop()
    left = sum(_check(o, e, _reference(built.model, x), threshold)
               for o, e, x in zip(outs, exits, xs, strict=True))
    assert 0 < left < len(xs)
    go_on = len(xs) - left
    assert stats["edge"]["stats"]["completed"] == len(xs)
    assert stats["edge"]["stats"]["exited"] == left
    # the later stages ran (and received) only the requests that continued
    for d in ("hub", "cloud"):
        assert stats[d]["stats"]["completed"] == go_on
        assert stats[d]["stats"]["exited"] == 0
    assert stats["hub"]["received"] == {"pool1": go_on * 16 * 16 * 16 * 4}


def test_cli_compile_and_run_name_the_exit(setup, tmp_path: Path) -> None:
    built, threshold, xs = setup
    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, input=np.stack(xs))
    out_dir = tmp_path / "bundle"
    env_cmd = [sys.executable, "-m", "partitioner", "compile", str(built.model), "--system",
               str(built.system), "--exit", f"exit1@{threshold!r}", "--calibration",
               str(calibration), "-o", str(out_dir)]
    proc = subprocess.run(env_cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads((out_dir / "manifest.json").read_text())["plan"]
    assert [e["output"] for e in plan["exits"]] == ["exit1"]
    assert plan["estimate"]["expected_latency"] <= plan["estimate"]["latency"]
    for k in (0, 1):  # one request that leaves, one that does not (by confidence)
        x = next(x for x in xs if (confidence(_reference(built.model, x)["exit1"])
                                   >= threshold) == (k == 0))
        np.save(tmp_path / "x.npy", x)
        run = subprocess.run([sys.executable, "-m", "runtime.cli", "run", str(out_dir),
                              "--local", "--input", f"input={tmp_path / 'x.npy'}",
                              "-o", str(tmp_path / "out.npz"), "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        doc = json.loads(run.stdout)
        with np.load(tmp_path / "out.npz") as got:
            _check(dict(got), doc["runs"][0]["exit"], _reference(built.model, x), threshold)


def test_probability_mode_draws_from_the_request_id() -> None:
    rule = {"output": "exit1", "probability": 0.3, "threshold": None}
    taken = [exit_taken(rule, {}, f"r{k}") for k in range(4000)]
    assert abs(np.mean(taken) - 0.3) < 0.03
    # deterministic: a retry of the same request decides the same way
    assert taken == [exit_taken(rule, {}, f"r{k}") for k in range(4000)]
    assert draw("a", "exit1") != draw("a", "exit2")
    assert not exit_taken(None, {}, "r") and not exit_taken(
        {"output": "e", "probability": 0.0, "threshold": None}, {}, "r")


def test_confidence_is_the_largest_softmax_probability() -> None:
    logits = np.array([[0.0, 0.0, np.log(2.0)]])
    assert confidence(logits) == pytest.approx(0.5)
    batch = np.array([[0.0, 0.0, np.log(2.0)], [0.0, 10.0, 0.0]])
    assert confidence(batch) == pytest.approx(0.5)  # the least confident sample decides


def test_fail_over_keeps_the_exit_rule(setup, tmp_path: Path) -> None:
    """The hub is down: requests that continue are re-sent on the fallback without it,
    which carries the same head and rule; the ones that leave at the edge never needed it."""
    import shutil

    from runtime.replan import compile_fallbacks

    built, threshold, xs = setup
    copy = tmp_path / "bundle"
    shutil.copytree(built.bundle, copy)
    made = compile_fallbacks(copy, built.model, built.system, devices=["hub"])
    assert made["hub"] is not None
    fallback = load_bundle(made["hub"])
    assert [s.exit["output"] for s in fallback.stages if s.exit] == ["exit1"]
    assert next(s.exit for s in fallback.stages if s.exit)["threshold"] == threshold
    cluster = Cluster(replace(built, bundle=copy), tmp_path)
    try:
        cluster.start_all(("edge", "cloud"))
        hosts = dict(cluster.hosts, hub="127.0.0.1:1")  # nothing listens there
        with RemoteExecutor(copy, hosts, token=TOKEN, timeout=30) as ex:
            outs = [ex.infer({"input": x}) for x in xs]
            records = list(ex.records)
    finally:
        cluster.stop()
    for out, rec, x in zip(outs, records, xs, strict=True):
        leaves = _check(out, rec["exit"], _reference(built.model, x), threshold)
        if not leaves:  # only the fallback could finish it
            assert rec["plan"] == "fallback/without-hub"


def _two_exits(path: Path) -> Path:
    """conv1 -> exit1 | conv2 -> exit2 | conv3 -> logits (random weights)."""
    from models.builder import GraphBuilder

    g = GraphBuilder("two_exits", seed=5)
    x = g.input("input", (1, 3, 16, 16))
    heads = []
    for k in (1, 2):
        x = g.relu(g.conv(x, 8 * k, 3, name=f"conv{k}"), name=f"relu{k}")
        b = g.flatten(g.global_avgpool(x, name=f"exit{k}.avgpool"), name=f"exit{k}.flatten")
        heads.append(g.gemm(b, 5, name=f"exit{k}.fc"))
    x = g.relu(g.conv(x, 16, 3, name="conv3"), name="relu3")
    x = g.flatten(g.global_avgpool(x, name="avgpool"), name="flatten")
    g.output(g.gemm(x, 5, name="fc"), "logits")
    for k, h in enumerate(heads, start=1):
        g.output(h, f"exit{k}")
    import onnx

    onnx.save(g.build(), str(path))
    return path


def test_two_exits_in_probability_mode(tmp_path: Path) -> None:
    """Each head draws from the request id; a request leaves at the first head whose draw
    is below its probability, and returns that head's output (ONNX Runtime's)."""
    model = _two_exits(tmp_path / "two.onnx")
    system = tmp_path / "system.toml"
    system.write_text(SYSTEM_TOML)
    made = pipeline.compile(model, system, tmp_path / "bundle",
                            exits=["exit2=0.5", "exit1=0.4"])
    heads = [h for _, h in made.plan.exits]
    assert [(h.output, h.probability) for h in heads] == [("exit1", 0.4), ("exit2", 0.5)]
    # expected latency: the product of continuation probabilities weighs the tail
    assert made.plan.estimate.expected_latency < made.plan.estimate.latency
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    ref = _reference(model, x)
    seen = set()
    with LocalExecutor(made.bundle) as ex:
        for k in range(24):
            rid = f"req-{k}"
            out = ex.submit({"input": x}, request_id=rid).result(60)
            want = next((h.output for h in heads if draw(rid, h.output) < h.probability),
                        None)
            assert ex.records[-1]["exit"] == want
            assert set(out) == ({want} if want else {"logits", "exit1", "exit2"})
            for name, arr in out.items():
                np.testing.assert_allclose(arr, ref[name], rtol=1e-5, atol=1e-6)
            seen.add(want)
    assert seen == {"exit1", "exit2", None}
