"""Directed links in the system file (``from``/``to``): asymmetric pairs (QUANT's setup)."""

from __future__ import annotations

import pytest

from partitioner.analysis.costs import build_cost_table
from partitioner.analysis.system import parse_system
from partitioner.errors import UserError
from partitioner.frontend import load_model

DEVICES = [{"name": n, "class": c, "flops": 1e9, "memory_bandwidth": 1e10,
            "network_bandwidth": 1e9} for n, c in (("dev", "edge"), ("edge", "hub"))]


@pytest.fixture(scope="module")
def tiny_graph():
    import models

    return load_model(models.build_model("tiny_cnn")).graph


def _system(links: list[dict], **app: str):
    return parse_system({"device": DEVICES, "link": links,
                         "application": app or {"source": "dev"}}, "sys.toml")


def test_directed_pair_prices_each_direction_with_its_own_bandwidth() -> None:
    system = _system([{"from": "dev", "to": "edge", "bandwidth": 5e6, "latency": 0.005},
                      {"from": "edge", "to": "dev", "bandwidth": 20e6, "latency": 0.005}])
    up, down = system.link("dev", "edge"), system.link("edge", "dev")
    assert up is not None and down is not None
    assert (up.bandwidth, down.bandwidth) == (5e6, 20e6)
    assert up.directed and down.directed


def test_between_keeps_meaning_both_directions() -> None:
    system = _system([{"between": ["dev", "edge"], "bandwidth": 7e6}])
    assert system.link("dev", "edge") is system.link("edge", "dev")
    assert not system.link("dev", "edge").directed


def test_one_directed_link_leaves_the_other_direction_unconnected(tiny_graph) -> None:
    system = _system([{"from": "dev", "to": "edge", "bandwidth": 5e6}],
                     source="dev")
    assert system.link("edge", "dev") is None
    table = build_cost_table(tiny_graph, system)
    keys = {(s, r) for (_, s, r) in table.transfers if s != r}
    assert keys == {("dev", "edge")}


@pytest.mark.parametrize("links, message", [
    ([{"from": "dev", "bandwidth": 1e6}], "link 1: missing required key 'to'"),
    ([{"from": "dev", "to": "gpu", "bandwidth": 1e6}], "link 1: unknown device 'gpu' in to"),
    ([{"from": "dev", "to": "dev", "bandwidth": 1e6}], "from and to name 'dev' twice"),
    ([{"from": "dev", "to": "edge", "between": ["dev", "edge"], "bandwidth": 1e6}],
     "either between or from/to"),
    ([{"from": "dev", "to": "edge", "bandwidth": 1e6},
      {"from": "dev", "to": "edge", "bandwidth": 2e6}],
     "link 2: link from 'dev' to 'edge' is already listed as link 1"),
    ([{"between": ["dev", "edge"], "bandwidth": 1e6},
      {"from": "edge", "to": "dev", "bandwidth": 2e6}],
     "link 2: link from 'edge' to 'dev' is already listed as link 1"),
])
def test_bad_directed_links_fail_in_one_line(links: list[dict], message: str) -> None:
    with pytest.raises(UserError) as err:
        _system(links)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_reachability_follows_the_direction() -> None:
    # edge -> dev only: the source dev cannot reach edge
    with pytest.raises(UserError, match="'edge' is unreachable from the source 'dev'"):
        _system([{"from": "edge", "to": "dev", "bandwidth": 1e6}])
