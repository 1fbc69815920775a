"""``partitioner compile``: plan like ``plan``, write the bundle, report it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import models
from partitioner.backend import load_bundle
from partitioner.cli import main

# A slow camera device, a fast hub on a good LAN: the solver splits yolo_small.
SYSTEM = """
[[device]]
name = "cam"
class = "edge"
flops = 2e9
memory_bandwidth = 5e9
network_bandwidth = 1e9
trusted = true

[[device]]
name = "hub"
class = "hub"
flops = 2e11
memory_bandwidth = 5e10
network_bandwidth = 1e9

[[link]]
between = ["cam", "hub"]
bandwidth = 1e9

[application]
source = "cam"
destination = "cam"
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cli")
    model = models.save_model("yolo_small", d / "yolo.onnx", image_size=160)
    system = d / "system.toml"
    system.write_text(SYSTEM)
    return model, system


def test_compile_json_is_one_document_and_the_bundle_loads(files, tmp_path, capsys):
    model, system = files
    out = tmp_path / "bundle"
    rc = main(["compile", str(model), "--system", str(system), "--private", "2",
               "-o", str(out), "--json", "--triton"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    doc = json.loads(captured.out)  # nothing else on stdout (solver logs go to stderr)
    b = load_bundle(out)
    assert len(b.stages) >= 2, "the private layers stay on cam, the rest pays off on the hub"
    assert b.stages[0].device == "cam" and b.stages[0].first == 0 and b.stages[0].last >= 1
    assert [s["device"] for s in doc["stages"]] == [s.device for s in b.stages]
    assert doc["verification"]["max_rel_diff"] <= 1e-4
    assert all((out / s.triton / "config.pbtxt").is_file() for s in b.stages)
    assert b.plan["status"] == "optimal"
    # the timeline priced by the cost table adds up to the solver's latency
    assert sum(s["duration"] for s in doc["timeline"]) == pytest.approx(
        doc["estimate"]["latency"], rel=1e-6)


def test_compile_text_report_and_no_verify(files, tmp_path, capsys):
    model, system = files
    out = tmp_path / "b"
    assert main(["compile", str(model), "--system", str(system), "-o", str(out),
                 "--no-verify", "--objective", "throughput"]) == 0
    text = capsys.readouterr().out
    assert "not verified" in text and "stage 0" in text
    assert load_bundle(out).verification is None


def test_existing_output_refused_before_solving(files, tmp_path, capsys):
    model, system = files
    out = tmp_path / "b"
    out.mkdir()
    (out / "x").write_text("keep")
    assert main(["compile", str(model), "--system", str(system), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err and str(out) in err
    assert (out / "x").read_text() == "keep"


@pytest.mark.parametrize("extra, message", [
    (["--max-energy", "cam"], "--max-energy 'cam': expected DEVICE=JOULES"),
    (["--max-latency", "1e-9"], "latency"),
    (["--shape", "images=1,3"], "images"),
    (["--weights", "x"], "--weights 'x'"),
])
def test_bad_options_fail_in_one_line_and_write_nothing(files, tmp_path, capsys, extra,
                                                         message):
    model, system = files
    out = tmp_path / "b"
    assert main(["compile", str(model), "--system", str(system), "-o", str(out),
                 *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_system_file(files, tmp_path, capsys):
    model, _ = files
    assert main(["compile", str(model), "--system", str(tmp_path / "nope.toml"), "-o",
                 str(tmp_path / "b")]) == 2
    assert "nope.toml" in capsys.readouterr().err


def _unwritable(tmp_path: Path, where: str) -> tuple[Path, str]:
    """An output path that cannot be created, and a word its error must name."""
    if where == "under a file":
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        return blocker / "bundle", "a-file"
    # /proc is not writable even for root (tests may run as root, so chmod cannot do it)
    return Path("/proc/partitioner-test-bundle"), "/proc"


@pytest.mark.parametrize("where", ["under a file", "read-only place"])
def test_unwritable_output_is_one_line_and_exit_2(files, tmp_path, capsys, where):
    model, system = files
    out, named = _unwritable(tmp_path, where)
    if where == "read-only place" and not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    assert main(["compile", str(model), "--system", str(system), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and named in err, err
    assert err.startswith("partitioner compile: error:")
    assert not out.exists()


def test_an_output_error_during_the_write_is_one_line(files, tmp_path, capsys, monkeypatch):
    # What passes the early check but fails while writing (a full disk, a file system
    # that turns read-only) is still one line and exit 2, naming the file.
    import partitioner.backend as backend

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "b" / "stage0.onnx"))

    monkeypatch.setattr(backend, "compile_bundle", full_disk)
    model, system = files
    assert main(["compile", str(model), "--system", str(system), "-o",
                 str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "No space left on device" in err and "stage0.onnx" in err
