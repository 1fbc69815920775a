"""``partitioner.pipeline``: the one plan / compile / replan sequence every caller runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import models
from partitioner import api, pipeline
from partitioner.analysis.profiles import Profile, ProfiledBundle, save_profile
from partitioner.analysis.system import load_system
from partitioner.cli import main
from partitioner.errors import UserError
from partitioner.frontend import PreparedModel, load_model
from partitioner.ir import Objective
from runtime.replan import compile_fallbacks, compile_without
from stagebundle import load_bundle

# Three devices, the source/destination pinned to the slow camera: the hub pays off.
SYSTEM = """
[[device]]
name = "cam"
class = "edge"
flops = 2e8
memory_bandwidth = 5e9
network_bandwidth = 1e9
power = 2.0

[[device]]
name = "hub"
class = "hub"
flops = 2e11
memory_bandwidth = 5e10
network_bandwidth = 1e9

[[device]]
name = "cloud"
class = "cloud"
flops = 1e11
memory_bandwidth = 5e10
network_bandwidth = 1e9

[[link]]
between = ["cam", "hub"]
bandwidth = 1e9

[[link]]
between = ["cam", "cloud"]
bandwidth = 1e9

[[link]]
between = ["hub", "cloud"]
bandwidth = 1e9

[application]
source = "cam"
destination = "cam"
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pipeline")
    model = models.save_model("tiny_cnn", d / "tiny.onnx")
    system = d / "system.toml"
    system.write_text(SYSTEM)
    return model, system


def _stages(plan) -> list[tuple[str | None, int, int]]:
    return [(s.device, s.first, s.last) for s in plan.stages]


def test_plan_from_files_objects_or_a_prepared_model_is_the_same(files) -> None:
    model, system = files
    from_files = pipeline.plan(model, system)
    prepared = load_model(model)
    from_objects = pipeline.plan(prepared, load_system(system))
    assert isinstance(from_files.prepared, PreparedModel)
    assert from_objects.prepared is prepared  # not loaded again
    assert _stages(from_files.plan) == _stages(from_objects.plan)
    assert from_files.plan.estimate.latency == pytest.approx(
        from_objects.plan.estimate.latency, rel=1e-12)
    assert from_files.objective == Objective() and from_files.bundle is None
    # the stages of the plan use the hub (the camera is 1000x slower)
    assert "hub" in {s.device for s in from_files.plan.stages}


