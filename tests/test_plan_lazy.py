"""``partitioner plan`` loads the model with lazy weights (issue 16): the same plan.

Planning reads shapes and sizes, never the weight bytes, so the CLI leaves a model's big
inline initialisers in its file (as ``partitioner compile`` does). Each case runs the real
CLI entry point twice: once as it is (lazy) and once with the load forced eager, and the
two outputs must be the same apart from the solver's wall time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import models
from partitioner import pipeline
from partitioner.cli import main
from partitioner.frontend.inline_weights import LAZY_MIN_BYTES, is_inline_ref
from tests.test_cli_plan import SYSTEM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("plan_lazy")
    (d / "system.toml").write_text(SYSTEM)
    for name in ("tiny_cnn", "tiny_branchy", "mobilenet_v2"):
        onnx.save(models.build_model(name), str(d / f"{name}.onnx"))  # weights inline
    xs = np.random.default_rng(3).standard_normal((6, 1, 3, 32, 32)).astype(np.float32)
    np.savez(d / "cal.npz", input=xs)
    return d


def _plan_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
              argv: list[str], *, eager: bool) -> tuple[str, list[Any]]:
    """stdout of ``partitioner plan ARGV`` and the initialisers of the model it planned;
    ``eager``: the CLI's ``pipeline.plan`` call is made with ``lazy_weights=False``."""
    real_plan = pipeline.plan
    seen: list[Any] = []

    def plan(*args: Any, **kwargs: Any) -> pipeline.PlanResult:
        if eager:
            kwargs["lazy_weights"] = False
        result = real_plan(*args, **kwargs)
        seen.extend(result.prepared.model.graph.initializer)
        return result

    with monkeypatch.context() as m:
        m.setattr(pipeline, "plan", plan)
        rc = main(["plan", *argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out, seen


def _without_solve_time(out: str, as_json: bool) -> Any:
    if as_json:
        doc = json.loads(out)
        assert doc.pop("solve_seconds") >= 0
        return doc
    return re.sub(r"solved in [0-9.]+ s", "solved in - s", out)


CASES = {
    "latency json": ("tiny_cnn", ["--json"]),
    "latency report": ("tiny_cnn", []),
    "throughput, private layers": ("tiny_cnn", ["--objective", "throughput", "--private",
                                                 "2", "--json"]),
    "energy": ("tiny_cnn", ["--objective", "energy", "--json"]),
    "mobilenet_v2": ("mobilenet_v2", ["--json"]),
    "measured exit": ("tiny_branchy", ["--exit", "exit1@0.2", "--calibration", "{cal}",
                                       "--json"]),
    "int8 layers": ("tiny_cnn", ["--quantize", "--quantize-layers", "3", "--max-noise", "10",
                                 "--json"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lazy_plan_is_the_eager_plan(work, monkeypatch, capsys, case: str) -> None:
    name, extra = CASES[case]
    monkeypatch.setenv("PARTITIONER_CACHE", str(work / "cache"))
    argv = [str(work / f"{name}.onnx"), "--system", str(work / "system.toml"), "--quiet",
            *(a.replace("{cal}", str(work / "cal.npz")) for a in extra)]
    lazy_out, lazy_init = _plan_cli(monkeypatch, capsys, argv, eager=False)
    eager_out, eager_init = _plan_cli(monkeypatch, capsys, argv, eager=True)
    # the CLI really left the big weights in the file, and the eager run did not
    big = [t for t in eager_init if len(t.raw_data) > LAZY_MIN_BYTES]
    assert big, f"{name} has an initialiser above {LAZY_MIN_BYTES} bytes"
    assert not any(is_inline_ref(t) for t in eager_init)
    by_name = {t.name: t for t in lazy_init}
    assert all(is_inline_ref(by_name[t.name]) for t in big)
    as_json = "--json" in argv
    assert _without_solve_time(lazy_out, as_json) == _without_solve_time(eager_out, as_json)


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "partitioner", "plan", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_bad_model_files_are_one_line_and_exit_2(work, tmp_path) -> None:
    whole = (work / "mobilenet_v2.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(whole[: len(whole) // 2])  # ends inside a big weight left in the file
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff" * 64)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    system = str(work / "system.toml")
    for path, message in [(cut, "not a valid ONNX file"), (junk, "not a valid ONNX file"),
                          (empty, "not an ONNX model"), (tmp_path / "none.onnx",
                                                         "no such file"),
                          (tmp_path, "not a file")]:
        done = _cli(str(path), "--system", system, "--json")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, done.stderr
        assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], done.stderr
        assert done.stdout == ""


_MODULES_AFTER_PLAN = """
import sys
from partitioner.cli import main
rc = main(["plan", *sys.argv[1:]])
print(rc, " ".join(sorted(m for m in sys.modules if m == "mip" or m.startswith("mip."))))
"""


@pytest.mark.parametrize("extra, integer_program", [([], False),
                                                    (["--max-latency", "10"], True)])
def test_mip_is_imported_only_when_an_integer_program_is_solved(work, extra,
                                                                integer_program) -> None:
    """The fast paths (no caps, memories that hold any placement) never load python-mip;
    a latency cap needs the integer program, and it still solves."""
    done = subprocess.run([sys.executable, "-c", _MODULES_AFTER_PLAN,
                           str(work / "tiny_cnn.onnx"), "--system", str(work / "system.toml"),
                           "--json", *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    *doc, last = done.stdout.strip().splitlines()
    assert json.loads("\n".join(doc))["status"] == "optimal"
    rc, *loaded = last.split()
    assert rc == "0"
    assert ("mip" in loaded) is integer_program, loaded
