"""The integer program over the state network (python-mip stays inside this package).

Variables (named after the maths): one per arc of :class:`~.network.Network` (bundle
arcs binary, the others continuous: once every bundle choice is integral, flow
conservation makes the rest integral too), ``phi[d,f]`` binaries choosing one frequency
per device (FreDDI), and the extra variables an objective needs (``B`` for the
bottleneck, ``s[d]`` / ``w[d]`` for the exact carbon ratio).

Constraints: ``flow[...]`` conservation (one unit from the source to the sink),
``freq[...]``/``onefreq[d]`` linking, ``mem[d]`` (SPEC §4 memory: a shared initialiser
``s`` is held once on ``d``, through ``h(s,d) >= `` the flow of every bundle on ``d`` that
covers a position reading ``s``, rows ``hold(s,d,k)``), ``latcap`` and
``ecap[d]`` caps. Every row is divided by its largest coefficient so CBC's absolute
tolerances mean the same thing for micro- and kilo-second models.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import mip

from partitioner import ir
from partitioner.errors import InternalError, fail
from partitioner.solver.memory import memory_of, shared_weights
from partitioner.solver.network import Network, arc_name

__all__ = ["Formulation", "SolveResult"]

_OK = (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE)


class SolveResult:
    """Outcome of one optimisation: ``status`` in optimal/feasible/infeasible/nosolution."""

    def __init__(self, status: str, value: float | None) -> None:
        self.status = status
        self.value = value

    @property
    def ok(self) -> bool:
        return self.status in ("optimal", "feasible")


def _expr(pairs: Sequence[tuple[mip.Var, float]]) -> mip.LinExpr:
    merged: dict[mip.Var, float] = {}
    for var, coef in pairs:
        if coef:
            merged[var] = merged.get(var, 0.0) + coef
    return mip.LinExpr(variables=list(merged), coeffs=list(merged.values()))


class Formulation:
    """The MIP of one cost table: arc flows plus the linear quantities of a plan.

    Attributes:
        latency: single-inference latency (SPEC §3) as a linear expression.
        energy: per device energy, J.
        busy: per device busy time (bundles plus the transfers it sends), s.
        memory: per device weight bytes.
    """

    def __init__(self, net: Network, table: ir.CostTable, *, integer: bool,
                 need_phi_all: bool = False, solver: str = "CBC",
                 deadline: float | None = None) -> None:
        self.net = net
        self.table = table
        self.deadline = deadline
        try:
            self.model = mip.Model(name="partition", sense=mip.MINIMIZE, solver_name=solver)
        except Exception as err:  # python-mip raises several types for a bad solver
            fail(f"solver {solver!r} is not available: {err}")
        m = self.model
        m.verbose = 0
        m.max_mip_gap = 1e-9
        m.max_mip_gap_abs = 1e-12
        m.threads = 1
        if solver.upper() == "CBC":
            # CBC only accepts an incumbent that improves the last one by its cutoff
            # increment (1e-5 absolute by default), which silently returned plans 0.6 %
            # off the optimum on millisecond-scale models: make it negligible.
            mip.cbc.cbc_set_parameter(m.solver, "increment", "1e-12")
        arcs = net.arcs
        self.x = [m.add_var(name=arc_name(net, arc), lb=0.0, ub=1.0,
                            var_type=mip.BINARY if (integer and arc.bundle) else
                            mip.CONTINUOUS) for arc in arcs]
        x = self.x
        inc: list[list[int]] = [[] for _ in net.keys]
        out: list[list[int]] = [[] for _ in net.keys]
        for a, arc in enumerate(arcs):
            out[arc.tail].append(a)
            inc[arc.head].append(a)
        for v, key in enumerate(net.keys):
            rhs = -1.0 if v == net.source else 1.0 if v == net.sink else 0.0
            expr = mip.LinExpr(variables=[x[a] for a in inc[v]] + [x[a] for a in out[v]],
                               coeffs=[1.0] * len(inc[v]) + [-1.0] * len(out[v]))
            m.add_constr(expr == rhs, name="flow[" + ",".join(map(str, key)) + "]")
        devices = table.device_names
        lat: list[tuple[mip.Var, float]] = []
        energy: dict[str, list[tuple[mip.Var, float]]] = {d: [] for d in devices}
        busy: dict[str, list[tuple[mip.Var, float]]] = {d: [] for d in devices}
        memory: dict[str, list[tuple[mip.Var, float]]] = {d: [] for d in devices}
        starts: dict[tuple[int, str, str | None], list[mip.Var]] = {}
        for a, arc in enumerate(arcs):
            if arc.time:
                lat.append((x[a], arc.time))
            for d, t in arc.busy:
                busy[d].append((x[a], t))
            for d, e in arc.energy:
                energy[d].append((x[a], e))
            if arc.bundle is not None:
                i, _, d, f = arc.bundle
                memory[d].append((x[a], arc.weight))
                starts.setdefault((i, d, f), []).append(x[a])
        self.latency = _expr(lat)
        self.energy = {d: _expr(p) for d, p in energy.items()}
        self.busy = {d: _expr(p) for d, p in busy.items()}
        self._memory_terms = memory
        self._shared = shared_weights(table)
        self._h: dict[tuple[str, str], mip.Var] = {}
        self.used = {d for (_, d, _) in starts}
        # phi[d,f]: one frequency per device (FreDDI); u_d = sum_f phi[d,f] is "d is used".
        self.phi: dict[tuple[str, str | None], mip.Var] = {}
        for d in devices:
            freqs = [f for f in table.frequencies.get(d, (None,))
                     if any((i, d, f) in starts for i in range(len(table.positions)))]
            if d not in self.used or (len(freqs) < 2 and not need_phi_all):
                continue
            for f in freqs:
                self.phi[d, f] = m.add_var(name=f"phi[{d},{f}]", var_type=mip.BINARY)
            m.add_constr(mip.xsum(self.phi[d, f] for f in freqs) <= 1, name=f"onefreq[{d}]")
        for (i, d, f), xs in starts.items():
            if (d, f) in self.phi:
                m.add_constr(mip.xsum(xs) <= self.phi[d, f], name=f"freq[{i},{d},{f}]")

    # ------------------------------------------------------------------ constraints

    def add_le(self, expr: mip.LinExpr, rhs: float, name: str) -> mip.Constr | None:
        """Add ``expr <= rhs`` scaled by its largest coefficient; None if trivially true."""
        coefs = [abs(c) for c in expr.expr.values()]
        if not coefs:
            if rhs < -1e-12:
                # A constant violates the cap: keep an infeasible row so the solver says so.
                return self.model.add_constr(mip.LinExpr(const=1.0) <= 0.0, name=name)
            return None
        scale = max(coefs)
        return self.model.add_constr(expr * (1.0 / scale) <= rhs / scale, name=name)

    def _held(self, device: str) -> list[tuple[mip.Var, float]]:
        """``size_s * h(s,d)`` for every shared initialiser ``s`` (variables made once)."""
        if not self._shared:
            return []
        readers = {k: s for s, ks in self._shared.items() for k in ks}
        cover: dict[tuple[str, int], list[mip.Var]] = {}
        for a, arc in enumerate(self.net.arcs):
            if arc.bundle is None or arc.bundle[2] != device:
                continue
            i, j, _, _ = arc.bundle
            for k in range(i, j + 1):
                if k in readers:
                    cover.setdefault((device, k), []).append(self.x[a])
        terms = []
        for s, ks in self._shared.items():
            flows = [(k, cover[(device, k)]) for k in ks if (device, k) in cover]
            if not flows:
                continue
            key = (s, device)
            if key not in self._h:
                # Continuous is enough: h only eases mem[d], so h = max(flows) in {0, 1}.
                h = self.model.add_var(name=f"h({s},{device})", lb=0.0, ub=1.0)
                self._h[key] = h
                for k, xs in flows:
                    self.model.add_constr(mip.xsum(xs) <= h, name=f"hold({s},{device},{k})")
            terms.append((self._h[key], float(self.table.weight_sizes[s])))
        return terms

    def add_memory(self, skip: str | None = None) -> None:
        """``mem[d]``: weights placed on ``d`` fit its memory (all devices but ``skip``)."""
        for dev in self.table.system.devices:
            terms = self._memory_terms.get(dev.name, [])
            if dev.name == skip or math.isinf(dev.memory) or not terms:
                continue
            # Redundant when even the heaviest placement fits: every position on d.
            if memory_of(self.table, range(len(self.table.positions))) <= dev.memory:
                continue
            self.add_le(_expr(terms + self._held(dev.name)), dev.memory, f"mem[{dev.name}]")

    def memory_expr(self, device: str) -> mip.LinExpr:
        return _expr(self._memory_terms.get(device, []) + self._held(device))

    def add_caps(self, objective: ir.Objective, *, latency: bool = True,
                 energy: bool = True) -> None:
        """``latcap`` and ``ecap[d]`` from the objective's caps."""
        if latency and objective.max_latency is not None:
            self.add_le(self.latency, objective.max_latency, "latcap")
        if energy:
            for d, cap in objective.max_energy.items():
                self.add_le(self.energy[d], cap, f"ecap[{d}]")

    def edge_energy(self) -> mip.LinExpr:
        """Energy of the edge-class devices (the FreDDI energy objective)."""
        return mip.xsum(self.energy[d.name] for d in self.table.system.devices
                        if d.device_class == "edge")

    def bottleneck_upper(self) -> float:
        """An upper bound on every device's busy time: its longest path in the network."""
        order = self.net.topo_order()
        out: list[list[int]] = [[] for _ in self.net.keys]
        for a, arc in enumerate(self.net.arcs):
            out[arc.tail].append(a)
        best = 0.0
        for d in self.used:
            dist = [-math.inf] * len(self.net.keys)
            dist[self.net.source] = 0.0
            for v in order:
                if dist[v] == -math.inf:
                    continue
                for a in out[v]:
                    arc = self.net.arcs[a]
                    w = dist[v] + sum(t for dd, t in arc.busy if dd == d)
                    if w > dist[arc.head]:
                        dist[arc.head] = w
            best = max(best, dist[self.net.sink])
        return best

    # ------------------------------------------------------------------ solving

    def optimize(self, expr: mip.LinExpr | mip.Var, *, maximize: bool = False) -> SolveResult:
        """Minimise (or maximise) ``expr`` under the current constraints."""
        m = self.model
        lin = expr if isinstance(expr, mip.LinExpr) else mip.LinExpr([expr], [1.0])
        coefs = [abs(c) for c in lin.expr.values()]
        scale = max(coefs) if coefs else 1.0
        m.objective = mip.maximize(lin * (1 / scale)) if maximize else \
            mip.minimize(lin * (1 / scale))
        kwargs = {}
        if self.deadline is not None:
            left = self.deadline - time.perf_counter()
            if left <= 0:
                return SolveResult("nosolution", None)
            kwargs["max_seconds"] = max(left, 0.01)
        status = m.optimize(**kwargs)
        if status == mip.OptimizationStatus.OPTIMAL:
            return SolveResult("optimal", float(lin.x))
        if status == mip.OptimizationStatus.FEASIBLE:
            return SolveResult("feasible", float(lin.x))
        if status in (mip.OptimizationStatus.INFEASIBLE, mip.OptimizationStatus.INT_INFEASIBLE):
            return SolveResult("infeasible", None)
        if status == mip.OptimizationStatus.NO_SOLUTION_FOUND:
            return SolveResult("nosolution", None)
        raise InternalError(f"the MIP solver returned {status.name}")

    def extract(self) -> tuple[tuple[str, ...], dict[str, str | None]]:
        """Placement and frequencies of the current solution (from the bundle arcs)."""
        n = len(self.table.positions)
        placement: list[str | None] = [None] * n
        freqs: dict[str, str | None] = {}
        for a, arc in enumerate(self.net.arcs):
            if arc.bundle is None or (self.x[a].x or 0.0) < 0.5:
                continue
            i, j, d, f = arc.bundle
            for k in range(i, j + 1):
                if placement[k] is not None:
                    raise InternalError(f"position {k} is covered by two bundles")
                placement[k] = d
            if freqs.setdefault(d, f) != f:
                raise InternalError(f"device {d!r} runs at two frequencies")
        if any(p is None for p in placement):
            raise InternalError("the solution leaves a position unplaced")
        return tuple(p for p in placement if p is not None), freqs
