"""Per-layer int8 variants in the integer program (QUANT, SPEC §5).

:class:`QuantFormulation` is the MIP of :mod:`.milp` plus, for every candidate layer
``k`` of ``table.variants``, a binary ``q[k]`` (1: layer ``k`` runs as int8), and exactly
the savings :func:`partitioner.analysis.variants.variant_delta` prices:

* compute ``f(k,1)`` instead of ``f(k,0)`` on the device ``d`` (frequency ``f``) that runs
  ``k``: ``y[k,d,f]`` = the flow of the bundle arcs on ``(d, f)`` covering ``k``'s
  position (0 or 1), and ``z[k,d,f] = q[k] * y[k,d,f]`` with the standard linearisation
  ``z <= q``, ``z <= y``, ``z >= q + y - 1`` (exact for binaries); latency, the busy time
  and the energy of ``d`` lose ``saving * z``;
* ``g'`` instead of ``g`` on a transfer arc ``x`` (cut after ``j``, ``src -> dst``) whose
  cut carries tensors that travel int8 when any of their triggers ``T`` is:
  ``u[T] = OR(q[k], k in T)`` (``u >= q_k``, ``u <= sum q_k``) and ``w = u[T] * x``
  (same linearisation); latency
  and ``src``'s busy time lose the transfer time of the saved bytes, both ends their
  transfer energy;
* the noise polynomial ``eta(q) = sum_S c_S prod_{k in S} q_k`` with one product
  variable per monomial of degree >= 2 (``m <= q_k`` for every ``k in S``,
  ``m >= sum_{k in S} q_k - (|S| - 1)``), so the fit is represented exactly, and the cap
  ``noise: eta(q) <= max_noise``;
* a configuration measured after an earlier solve above the cap
  (``VariantCosts.checked``) is cut off exactly: ``sum_{k in S} q_k - sum_{k not in S}
  q_k <= |S| - 1``.

``max_noise == 0`` quantises nothing, whatever the fit predicts (no ``q`` at all).
A product variable is continuous in ``[0, 1]``: its rows force it to the product of its
binary factors. Every objective of :mod:`.solve` uses the formulation's ``latency``,
``energy`` and ``busy`` expressions, so all of them see the variants; the fast paths and
the network pruning price fp32 only and are skipped when variants are on.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import mip

from partitioner import ir
from partitioner.analysis.variants import predict_noise, wire_saving
from partitioner.solver.milp import Formulation
from partitioner.solver.network import Network

__all__ = ["QuantFormulation", "formulation", "active", "quantized_of"]

Chosen = tuple[Any, ...]


def active(table: ir.CostTable, objective: ir.Objective) -> bool:
    """Whether the solve has int8 variants to choose from."""
    v = table.variants
    return v is not None and bool(v.candidates) and objective.max_noise != 0


def formulation(table: ir.CostTable, objective: ir.Objective
                ) -> Callable[..., Formulation] | None:
    """The formulation class to build for ``objective`` (None: the plain one)."""
    if not active(table, objective):
        return None
    return partial(QuantFormulation, max_noise=objective.max_noise)


def quantized_of(chosen: Chosen) -> tuple[int, ...]:
    """The int8 layers of an extracted solution (none for a plain formulation's)."""
    return tuple(chosen[2]) if len(chosen) > 2 else ()


class QuantFormulation(Formulation):
    """The plain formulation plus the variant binaries (see the module docstring).

    Attributes:
        q: ``q[k]`` per candidate layer.
        noise: ``eta(q)`` as a linear expression over ``q`` and the monomial products.
    """

    def __init__(self, net: Network, table: ir.CostTable, *, max_noise: float | None,
                 **kwargs: Any) -> None:
        super().__init__(net, table, **kwargs)
        v = table.variants
        assert v is not None
        m = self.model
        self._max_noise = max_noise
        self.q = {k: m.add_var(name=f"q[{k}]", var_type=mip.BINARY) for k in v.candidates}
        self._where = {p.layer: p.index for p in table.positions if p.layer is not None}
        self._slower = 0.0  # the most a device's busy time can grow (slower variants)
        self._compute_terms()
        self._wire_terms()
        self.noise = self._noise_expr(v.noise)
        if max_noise is not None and v.noise:
            self.add_le(self.noise, max_noise, "noise")
        if max_noise is not None:
            for n, (conf, rho) in enumerate(v.checked):
                if rho > max_noise:
                    # no-good cut: exactly this set of int8 layers is measured too noisy
                    inside = set(conf)
                    m.add_constr(mip.xsum(self.q[k] for k in inside)
                                 - mip.xsum(q for k, q in self.q.items() if k not in inside)
                                 <= len(inside) - 1, name=f"checked[{n}]")

    def _product(self, a: mip.Var, b: mip.LinExpr, name: str) -> mip.Var:
        """``z = a * b`` for binary-valued ``a`` and ``b`` (standard linearisation)."""
        m = self.model
        z = m.add_var(name=name, lb=0.0, ub=1.0)
        m.add_constr(z - a <= 0, name=f"{name}.a")
        m.add_constr(z - b <= 0, name=f"{name}.b")
        m.add_constr(a + b - z <= 1, name=f"{name}.ab")
        return z

    def _charge(self, var: mip.Var, seconds: float, busy_of: str,
                energy: tuple[tuple[str, float | None], ...]) -> None:
        self.latency.add_var(var, -seconds)
        self.busy[busy_of].add_var(var, -seconds)
        self._slower += max(0.0, -seconds)
        for dev, e in energy:
            if e:
                self.energy[dev].add_var(var, -e)

    def _compute_terms(self) -> None:
        v = self.table.variants
        assert v is not None
        cover: dict[tuple[int, str, str | None], list[mip.Var]] = {}
        for a, arc in enumerate(self.net.arcs):
            if arc.bundle is None:
                continue
            i, j, d, f = arc.bundle
            for k in v.candidates:
                if i <= self._where[k] <= j:
                    cover.setdefault((k, d, f), []).append(self.x[a])
        for (k, d, f), xs in sorted(cover.items(), key=lambda kv: repr(kv[0])):
            dt, de = v.compute.get((k, d, f), (0.0, None))
            if not dt and not de:
                continue
            z = self._product(self.q[k], mip.xsum(xs), f"zq[{k},{d},{f}]")
            self._charge(z, dt, d, ((d, de),))

    def _wire_terms(self) -> None:
        v = self.table.variants
        assert v is not None
        by_cut: dict[int, list[tuple[tuple[int, ...], int]]] = {}
        for (j, trig), nbytes in v.wire.items():
            by_cut.setdefault(j, []).append((trig, nbytes))
        either: dict[tuple[int, ...], mip.LinExpr] = {}
        for a, arc in enumerate(self.net.arcs):
            if arc.kind != "transfer":
                continue
            _, j, src = self.net.keys[arc.tail]
            dst = self.net.keys[arc.head][2]
            for trig, nbytes in sorted(by_cut.get(j, ())):
                tr = wire_saving(self.table.system, src, dst, nbytes)
                if not tr.time:
                    continue
                if trig not in either:
                    either[trig] = self._any(trig)
                label = "+".join(map(str, trig))
                w = self._product(either[trig], mip.LinExpr([self.x[a]], [1.0]),
                                  f"wq[{label},{j},{src}>{dst}]")
                self._charge(w, tr.time, src,
                             ((src, tr.sender_energy), (dst, tr.receiver_energy)))

    def _any(self, layers: tuple[int, ...]) -> mip.LinExpr:
        """``u = OR(q_k for k in layers)``: ``u >= q_k`` for each, ``u <= sum q_k``."""
        if len(layers) == 1:
            return mip.LinExpr([self.q[layers[0]]], [1.0])
        m = self.model
        name = "uq[" + ",".join(map(str, layers)) + "]"
        u = m.add_var(name=name, lb=0.0, ub=1.0)
        for k in layers:
            m.add_constr(self.q[k] - u <= 0, name=f"{name}.{k}")
        m.add_constr(u - mip.xsum(self.q[k] for k in layers) <= 0, name=f"{name}.sum")
        return mip.LinExpr([u], [1.0])

    def _noise_expr(self, terms: tuple[ir.NoiseTerm, ...]) -> mip.LinExpr:
        expr = mip.LinExpr()
        m = self.model
        for t in terms:
            if not t.coef:
                continue
            if len(t.layers) == 1:
                expr.add_var(self.q[t.layers[0]], t.coef)
                continue
            name = "mq[" + ",".join(map(str, t.layers)) + "]"
            mono = m.add_var(name=name, lb=0.0, ub=1.0)
            for k in t.layers:
                m.add_constr(mono - self.q[k] <= 0, name=f"{name}.{k}")
            m.add_constr(mip.xsum(self.q[k] for k in t.layers) - mono <= len(t.layers) - 1,
                         name=f"{name}.all")
            expr.add_var(mono, t.coef)
        return expr

    def bottleneck_upper(self) -> float:
        return super().bottleneck_upper() + self._slower

    def extract(self) -> Chosen:  # type: ignore[override]
        """Placement, frequencies and the int8 layers of the current solution.

        A layer the solver left int8 although it saves nothing where it runs (a tie) is
        switched back, unless that would raise the predicted noise.
        """
        placement, freqs = super().extract()
        chosen = {k for k, q in self.q.items() if (q.x or 0.0) >= 0.5}
        v = self.table.variants
        assert v is not None
        cut = {conf for conf, rho in v.checked
               if self._max_noise is not None and rho > self._max_noise}
        for k in sorted(chosen):
            if self._saves(k, placement, freqs) or tuple(sorted(chosen - {k})) in cut:
                continue
            if predict_noise(v.noise, chosen - {k}) <= predict_noise(v.noise, chosen):
                chosen.discard(k)
        return placement, freqs, tuple(sorted(chosen))

    def _saves(self, k: int, placement: tuple[str, ...], freqs: dict[str, str | None]
               ) -> bool:
        v = self.table.variants
        assert v is not None
        dev = placement[self._where[k]]
        dt, de = v.compute.get((k, dev, freqs.get(dev)), (0.0, None))
        if dt or de:
            return True
        pos = self.table.positions
        return any(k in trig and placement[j] != placement[j + 1]
                   and pos[j].kind == "layer" and pos[j + 1].kind == "layer"
                   for (j, trig) in v.wire)
