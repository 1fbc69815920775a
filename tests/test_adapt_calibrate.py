"""Calibration: factors from measurements, and the one cost model on the scaled table."""

from __future__ import annotations

import pytest

from partitioner import ir, pipeline
from partitioner.analysis.routing import reprice
from runtime.calibrate import Calibration, unit_estimates
from tests.test_adapt_fixtures import build_solved


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> pipeline.PlanResult:
    built = build_solved(tmp_path_factory.mktemp("calibrate"), fallbacks=False)
    return pipeline.bundle_context(built.bundle, built.model, built.system)


def _hand_plan(context: pipeline.PlanResult) -> ir.Plan:
    """edge: conv1, hub: conv2..fc - a plan with a cross-device cut, routed."""
    est = ir.Estimate(0.0, 0.0, 0.0, 0.0, 0.0)
    plan = ir.Plan("optimal", "latency", (ir.Stage("edge", None, 0, 0, id=0),
                                          ir.Stage("hub", None, 1, 3, id=1)), est, 0.0)
    from partitioner.analysis.routing import route_plan

    return route_plan(context.prepared.graph, context.table, plan)


def test_unit_estimates_add_up_to_the_plans_compute(context) -> None:
    plan = _hand_plan(context)
    units = unit_estimates(context.table, plan)
    assert set(units) == {"0", "1"} and units["0"][0] == "edge" and units["1"][0] == "hub"
    assert sum(c for _, c in units.values()) == pytest.approx(
        reprice(context.prepared.graph, context.table, plan).compute)


def test_relative_factors_start_at_one_and_follow_the_drift(context) -> None:
    cal = Calibration(context.table, alpha=1.0)
    cal.observe_unit("hub", 2.0, 1.0)  # the file is off by 2x from the start
    cal.end_window()
    assert cal.compute_factors() == {}  # no reference yet
    cal.observe_unit("hub", 2.0, 1.0)
    cal.end_window()
    assert cal.compute_factors() == {"hub": pytest.approx(1.0)}
    assert cal.calibrated(["hub"]) and not cal.calibrated(["hub", "edge"])
    cal.observe_unit("hub", 6.0, 1.0)  # now 4 s slower than at the start
    cal.end_window()
    # the drift in seconds is added to the estimate: 1 + 4 (not the ratio 6 / 2)
    assert cal.compute_factors() == {"hub": pytest.approx(5.0)}
    cal.observe_unit("hub", 1.0, 1.0)  # too few runs in a window: the factor holds
    cal.end_window(min_samples=2)
    assert cal.compute_factors() == {"hub": pytest.approx(5.0)}
    for _ in range(3):  # no longer measured: without forget, it stays
        cal.end_window()
    assert cal.compute_factors() == {"hub": pytest.approx(5.0)}


def test_absolute_factors_against_the_file(context) -> None:
    cal = Calibration(context.table, alpha=0.5, baseline="file")
    cal.observe_unit("edge", 4.0, 1.0)
    cal.end_window()
    assert cal.compute_factors() == {"edge": pytest.approx(4.0)}
    cal.observe_unit("edge", 2.0, 1.0)
    cal.end_window()  # EWMA: 0.5 * 2 + 0.5 * 4
    assert cal.compute_factors() == {"edge": pytest.approx(3.0)}


