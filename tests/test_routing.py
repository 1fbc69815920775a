"""Routing (partitioner.analysis.routing) on hand-built tensor DAGs and systems."""

from __future__ import annotations

import itertools

import pytest

from partitioner.analysis.costs import build_cost_table
from partitioner.analysis.estimate import evaluate
from partitioner.analysis.routing import messages, placement_of, route_plan
from partitioner.errors import UserError
from partitioner.ir import (
    Application,
    Cut,
    Device,
    Estimate,
    Layer,
    LayerGraph,
    Link,
    Part,
    Plan,
    Stage,
    System,
    TensorInfo,
)

KB = 1000


def dag(layers: list[tuple[tuple[str, ...], tuple[str, ...]]], sizes: dict[str, int],
        inputs: tuple[str, ...] = ("x",), outputs: tuple[str, ...] = ("y",)) -> LayerGraph:
    """A layer graph from (consumes, produces) per layer; tensors are (1, 1, H, W) floats of
    ``sizes[name]`` bytes (H = 8 rows)."""
    infos = {n: TensorInfo(n, (1, 1, 8, b // 32), "float32", b) for n, b in sizes.items()}
    made = {n: -1 for n in inputs}
    for k, (_, prod) in enumerate(layers):
        made.update((n, k) for n in prod)
    last = {n: k for k, (cons, _) in enumerate(layers) for n in cons}
    last.update((n, len(layers)) for n in outputs)
    cuts = tuple(Cut(k - 1, tuple(n for n in infos if made.get(n, 99) < k <= last.get(n, -1)),
                     sum(infos[n].nbytes for n in infos
                         if made.get(n, 99) < k <= last.get(n, -1)))
                 for k in range(len(layers) + 1))
    return LayerGraph(
        "dag", "0" * 64, "major",
        tuple(Layer(k, f"L{k}", ("Conv",), (k,), 10**6, 0, 0, 0, cuts[k + 1].nbytes,
                    consumes=c, produces=p) for k, (c, p) in enumerate(layers)),
        cuts, tuple(infos[n] for n in inputs), tuple(infos[n] for n in outputs), infos)


# x -> L0 -> a, s (skip) ; L1: a -> b ; L2: b -> c ; L3: c, s -> y
SKIP = dag([(("x",), ("a", "s")), (("a",), ("b",)), (("b",), ("c",)), (("c", "s"), ("y",))],
           {"x": 4 * KB, "a": 8 * KB, "s": 32 * KB, "b": 8 * KB, "c": 8 * KB, "y": 1 * KB})


def system(names: str = "ABCD", links: dict[str, float] | None = None,
           latency: float = 0.0, destination: str | None = None) -> System:
    devs = tuple(Device(n, "edge", 1e9, 1e10, 1e9) for n in names)
    if links is None:
        links = {a + b: 1e7 for a, b in itertools.combinations(names, 2)}
    return System(devs, tuple(Link(k[0], k[1], bw, latency) for k, bw in links.items()),
                  Application(source=names[0], destination=destination or names[0]))


def plan(*stages: tuple[str, int, int]) -> Plan:
    return Plan("optimal", "latency", tuple(Stage(d, None, a, b) for d, a, b in stages),
                Estimate(0, 0, 0, 0, 0), 0.0)


def net_bytes(graph: LayerGraph, p: Plan, table=None) -> dict[str, int]:
    """Bytes of each tensor that cross a link (between two different devices)."""
    out: dict[str, int] = {}
    for m in messages(graph, p, p.routes, table):
        if m.sender_device != m.receiver_device:
            for name, _ in m.pieces:
                out[name] = out.get(name, 0) + graph.tensors[name].nbytes
    return out


def route(p: Plan, name: str):
    return next(r for r in p.routes if r.tensor == name)


def test_skip_over_three_stages_goes_direct_once():
    sys_ = system("ABC")
    table = build_cost_table(SKIP, sys_)
    p = plan(("A", 0, 0), ("B", 1, 1), ("C", 2, 3))
    direct = route_plan(SKIP, table, p, mode="direct")
    fwd = route_plan(SKIP, table, p, mode="forwarded")
    r = route(direct, "s")
    assert (r.source, r.targets, r.transfer, r.via) == (0, (2,), "direct", ())
    assert route(fwd, "s").via == (1,)
    # its bytes are counted once direct, once per hop forwarded
    assert net_bytes(SKIP, direct, table)["s"] == 32 * KB
    assert net_bytes(SKIP, fwd, table)["s"] == 2 * 32 * KB
    # y is a model output for the destination A, made on C
    assert route(direct, "y").targets == ("output",)
    saved = 32 * KB / 1e7
    assert fwd.estimate.communication - direct.estimate.communication == pytest.approx(saved)
    # auto keeps the cheaper direct route
    assert route(route_plan(SKIP, table, p), "s").transfer == "direct"


def test_forwarded_mode_is_the_chain_that_evaluate_prices():
    sys_ = system("ABC", latency=0.002)
    table = build_cost_table(SKIP, sys_)
    p = plan(("A", 0, 0), ("B", 1, 1), ("C", 2, 3))
    placement = placement_of(p, table)
    assert placement is not None
    chain = evaluate(table, placement, {})
    fwd = route_plan(SKIP, table, p, mode="forwarded").estimate
    for key in ("latency", "compute", "communication", "weight_loading", "bottleneck"):
        assert getattr(fwd, key) == pytest.approx(getattr(chain, key), rel=1e-12), key


def test_two_consumers_on_one_device_share_one_transfer():
    # s is read by L1 (on B) and L3 (on B again, after C): it travels to B once
    g = dag([(("x",), ("a", "s")), (("a", "s"), ("b",)), (("b",), ("c",)), (("c", "s"), ("y",))],
            SKIP.tensors and {n: t.nbytes for n, t in SKIP.tensors.items()})
    table = build_cost_table(g, system("ABC"))
    p = route_plan(g, table, plan(("A", 0, 0), ("B", 1, 1), ("C", 2, 2), ("B", 3, 3)),
                   mode="direct")
    assert route(p, "s").targets == (1, 3)
    assert net_bytes(g, p, table)["s"] == 32 * KB
    relay = [m for m in messages(g, p, p.routes, table) if ("s", None) in m.pieces]
    assert [(m.sender, m.receiver) for m in relay] == [("0", "1"), ("1", "3")]


def test_a_b_a_keeps_the_tensor_on_a():
    table = build_cost_table(SKIP, system("AB"))
    p = route_plan(SKIP, table, plan(("A", 0, 0), ("B", 1, 2), ("A", 3, 3)))
    assert route(p, "s").transfer == "direct"
    assert "s" not in net_bytes(SKIP, p, table)
    chain = evaluate(table, placement_of(p, table), {})
    assert p.estimate.communication == pytest.approx(chain.communication - 2 * 32 * KB / 1e7)


def test_forwarded_when_there_is_no_direct_link():
    sys_ = system("ABC", links={"AB": 1e7, "BC": 1e7}, destination="C")
    table = build_cost_table(SKIP, sys_)
    p = plan(("A", 0, 0), ("B", 1, 1), ("C", 2, 3))
    auto = route_plan(SKIP, table, p)
    assert (route(auto, "s").transfer, route(auto, "s").via) == ("forwarded", (1,))
    assert route(auto, "b").transfer == "direct"  # a neighbour: nothing to relay
    assert net_bytes(SKIP, auto, table)["s"] == 2 * 32 * KB
    with pytest.raises(UserError, match="no link"):
        route_plan(SKIP, table, p, mode="direct")


def test_forwarded_when_the_direct_link_is_slower():
    sys_ = system("ABC", links={"AB": 1e8, "BC": 1e8, "AC": 1e6})
    table = build_cost_table(SKIP, sys_)
    auto = route_plan(SKIP, table, plan(("A", 0, 0), ("B", 1, 1), ("C", 2, 3)))
    assert route(auto, "s").transfer == "forwarded"


@pytest.mark.parametrize("bandwidths", list(itertools.product([1e6, 1e7, 1e8], repeat=3)))
def test_routed_latency_never_exceeds_the_chain(bandwidths):
    sys_ = system("ABC", links=dict(zip(("AB", "BC", "AC"), bandwidths, strict=True)),
                  latency=0.001)
    table = build_cost_table(SKIP, sys_)
    for stages in [(("A", 0, 0), ("B", 1, 1), ("C", 2, 3)),
                   (("A", 0, 0), ("B", 1, 2), ("A", 3, 3)),
                   (("B", 0, 1), ("C", 2, 2), ("A", 3, 3))]:
        p = plan(*stages)
        chain = evaluate(table, placement_of(p, table), {})
        auto = route_plan(SKIP, table, p)
        assert auto.estimate.latency <= chain.latency * (1 + 1e-12)
        assert auto.estimate.compute == chain.compute


def test_without_a_table_every_route_is_direct_and_the_estimate_kept():
    p = plan(("A", 0, 0), ("B", 1, 1), ("C", 2, 3))
    routed = route_plan(SKIP, None, p)
    assert {r.transfer for r in routed.routes} == {"direct"}
    assert routed.estimate == p.estimate
    # c is made and read inside stage 2: no route
    assert [r.tensor for r in routed.routes] == ["x", "a", "s", "b", "y"]
    with pytest.raises(UserError, match="routing mode 'sideways'"):
        route_plan(SKIP, None, p, mode="sideways")


def test_split_stages_send_each_part_the_rows_it_needs():
    """A split producer sends each part's rows; a split reader gets only its rows (halo
    included); a whole reader gets every producer part's piece."""
    g = SKIP
    stages = (Stage("A", None, 0, 0),
              Stage(None, None, 1, 1, parts=(Part("A", None, (0, 3)), Part("B", None, (4, 7)))),
              Stage(None, None, 2, 2, parts=(Part("B", None, (0, 3)), Part("C", None, (4, 7)))),
              Stage("C", None, 3, 3))
    p = Plan("optimal", "latency", stages, Estimate(0, 0, 0, 0, 0), 0.0)

    def rows(stage: int, part: int):
        if stage == 1:  # b rows 0..3 / 4..7 from a rows 0..4 / 3..7 (a 3-row kernel)
            return ({"a": [(0, 4), (3, 7)][part]}, {"b": [(0, 3), (4, 7)][part]})
        return ({"b": [(0, 4), (3, 7)][part]}, {"c": [(0, 3), (4, 7)][part]})

    routed = route_plan(g, None, p, unit_rows=rows)
    got = {(m.sender, m.receiver): m.pieces for m in messages(g, routed, routed.routes,
                                                              None, rows)}
    assert got[("0", "1.0")] == (("a", (0, 4)),)
    assert got[("0", "1.1")] == (("a", (3, 7)),)
    assert got[("1.0", "2.0")] == (("b", (0, 3)),)
    assert got[("1.1", "2.0")] == (("b", (4, 4)),)
    assert got[("1.0", "2.1")] == (("b", (3, 3)),)
    assert got[("1.1", "2.1")] == (("b", (4, 7)),)
    assert got[("2.0", "3")] == (("c", (0, 3)),)
    assert got[("2.1", "3")] == (("c", (4, 7)),)
    assert got[("0", "3")] == (("s", None),)  # the skip goes direct past both split stages
    # a piece's bytes are its share of the rows
    m = next(m for m in messages(g, routed, routed.routes, None, rows)
             if (m.sender, m.receiver) == ("1.1", "2.0"))
    assert m.nbytes == g.tensors["b"].nbytes // 8
