"""Shared initialisers are held once per device; the diagnosis honours the time limit."""

from __future__ import annotations

from dataclasses import replace

import pytest

from partitioner import ir
from partitioner.errors import InfeasibleError
from partitioner.solver import solve
from partitioner.solver.memory import memory_of, placement_memory
from partitioner.solver.synthetic import TableSpec, random_table


def _tied(memory: float) -> ir.CostTable:
    """Four layers; layers 0 and 3 read the same 800-byte embedding (tied weights).

    Device d0 is much faster; its memory holds the embedding once plus the rest, but not
    the embedding twice.
    """
    base = random_table(TableSpec(layers=4, devices=2, source=False, destination=False,
                                  spread=0.0), 3)
    own = [10, 20, 30, 40]
    pos = tuple(replace(p, weight_bytes=own[k] + (800 if k in (0, 3) else 0),
                        weights=("emb.weight",) if k in (0, 3) else ())
                for k, p in enumerate(base.positions))
    fast = [b if d != "d0" else replace(b, compute=b.compute * 1e-3)
            for (_, _, d, _), b in base.bundles.items()]
    bundles = dict(zip(base.bundles, fast, strict=True))
    devs = (replace(base.system.devices[0], memory=memory), base.system.devices[1])
    return replace(base, positions=pos, bundles=bundles,
                   system=replace(base.system, devices=devs),
                   weight_sizes={"emb.weight": 800})


def test_memory_counts_a_shared_initialiser_once_per_device() -> None:
    table = _tied(memory=900.0)
    assert memory_of(table, [0, 1, 2, 3]) == 800 + 100
    assert placement_memory(table, ("d0", "d1", "d1", "d0")) == {"d0": 850.0, "d1": 50.0}
    # Fits only when the embedding is counted once: everything runs on the fast d0,
    # with the dynamic program (no cap) and with the integer program (a cap forces it).
    assert solve(table).placement == ("d0",) * 4
    loose = ir.Objective(max_latency=1e9)
    assert solve(table, loose).placement == ("d0",) * 4
    # 100 bytes less and d0 cannot hold everything: it keeps the embedding's readers
    # only if it gives up one of the others.
    small = _tied(memory=880.0)
    for objective in (ir.Objective(), loose):
        plan = solve(small, objective)
        assert placement_memory(small, plan.placement).get("d0", 0.0) <= 880.0
        assert plan.placement != ("d0",) * 4


def test_memory_diagnosis_counts_shared_weights_once() -> None:
    table = _tied(memory=700.0)  # the embedding alone does not fit on d0
    pinned = tuple(replace(p, allowed=("d0",)) if k in (0, 3) else p
                   for k, p in enumerate(table.positions))
    with pytest.raises(InfeasibleError, match=r"memory of 'd0' \(700 B\) cannot hold the "
                                              r"pinned layers 0, 3 \(850 B\)"):
        solve(replace(table, positions=pinned))


def test_diagnosis_gives_up_at_the_time_limit() -> None:
    table = random_table(TableSpec(layers=6, devices=3, frequencies=2), 1)
    impossible = ir.Objective(max_latency=1e-9)
    with pytest.raises(InfeasibleError, match="latency cap .* cannot be met"):
        solve(table, impossible)
    with pytest.raises(InfeasibleError, match="could not diagnose within the limit") as info:
        solve(table, replace(impossible, time_limit=1e-9))
    assert "\n" not in str(info.value)
