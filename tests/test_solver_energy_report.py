"""The plan's energy figures: only devices that have one (no invented 0 J)."""

from __future__ import annotations

import models
from partitioner import api
from partitioner.data import example_system_path


def without_power(tmp_path):
    """The packaged system with its power figures taken out."""
    lines = example_system_path().read_text().splitlines()
    system = tmp_path / "no-power.toml"
    system.write_text("\n".join(x for x in lines if not x.startswith("power =")))
    return system


def test_devices_without_energy_figures_are_not_reported(tmp_path):
    # No power figures, and the packaged links have no network model.
    result = api.plan(models.build_model("tiny_cnn"), without_power(tmp_path))
    assert result.plan.estimate.energy == {}
    assert result.plan.to_json()["estimate"]["energy"] == {}


def test_a_device_with_a_power_figure_is_reported(tmp_path):
    text = without_power(tmp_path).read_text().replace(
        'name = "pi3"', 'name = "pi3"\npower = 4.0', 1)
    system = tmp_path / "system.toml"
    system.write_text(text)
    result = api.plan(models.build_model("tiny_cnn"), system)
    energy = result.plan.estimate.energy
    assert set(energy) == {"pi3"}
    # pi3 computes at least the source/pre-processing pseudo layers at 4 W
    assert energy["pi3"] > 0


def test_an_energy_cap_on_a_device_without_energy_figures_is_refused(tmp_path):
    # In-memory (same-device) transfers carry no energy figure, so they must not make
    # the cap look checkable.
    import pytest

    from partitioner.errors import UserError
    from partitioner.ir import Objective

    with pytest.raises(UserError, match="energy cap of 'pi3'.*no energy figure"):
        api.plan(models.build_model("tiny_cnn"), without_power(tmp_path),
                 objective=Objective(max_energy={"pi3": 1.0}))
