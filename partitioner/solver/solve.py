"""``solve(table, objective) -> Plan``: every objective of SPEC §4 over one network.

* ``latency``: a shortest path (an LP when nothing couples the choices);
* ``energy``: least energy of the edge devices (FreDDI), then least latency among those;
* ``throughput``: least bottleneck ``B >= busy_d`` (DISTREDGE), then least latency s.t.
  ``B <= B*`` (lexicographic);
* ``carbon``: ``U * N(x) / B(x)`` (CADI over N devices), a ratio solved exactly with
  Dinkelbach's method; ``B`` is made *equal* to the largest busy time with one indicator
  per device, so the ratio's denominator cannot be inflated;
* ``weighted``: ``w_T * T_norm + w_E * E_norm`` with T and E normalised by their min and
  max over the feasible set (QUANT), four extra solves.

Without latency or energy caps, and when every device's memory holds any placement, the
only coupling left is one frequency per device: ``latency``, ``energy`` and ``weighted``
are then solved by the exact dynamic program of :mod:`.dp`, ``throughput`` by the
exact label search of :mod:`.bottleneck` and ``carbon`` by Dinkelbach's method over the
same programs (:mod:`.carbon`), all over the run arrays of :mod:`.runs` (numpy, no
network, no MIP). Everything else (caps, binding memories, a carbon instance whose bounds
cannot decide) is the integer program over the pruned state network.

python-mip (and :mod:`.milp`, :mod:`.quant`, :mod:`.diagnose`, which build models) is
imported only once a solve needs the integer program: a plan the fast paths find never
loads it (about 50 ms of ``partitioner plan``'s start-up, issue 16).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from partitioner import ir
from partitioner.analysis.estimate import carbon_duration, edge_energy, evaluate
from partitioner.errors import InfeasibleError, fail
from partitioner.solver import fast
from partitioner.solver.network import Network, build_network, reachable
from partitioner.solver.prune import (
    bottleneck_plan,
    bottleneck_window,
    busy_costs,
    energy_costs,
    prune_by,
    shortest_plan,
    time_costs,
)

if TYPE_CHECKING:
    import mip

    from partitioner.solver.milp import Formulation

__all__ = ["solve", "build_plan", "energy_known"]

_KINDS = ("latency", "energy", "throughput", "carbon", "weighted")


def energy_known(table: ir.CostTable, device: str) -> bool:
    """Whether any bundle or network transfer gives ``device`` an energy figure.

    Internal (same-device) transfers do not count: the cost model prices them at 0 J
    whether or not the device has a power figure.
    """
    if any(d == device and c.energy is not None for (_, _, d, _), c in table.bundles.items()):
        return True
    return any(s != r and ((s == device and t.sender_energy is not None)
                           or (r == device and t.receiver_energy is not None))
               for (_, s, r), t in table.transfers.items())


def _validate(table: ir.CostTable, objective: ir.Objective) -> None:
    if objective.kind not in _KINDS:
        fail(f"unknown objective {objective.kind!r} (expected one of {', '.join(_KINDS)})")
    names = table.device_names
    for d, cap in objective.max_energy.items():
        if d not in names:
            fail(f"--max-energy names device {d!r}, which is not in the system")
        if not cap >= 0:
            fail(f"energy cap of {d!r} must be >= 0, got {cap}")
        if not energy_known(table, d):
            fail(f"energy cap of {d!r}: no energy figure is known for it "
                 "(give it a power or profile its energy)")
    if objective.max_noise is not None and not objective.max_noise >= 0:
        fail(f"noise cap must be >= 0, got {objective.max_noise}")
    if objective.max_latency is not None and not objective.max_latency >= 0:
        fail(f"latency cap must be >= 0, got {objective.max_latency}")
    if objective.kind in ("energy", "weighted"):
        edges = [d.name for d in table.system.devices if d.device_class == "edge"]
        if not edges:
            fail(f"the {objective.kind} objective minimises the energy of edge devices, "
                 "and the system has none")
        for d in edges:
            if not energy_known(table, d):
                fail(f"the {objective.kind} objective needs the energy of edge device {d!r}, "
                     "and none is known (give it a power or profile its energy)")
    if objective.kind == "weighted" and (objective.latency_weight < 0
                                         or objective.energy_weight < 0):
        fail("weights of the weighted objective must be >= 0")
    if objective.kind == "carbon":
        u = carbon_duration(table, objective)
        if u is None or not u > 0:
            fail("the carbon objective needs a positive duration (--duration or "
                 "[application] duration)")
        if not any(d.carbon_intensity for d in table.system.devices):
            fail("the carbon objective needs a carbon_intensity on at least one device")
        for device in table.system.devices:
            if device.carbon_intensity and not energy_known(table, device.name):
                fail(f"the carbon objective needs the energy of device {device.name!r}, "
                     "which has a carbon intensity but no energy figure")
    if objective.solver.upper() not in ("CBC", "GRB", "GUROBI", "HIGHS", "CPLEX", "SCIP"):
        fail(f"solver {objective.solver!r} is not a python-mip solver (CBC, GRB, HiGHS)")
    if objective.time_limit is not None and not objective.time_limit > 0:
        fail(f"time limit must be > 0, got {objective.time_limit}")


def _tol(value: float) -> float:
    return 1e-9 * abs(value) + 1e-15


def _bottleneck_var(form: Formulation, exact: bool) -> mip.Var:
    """``B >= busy_d`` for every used device; with ``exact`` also ``B <= busy_d`` for one."""
    import mip

    m = form.model
    b = m.add_var(name="B", lb=0.0)
    upper = form.bottleneck_upper() * 1.01 + 1e-9
    sel = []
    for d in sorted(form.used):
        form.add_le(form.busy[d] - b, 0.0, f"bneck[{d}]")
        if exact:
            s = m.add_var(name=f"s[{d}]", var_type=mip.BINARY)
            sel.append(s)
            # B <= busy_d + M (1 - s_d): the selected device's busy time *is* B.
            form.add_le(b - form.busy[d] + upper * s, upper, f"bsel[{d}]")
    if exact:
        m.add_constr(mip.xsum(sel) == 1, name="bsel")
    return b


Chosen = tuple[tuple[str, ...], dict[str, str | None]]
Outcome = tuple[str, "Chosen | None"]
Make = Callable[[], "Formulation"]


def _worst(*statuses: str) -> str:
    return "feasible" if "feasible" in statuses else "optimal"


def _once(make: Make, objective_of: Callable[[Formulation], mip.LinExpr]) -> Outcome:
    # A fresh model per solve: CBC re-optimising a modified model was seen to keep a
    # stale incumbent and report a suboptimal plan as optimal.
    form = make()
    r = form.optimize(objective_of(form))
    return r.status, (form.extract() if r.ok else None)


def _as_expr(e: mip.LinExpr | mip.Var) -> mip.LinExpr:
    import mip

    return e if isinstance(e, mip.LinExpr) else mip.LinExpr([e], [1.0])


def _lexi(make: Make, first_of: Callable[[Formulation], mip.LinExpr | mip.Var],
          name: str) -> Outcome:
    """Minimise ``first``, then latency among the optima of ``first``."""
    form = make()
    r = form.optimize(first_of(form))
    if not r.ok or r.value is None:
        return r.status, None
    form2 = make()
    form2.add_le(_as_expr(first_of(form2)), r.value + _tol(r.value), name)
    r2 = form2.optimize(form2.latency)
    if not r2.ok:  # only the time limit can stop it: the first optimum is feasible
        return "feasible", form.extract()
    return _worst(r.status, r2.status), form2.extract()


def _throughput(make: Callable[..., Formulation], net: Network,
                table: ir.CostTable, prune: bool = True) -> Outcome:
    """Least bottleneck B*, then least latency among plans with B <= B* (lexicographic).

    The second model is built on the network pruned by ``busy_d <= B*`` for every device.
    """
    form = make()
    r = form.optimize(_bottleneck_var(form, exact=False))
    if not r.ok or r.value is None:
        return r.status, None
    bound = r.value + _tol(r.value)
    for dev in table.device_names if prune else ():  # fp32 busy times (no variants)
        net = prune_by(net, busy_costs(net, dev), bound)
    form2 = make(net)
    form2.add_le(_as_expr(_bottleneck_var(form2, exact=False)), bound, "bbest")
    r2 = form2.optimize(form2.latency)
    if not r2.ok:  # only the time limit can stop it: the first optimum is feasible
        return "feasible", form.extract()
    return _worst(r.status, r2.status), form2.extract()


def _carbon_model(form: Formulation, table: ir.CostTable) -> tuple[mip.LinExpr, mip.Var]:
    """Numerator N(x) (mgCO2-eq per second of service / U) and the exact bottleneck B."""
    import mip

    m = form.model
    b = _bottleneck_var(form, exact=True)
    upper = form.bottleneck_upper() * 1.01 + 1e-9
    num = mip.LinExpr()
    for dev in table.system.devices:
        c = dev.carbon_intensity or 0.0
        if not c or dev.name not in form.used:
            continue
        num.add_expr(form.energy[dev.name], c)
        p = dev.idle_power or 0.0
        if not p:
            continue
        used = mip.xsum(v for (d, _), v in form.phi.items() if d == dev.name)
        # w_d = u_d * B (exact McCormick for a binary u_d): hold time = w_d - busy_d.
        w = m.add_var(name=f"w[{dev.name}]", lb=0.0)
        form.add_le(w - b, 0.0, f"wB[{dev.name}]")
        form.add_le(w - upper * used, 0.0, f"wU[{dev.name}]")
        form.add_le(b - w + upper * used, upper, f"wL[{dev.name}]")
        num.add_expr(w - form.busy[dev.name], c * p)
    return num, b


def _carbon(make: Make, table: ir.CostTable, objective: ir.Objective) -> Outcome:
    """Dinkelbach: min N(x)/B(x) by solving min N(x) - lam B(x) until that reaches 0."""
    from partitioner.solver import quant

    u_dur = carbon_duration(table, objective)
    assert u_dur is not None

    def ratio(plan: Chosen) -> float:
        est = evaluate(table, plan[0], plan[1], duration=u_dur,
                       quantized=quant.quantized_of(plan))
        assert est.carbon is not None
        return est.carbon / u_dur

    form = make()
    num, _ = _carbon_model(form, table)
    r = form.optimize(num)  # lam = 0: any feasible plan starts the iteration
    if not r.ok:
        return r.status, None
    status = r.status
    best = form.extract()
    lam = ratio(best)
    for _ in range(60):
        form = make()
        num, b = _carbon_model(form, table)
        r = form.optimize(num - lam * b)
        if not r.ok or r.value is None:
            status = "feasible"  # the time limit stopped the iteration early
            break
        status = _worst(status, r.status)
        # F(lam) = min N - lam B reaches 0 exactly at the optimal ratio (Dinkelbach).
        if r.value >= -1e-9 * max(abs(lam) * float(b.x or 0.0), 1e-15):
            break
        cand = form.extract()
        cand_lam = ratio(cand)
        if cand_lam >= lam - _tol(lam):
            break
        best, lam = cand, cand_lam
    return status, best


def _weighted(make: Make, objective: ir.Objective) -> Outcome:
    """QUANT: normalise T and E by their min and max over the feasible set."""
    import mip

    bounds = []
    status = "optimal"
    for pick in (lambda f: f.latency, lambda f: f.edge_energy()):
        for maximize in (False, True):
            form = make()
            r = form.optimize(pick(form), maximize=maximize)
            if not r.ok or r.value is None:
                return r.status, None
            status = _worst(status, r.status)
            bounds.append(r.value)
    form = make()
    obj = mip.LinExpr()
    for (lo, hi), expr, w in zip((bounds[0:2], bounds[2:4]),
                                 (form.latency, form.edge_energy()),
                                 (objective.latency_weight, objective.energy_weight), strict=True):
        if hi - lo > _tol(hi) and w > 0:
            obj.add_expr(expr, w / (hi - lo))
    r = form.optimize(obj if obj.expr else form.latency)
    if not r.ok:
        return r.status, None
    return _worst(status, r.status), form.extract()


def _has_path(net: Network) -> bool:
    fwd, _ = reachable(net)
    return fwd[net.sink]


def _pruned(net: Network, table: ir.CostTable, objective: ir.Objective) -> Network:
    """Drop arcs no wanted plan can use: caps bound every plan, and for a linear (or
    bottleneck) objective a feasible plan's value bounds the optimum (see ``prune``)."""
    if objective.max_latency is not None:
        net = prune_by(net, time_costs(net), objective.max_latency)
    for dev, cap in objective.max_energy.items():
        if not _has_path(net):
            return net
        net = prune_by(net, energy_costs(net, {dev}), cap)
    if not _has_path(net):
        return net
    edges = {d.name for d in table.system.devices if d.device_class == "edge"}
    times = time_costs(net)
    if objective.kind in ("latency", "throughput"):
        chosen = shortest_plan(net, table, objective, times)
        if chosen is None:
            return net
        est = evaluate(table, chosen[0], chosen[1])
        if objective.kind == "latency":
            return prune_by(net, times, est.latency)
        better = bottleneck_plan(net, table, objective)
        bound = est.bottleneck
        if better is not None:
            bound = min(bound, evaluate(table, better[0], better[1]).bottleneck)
        # Every better plan has busy_d <= bound; bisection narrows the window further.
        _, _, net = bottleneck_window(net, table, objective, bound)
        return net
    if objective.kind == "energy":
        e_costs = energy_costs(net, edges)
        chosen = shortest_plan(net, table, objective, e_costs)
        if chosen is not None:
            est = evaluate(table, chosen[0], chosen[1])
            return prune_by(net, e_costs, edge_energy(table, est.energy))
    return net