def test_scaled_table_reprices_compute_and_links_by_the_one_cost_model(context) -> None:
    from partitioner.analysis.costs import network_transfer
    from partitioner.analysis.routing import messages

    graph, table = context.prepared.graph, context.table
    sys = table.system
    plan = _hand_plan(context)
    before = reprice(graph, table, plan)
    cal = Calibration(table, alpha=1.0)
    n = 50_000
    filed = network_transfer(sys, sys.device("edge"), sys.device("hub"), n)
    assert filed is not None
    for _ in range(2):  # reference windows: as the file says (absolute times differ)
        cal.observe_unit("hub", 1.0, 1.0)
        cal.observe_link("edge", "hub", 0.3 * filed.time, n)
        cal.end_window()
    cal.observe_unit("hub", 5.0, 1.0)
    cal.observe_link("edge", "hub", 0.3 * filed.time * 4, n)  # 0.9 x filed slower
    cal.observe_link("edge", "cloud", 1.0, n)  # a first window: no reference yet
    cal.observe_link("edge", "edge", 1.0, n)  # no link: in-device, not priced as one
    cal.end_window()
    assert cal.compute_factors() == {"hub": pytest.approx(5.0)}
    factors = cal.link_factors()
    assert factors == {("edge", "hub"): pytest.approx(1.9)}
    after = reprice(graph, cal.table(), plan)
    hub_compute = unit_estimates(table, plan)["1"][1]
    assert after.compute - before.compute == pytest.approx(4.0 * hub_compute)
    # every message between edge and hub (both ways: one undirected link) now takes g
    # times its filed time, g the link's factor
    g = 1.9
    crossing = [m for m in messages(graph, plan, plan.routes, table, None)
                if m.sender_device and m.receiver_device
                and m.sender_device != m.receiver_device]
    assert crossing
    filed_times = [network_transfer(sys, sys.device(m.sender_device),  # type: ignore[arg-type]
                                    sys.device(m.receiver_device), m.nbytes).time  # type: ignore[arg-type, union-attr]
                   for m in crossing]
    assert after.communication - before.communication == pytest.approx(
        (g - 1) * sum(filed_times), rel=1e-6)
    # the base table is untouched
    assert reprice(graph, table, plan).latency == pytest.approx(before.latency)


def test_a_drifted_device_is_planned_away_from(context) -> None:
    cal = Calibration(context.table, alpha=1.0)
    for ratio in (1.0, 1.0, 300.0):
        cal.observe_unit("hub", ratio, 1.0)
        cal.end_window()
    best = pipeline.solve_on(context, cal.table())
    assert {s.device for s in context.plan.stages} == {"hub"}
    assert "hub" not in {s.device for s in best.plan.stages}
    assert best.plan.estimate.latency < reprice(context.prepared.graph, cal.table(),
                                                context.plan).latency


def test_bad_options_are_refused(context) -> None:
    with pytest.raises(ValueError, match="baseline"):
        Calibration(context.table, baseline="guess")
    with pytest.raises(ValueError, match="alpha"):
        Calibration(context.table, alpha=0.0)


def test_a_factor_no_longer_measured_fades_back(context) -> None:
    cal = Calibration(context.table, alpha=1.0, forget=2)
    for ratio in (1.0, 1.0, 9.0):
        cal.observe_unit("hub", ratio, 1.0)
        cal.end_window()
    assert cal.compute_factors()["hub"] == pytest.approx(9.0)
    cal.end_window()  # one window without a measurement: held
    assert cal.compute_factors()["hub"] == pytest.approx(9.0)
    cal.end_window()
    cal.end_window()  # two more: one half-life
    assert cal.compute_factors()["hub"] == pytest.approx(5.0)
    cal.observe_unit("hub", 9.0, 1.0)  # measured again: back at once
    cal.end_window()
    assert cal.compute_factors()["hub"] == pytest.approx(9.0)


def test_a_small_messages_overhead_does_not_scale_a_large_one(context) -> None:
    """Both directions of a link form one factor, weighted by their estimated times: the
    fixed cost of a 40-byte result (tens of its estimate) is noise next to the input."""
    from partitioner.analysis.costs import network_transfer

    sys = context.table.system
    big = network_transfer(sys, sys.device("edge"), sys.device("hub"), 12_288)
    small = network_transfer(sys, sys.device("hub"), sys.device("edge"), 40)
    assert big is not None and small is not None
    cal = Calibration(context.table, alpha=1.0)
    for extra in (0.0, 0.0, 200e-6):  # the small message got 0.2 ms slower (noise)
        cal.observe_link("edge", "hub", big.time, 12_288)
        cal.observe_link("hub", "edge", small.time * 50 + extra, 40)
        cal.end_window()
    g = cal.link_factors()[("edge", "hub")]
    # 0.2 ms more on one transfer of each direction: the link's time grows by exactly
    # that, not by 0.2 ms / 4 us = 50x
    assert g == pytest.approx(1 + 200e-6 / (big.time + small.time))
    assert g < 1.2
