"""benchmarks/message_path.py: the marks of three real workers and an executor line up
into one request's steps (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.message_path import Marks, _group, install_marks, step_medians

ROOT = Path(__file__).resolve().parents[1]


def _stream(*points: tuple[float, str]) -> list[tuple[float, str]]:
    return list(points)


def test_steps_follow_the_common_order_and_leave_out_the_others() -> None:
    ex = _stream((0.0, "infer0"), (0.010, "infer1"), (1.0, "infer0"), (1.012, "infer1"),
                 (2.0, "infer0"), (2.010, "infer1"))
    edge = _stream((0.002, "run0"), (0.006, "run1"), (1.002, "run0"), (1.008, "run1"),
                   (2.007, "run1"), (2.008, "run0"))  # the third request out of order
    out = step_medians({"executor": ex, "edge": edge})
    assert (out["requests"], out["used"]) == (3, 2)
    assert [(s["from"], s["to"]) for s in out["steps"]] == [
        ("ex:infer0", "edge:run0"), ("edge:run0", "edge:run1"), ("edge:run1", "ex:infer1")]
    assert [round(s["median_us"]) for s in out["steps"]] == [2000, 5000, 4000]
    assert round(out["wall_ms"], 6) == 11.0


def test_the_accepted_answer_does_not_split_the_requests() -> None:
    ex = _stream((0.0, "infer0"), (0.001, "request0"), (0.003, "request1"),
                 (0.010, "infer1"), (1.0, "infer0"), (1.001, "request0"),
                 (1.0035, "request1"), (1.010, "infer1"))
    edge = _stream((0.002, "run0"), (0.008, "run1"), (1.004, "run0"), (1.008, "run1"))
    out = step_medians({"executor": ex, "edge": edge})
    assert out["used"] == 2  # the ack came before the run once, during it once


def test_groups() -> None:
    def g(a: str, b: str) -> str:
        return _group({"from": a, "to": b})

    assert g("hub:run0", "hub:run1") == "compute"
    assert g("edge:send0", "hub:header") == "transfer"
    assert g("hub:header", "hub:body") == "transfer"
    assert g("hub:_admit0", "hub:_admit1") == "admission check"
    assert g("hub:run1", "hub:_forward0") == "forwarding"
    assert g("hub:body", "hub:_handle0") == "server and handler"
    assert g("ex:_gather0", "ex:_gather1") == "executor, other"


def test_marks_keep_order_and_stop_at_capacity() -> None:
    marks = Marks(capacity=3)
    for tag in ("a", "b", "a", "c"):
        marks.mark(tag)
    got = marks.to_json()
    assert [t for _, t in got] == ["a", "b", "a"]
    assert got[0][0] <= got[1][0] <= got[2][0]


def test_marks_come_out_again() -> None:
    import runtime.server
    from runtime.executor import RemoteExecutor
    from runtime.worker import Worker

    before = (Worker._admit, runtime.server.recv_frame)
    uninstall = install_marks(Marks())
    assert Worker._admit is not before[0] and "_gather" in vars(RemoteExecutor)
    uninstall()
    assert (Worker._admit, runtime.server.recv_frame) == before
    assert "_gather" not in vars(RemoteExecutor)  # inherited again, not a copy


def test_a_short_run_on_real_workers(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "message_path.py"), "--models",
         "tiny_cnn", "--requests", "8", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "message_path.json").read_text())
    row = doc["models"][0]
    assert row["requests"] == 8 and row["used"] >= 1
    processes = {part.split(":")[0] for s in row["steps"] for part in (s["from"], s["to"])}
    assert processes == {"ex", "edge", "hub", "cloud"}  # every worker's marks came back
    assert {"compute", "transfer", "admission check"} <= set(row["groups_us"])
    assert set(row["admission"]) == {"back_to_back_us", "after_4ms_sleep_us",
                                     "after_64MiB_written_us"}
    assert (tmp_path / "message_path.png").stat().st_size > 1000


def test_an_unknown_model_is_one_line_and_exit_2(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "message_path.py"), "--models", "nosuch",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "unknown model 'nosuch'" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())