def build_plan(table: ir.CostTable, objective: ir.Objective, placement: tuple[str, ...],
               freqs: dict[str, str | None], status: str, seconds: float,
               quantized: tuple[int, ...] = ()) -> ir.Plan:
    """Stages (maximal runs of model layers on one device), pseudo devices, estimate;
    ``quantized``: the layers that run as their int8 variant."""
    stages: list[ir.Stage] = []
    pseudo: dict[str, str] = {}
    for pos, dev in zip(table.positions, placement, strict=True):
        if pos.kind != "layer" or pos.layer is None:
            pseudo[pos.kind] = dev
            continue
        if stages and stages[-1].device == dev and stages[-1].last == pos.layer - 1:
            s = stages[-1]
            stages[-1] = ir.Stage(s.device, s.frequency, s.first, pos.layer)
        else:
            stages.append(ir.Stage(dev, freqs.get(dev), pos.layer, pos.layer))
    if quantized:
        stages = [dataclasses.replace(s, quantized=tuple(
            k for k in quantized if s.first <= k <= s.last)) for s in stages]
    est = evaluate(table, placement, freqs, duration=carbon_duration(table, objective),
                   quantized=quantized)
    return ir.Plan(status="feasible" if status == "feasible" else "optimal",
                   objective=objective.kind, stages=tuple(stages), estimate=est,
                   solve_seconds=seconds, placement=placement,
                   frequencies={d: freqs.get(d) for d in dict.fromkeys(placement)},
                   pseudo=pseudo)