def test_the_api_and_the_cli_plan_through_the_pipeline(files, capsys) -> None:
    model, system = files
    objective = Objective(kind="energy", max_latency=1.0)
    direct = pipeline.plan(model, system, objective=objective)
    via_api = api.plan(model, system, objective=objective)
    assert via_api.objective == objective
    assert _stages(via_api.plan) == _stages(direct.plan)
    assert main(["plan", str(model), "--system", str(system), "--objective", "energy",
                 "--max-latency", "1.0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(s["device"], *s["layers"]) for s in doc["stages"]] == _stages(direct.plan)


def test_profiles_as_files_or_loaded_price_the_same(files, tmp_path) -> None:
    model, system = files
    graph = load_model(model).graph
    n = len(graph.layers)
    # a hub that (by this profile) takes 1 s per layer: the plan must avoid it
    profile = Profile(device="hub", sha256=graph.sha256, granularity="major",
                      layers=tuple(layer.name for layer in graph.layers), runs=1, trim=0.0,
                      bundles=tuple(ProfiledBundle(a, b, None, float(b - a + 1))
                                    for a in range(n) for b in range(a, n)))
    save_profile(profile, tmp_path / "hub.json")
    loaded = pipeline.plan(model, system, profiles=[profile])
    from_file = pipeline.plan(model, system, profiles=[tmp_path / "hub.json"])
    assert loaded.table.sources["hub"] == from_file.table.sources["hub"] == "profile"
    assert _stages(loaded.plan) == _stages(from_file.plan)
    assert "hub" not in {s.device for s in loaded.plan.stages}


def test_the_system_file_is_checked_before_the_model(tmp_path) -> None:
    with pytest.raises(UserError, match="nope.toml"):
        pipeline.plan(tmp_path / "missing.onnx", tmp_path / "nope.toml")
    with pytest.raises(UserError, match="--mbs"):
        pipeline.plan(tmp_path / "missing.onnx", tmp_path / "nope.toml", mbs=0)


def test_compile_refuses_a_used_output_before_loading_the_model(files, tmp_path) -> None:
    _, system = files
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        pipeline.compile(tmp_path / "missing.onnx", system, out)
    assert (out / "keep").read_text() == "x"


@pytest.fixture(scope="module")
def compiled(files, tmp_path_factory) -> pipeline.PlanResult:
    model, system = files
    result = pipeline.compile(model, system, tmp_path_factory.mktemp("c") / "bundle",
                              objective=Objective(kind="latency", max_latency=10.0))
    assert result.bundle is not None and (result.bundle / "manifest.json").is_file()
    return result


def test_compile_writes_the_bundle_of_the_plan(compiled) -> None:
    assert compiled.bundle is not None
    bundle = load_bundle(compiled.bundle)
    assert [(s.device, s.first, s.last) for s in bundle.stages] == _stages(compiled.plan)


def test_replan_without_a_device_writes_a_fallback_bundle(files, compiled) -> None:
    model, system = files
    assert compiled.bundle is not None
    out = pipeline.replan(compiled.bundle, model, system, ["hub"])
    assert out == compiled.bundle / "fallback" / "without-hub"
    fallback = load_bundle(out)
    assert "hub" not in fallback.devices
    assert fallback.model.sha256 == load_bundle(compiled.bundle).model.sha256
    assert fallback.plan["objective"] == "latency"  # the kind kept, the cap dropped
    # the runtime's names call the same function
    assert compile_without(compiled.bundle, model, system, ["hub"]) == out
    made = compile_fallbacks(compiled.bundle, model, system)
    assert set(made) == set(load_bundle(compiled.bundle).devices) - {"cam"}
    assert made["hub"] == out


def test_replan_refuses_another_model_or_an_unknown_device(files, compiled, tmp_path
                                                           ) -> None:
    model, system = files
    assert compiled.bundle is not None
    other = models.save_model("tiny_cnn", tmp_path / "other.onnx", seed=7)
    with pytest.raises(UserError, match="sha256 differs"):
        pipeline.replan(compiled.bundle, other, system, ["hub"])
    with pytest.raises(UserError, match="--device tpu: not a device of"):
        pipeline.replan(compiled.bundle, model, system, ["tpu"])
    # the pinned camera cannot be lost: no plan, no folder
    assert pipeline.replan(compiled.bundle, model, system, ["cam"]) is None
    assert not (compiled.bundle / "fallback" / "without-cam").exists()


def test_replan_drops_the_profile_of_the_lost_device(files, compiled) -> None:
    model, system = files
    assert compiled.bundle is not None
    graph = compiled.prepared.graph
    n = len(graph.layers)
    hub = Profile(device="hub", sha256=graph.sha256, granularity="major",
                  layers=tuple(layer.name for layer in graph.layers), runs=1, trim=0.0,
                  bundles=tuple(ProfiledBundle(a, b, None, 1e-3)
                                for a in range(n) for b in range(a, n)))
    out = pipeline.replan(compiled.bundle, model, system, ["hub"], profiles=[hub])
    assert out is not None and "hub" not in load_bundle(out).devices


def test_system_without_removes_devices_and_their_links(files) -> None:
    _, system = files
    reduced = pipeline.system_without(load_system(system), ["hub"])
    assert [d.name for d in reduced.devices] == ["cam", "cloud"]
    assert all("hub" not in (k.a, k.b) for k in reduced.links) and len(reduced.links) == 1
    assert pipeline.fallback_name(["b", "a"]) == "without-a+b"