def solve(table: ir.CostTable, objective: ir.Objective | None = None) -> ir.Plan:
    """Choose a device and a frequency for every position of ``table``.

    Args:
        table: the priced extended chain (``partitioner.analysis.costs``).
        objective: what to minimise under which caps (default: latency, no caps).

    Returns:
        The plan, with ``status`` ``optimal`` (or ``feasible`` when the time limit hit).

    Raises:
        InfeasibleError: no plan meets the constraints; the message names the
            constraint and the closest achievable value.
        UserError: the objective is malformed or needs figures the table lacks.
    """
    objective = objective or ir.Objective()
    t0 = time.perf_counter()
    _validate(table, objective)
    if table.exits:  # early-exit heads: expected-cost objective (docs/EXITS.md)
        from partitioner.solver.exits import solve_exits

        return solve_exits(table, objective)
    deadline = t0 + objective.time_limit if objective.time_limit else None
    # Variants (QUANT) are priced by the MIP only: the fast paths and the pruning below
    # bound plans with fp32 prices, which int8 layers undercut.
    variants = None
    if table.variants is not None:
        from partitioner.solver import quant

        variants = quant.formulation(table, objective)
    if variants is None and fast.applies(table, objective):
        status, chosen = fast.solve_fast(table, objective, deadline)
        if chosen is not None:
            return build_plan(table, objective, chosen[0], chosen[1], status,
                              time.perf_counter() - t0)
        # no plan at all: the network below says why
    # the integer program from here on (and the diagnosis of an infeasible one)
    from partitioner.solver import quant
    from partitioner.solver.diagnose import explain_infeasible
    from partitioner.solver.milp import Formulation

    net = build_network(table)
    if not _has_path(net):
        fail(explain_infeasible(table, objective, net, deadline), error=InfeasibleError)
    full = net
    if variants is None:
        net = _pruned(net, table, objective)
    if not _has_path(net):
        fail(explain_infeasible(table, objective, full, deadline), error=InfeasibleError)
    # Bundle arcs are always binary: a pure LP would be solved by Clp, which logs on
    # stdout whatever ``verbose`` says; after pruning the integral LP costs nothing extra.
    integer = True

    def make(network: Network | None = None) -> Formulation:
        form = (variants or Formulation)(network or net, table, integer=integer,
                           need_phi_all=objective.kind == "carbon",
                           solver=objective.solver, deadline=deadline)
        form.add_memory()
        form.add_caps(objective)
        return form

    kind = objective.kind
    if kind == "latency":
        status, chosen = _once(make, lambda f: f.latency)
    elif kind == "energy":
        status, chosen = _lexi(make, lambda f: f.edge_energy(), "ebest")
    elif kind == "throughput":
        status, chosen = _throughput(make, net, table, prune=variants is None)
    elif kind == "carbon":
        status, chosen = _carbon(make, table, objective)
    else:
        status, chosen = _weighted(make, objective)
    if status == "infeasible":
        fail(explain_infeasible(table, objective, full, deadline), error=InfeasibleError)
    if chosen is None:
        fail(f"the time limit of {objective.time_limit} s ran out before any plan was "
             "found; raise --time-limit", error=InfeasibleError)
    return build_plan(table, objective, chosen[0], chosen[1], status,
                      time.perf_counter() - t0, quant.quantized_of(chosen))
