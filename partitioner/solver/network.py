"""The state network whose source-sink paths are exactly the canonically priced plans.

A plan is a path through (position, device, frequency) states (SPEC §4; DIME's
bundle-correct pricing). Nodes, in topological order per position ``i``:

* ``arrive(i,d)``   the cut before ``i`` has just been sent to ``d`` from another device;
* ``in(i,d,f)``     position ``i`` starts a bundle on ``d`` at frequency ``f``;
* ``run(i,d,f)``    same, but the bundle starts a run and its hidden weight time depends
  on where the bundle ends (only created when it does, so bundle arcs are rarely doubled);
* ``full(j,d,f)``   a bundle ended at ``j`` and the greedy split may continue on ``d``
  (a pseudo bundle, a bundle of exactly ``mbs`` layers, or one followed by a pseudo
  position);
* ``leave(j,d,f)``  a bundle ended at ``j`` and the next position runs elsewhere;
* ``send(j,d)``     the cut after ``j`` leaves ``d`` (frequencies merge here, so a
  transfer arc exists per device pair, not per pair of frequencies).

A bundle of fewer than ``mbs`` layers followed by a model layer ends in ``leave`` only:
the same device cannot go on, so a run can never be priced as a cheaper non-canonical
split. ODIWeP preloading hides weight loading exactly when the path changes device, so
the correction ``-hidden`` sits on the ``arrive -> in`` arc. Nothing here imports mip.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from partitioner import ir
from partitioner.errors import fail
from partitioner.solver.memory import own_bytes

__all__ = ["Arc", "Network", "arc_name", "build_network", "rebuild", "reachable"]

Key = tuple  # node key, e.g. ("in", 3, "hub", "614MHz")


@dataclass(slots=True)
class Arc:
    """An arc of the network and what taking it adds to each linear quantity.

    Attributes:
        tail / head: node indices.
        kind: ``bundle``, ``bundle_run``, ``cont``, ``end``, ``leave``, ``transfer``,
            ``preload``, ``start`` or ``finish`` (see :func:`arc_name`).
        time: contribution to single-inference latency, s.
        busy: ``(device, seconds)`` contributions to device busy times.
        energy: ``(device, joules)`` contributions to device energies.
        bundle: ``(first, last, device, frequency)`` for bundle arcs, else None.
        weight: bytes of weights the bundle places on its device, shared initialisers
            left out (the MIP holds those once per device, ``h(s,d)``).
    """

    tail: int
    head: int
    kind: str
    time: float = 0.0
    busy: tuple[tuple[str, float], ...] = ()
    energy: tuple[tuple[str, float], ...] = ()
    bundle: tuple[int, int, str, str | None] | None = None
    weight: float = 0.0


@dataclass
class Network:
    """Nodes (topologically ordered) and arcs; ``source`` and ``sink`` are node indices."""

    keys: list[Key] = field(default_factory=list)
    index: dict[Key, int] = field(default_factory=dict)
    arcs: list[Arc] = field(default_factory=list)
    source: int = -1
    sink: int = -1

    def node(self, key: Key) -> int:
        idx = self.index.get(key)
        if idx is None:
            idx = len(self.keys)
            self.index[key] = idx
            self.keys.append(key)
        return idx

    def out_arcs(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.keys]
        for a, arc in enumerate(self.arcs):
            out[arc.tail].append(a)
        return out

    def in_arcs(self) -> list[list[int]]:
        inc: list[list[int]] = [[] for _ in self.keys]
        for a, arc in enumerate(self.arcs):
            inc[arc.head].append(a)
        return inc

    def topo_order(self) -> list[int]:
        """Node indices in an order where every arc goes forward."""
        rank = {"src": (-1, 0), "arrive": (0, 0), "in": (0, 1), "run": (0, 1),
                "full": (0, 2), "leave": (0, 3), "send": (0, 4)}

        def key(i: int) -> tuple[int, int]:
            k = self.keys[i]
            if k[0] == "sink":
                return (1 << 30, 0)
            base = rank[k[0]]
            return (k[1] if len(k) > 1 else base[0], base[1])

        return sorted(range(len(self.keys)), key=key)


def _label(value: object) -> str:
    text = "-" if value is None else str(value)
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def _allowed(pos: ir.Position, dev: str) -> bool:
    return pos.allowed is None or dev in pos.allowed


def _energy(*pairs: tuple[str, float | None]) -> tuple[tuple[str, float], ...]:
    return tuple((d, e) for d, e in pairs if e)


def build_network(table: ir.CostTable) -> Network:
    """Build the network of canonical plans of ``table`` and prune dead arcs.

    Raises:
        UserError: a position has no device it may run on.
    """
    pos = table.positions
    n = len(pos)
    if n == 0:
        fail("the cost table has no positions")
    devices = table.device_names
    net = Network()
    net.source = net.node(("src",))
    arcs = net.arcs
    hidden_of: dict[tuple[int, str, str | None], set[float]] = {}
    legal: list[tuple[tuple[int, int, str, str | None], ir.BundleCost]] = []
    # Prefix counts make every legality test O(1) per bundle (there are O(L * MBS) of them).
    n_layers = [0] * (n + 1)
    weights = [0.0] * (n + 1)  # own bytes: a shared initialiser is priced once per device
    own = own_bytes(table)
    for k, p in enumerate(pos):
        n_layers[k + 1] = n_layers[k] + (p.kind == "layer")
        weights[k + 1] = weights[k] + own[k]
    n_allowed = {}
    for d in devices:
        acc = [0] * (n + 1)
        for k, p in enumerate(pos):
            acc[k + 1] = acc[k] + _allowed(p, d)
        n_allowed[d] = acc
    freq_sets = {d: set(table.frequencies.get(d, (None,))) for d in devices}
    for (i, j, d, f), cost in table.bundles.items():
        if d not in freq_sets or f not in freq_sets[d] or not (0 <= i <= j < n):
            continue
        size = j - i + 1
        all_layers = n_layers[j + 1] - n_layers[i] == size
        if (not all_layers and i != j) or (all_layers and size > table.mbs):
            continue
        if n_allowed[d][j + 1] - n_allowed[d][i] != size:
            continue
        legal.append(((i, j, d, f), cost))
        h = cost.hidden if table.preload else 0.0
        hidden_of.setdefault((i, d, f), set()).add(h)
    dev_rank = {d: r for r, d in enumerate(devices)}
    legal.sort(key=lambda item: (item[0][0], item[0][1], dev_rank[item[0][2]]))
    for k, p in enumerate(pos):
        if not any(_allowed(p, d) for d in devices):
            fail(f"position {k} ({p.name}) may run on {list(p.allowed or ())}, "
                 "none of which is a device of the system")
    # Hidden time that does not depend on the bundle's end sits on the arrive->in arc.
    uniform = {key: next(iter(hs)) for key, hs in hidden_of.items() if len(hs) == 1}
    for (i, j, d, f), cost in legal:
        is_layer = pos[i].kind == "layer"
        cont = j + 1 < n and (not is_layer or j - i + 1 == table.mbs
                              or pos[j + 1].kind != "layer")
        head_kind = "full" if cont else "leave"
        head = net.node((head_kind, j, d, f))
        weight = weights[j + 1] - weights[i]
        tail = net.node(("in", i, d, f))
        energy = ((d, cost.energy),) if cost.energy else ()
        t = cost.time
        arcs.append(Arc(tail, head, "bundle", t, ((d, t),), energy, (i, j, d, f),
                        weight))
        if (i, d, f) not in uniform and table.preload:
            eff = cost.time - cost.hidden
            arcs.append(Arc(net.node(("run", i, d, f)), head, "bundle_run", eff,
                            ((d, eff),), energy, (i, j, d, f), weight))
    for key in list(net.keys):
        if key[0] == "full":
            _, j, d, f = key
            net_full = net.index[key]
            arcs.append(Arc(net_full, net.node(("leave", j, d, f)), "end"))
            tr = table.transfers.get((j, d, d))
            if tr is not None and ("in", j + 1, d, f) in net.index:
                arcs.append(Arc(net_full, net.index[("in", j + 1, d, f)],
                                "cont", tr.time,
                                ((d, tr.time),),
                                _energy((d, (tr.sender_energy or 0.0)
                                         + (tr.receiver_energy or 0.0)))))
    _transfers(table, net, uniform)
    return _prune(net)


def _transfers(table: ir.CostTable, net: Network,
               uniform: dict[tuple[int, str, str | None], float]) -> None:
    n = len(table.positions)
    arcs = net.arcs
    for key in list(net.keys):
        if key[0] == "in" and key[1] == 0:
            arcs.append(Arc(net.source, net.index[key], "start"))
    sink = net.node(("sink",))
    net.sink = sink
    senders: set[tuple[int, str]] = set()
    for key in list(net.keys):
        if key[0] != "leave":
            continue
        _, j, d, f = key
        if j == n - 1:
            arcs.append(Arc(net.index[key], sink, "finish"))
        else:
            arcs.append(Arc(net.index[key], net.node(("send", j, d)), "leave"))
            senders.add((j, d))
    receivers: dict[tuple[int, str], list[tuple[str | None, int]]] = {}
    for key in list(net.keys):
        if key[0] in ("in", "run") and key[1] > 0:
            _, i, d, f = key
            if key[0] == "run" or (i, d, f) in uniform:
                receivers.setdefault((i, d), []).append((f, net.index[key]))
    for (j, src) in sorted(senders, key=lambda s: (s[0], s[1])):
        for dst in table.device_names:
            if dst == src or (j + 1, dst) not in receivers:
                continue
            tr = table.transfers.get((j, src, dst))
            if tr is None:
                continue
            arcs.append(Arc(net.index[("send", j, src)], net.node(("arrive", j + 1, dst)),
                            "transfer", tr.time,
                            ((src, tr.time),),
                            _energy((src, tr.sender_energy), (dst, tr.receiver_energy))))
    for (i, d), targets in receivers.items():
        if ("arrive", i, d) not in net.index:
            continue
        for f, node in targets:
            h = uniform.get((i, d, f), 0.0) if net.keys[node][0] == "in" else 0.0
            h = h if table.preload else 0.0
            arcs.append(Arc(net.index[("arrive", i, d)], node,
                            "preload", -h,
                            ((d, -h),) if h else ()))


def _reach(n_nodes: int, adj: list[list[int]], arcs: list[Arc], start: int,
           forward: bool) -> list[bool]:
    seen = [False] * n_nodes
    seen[start] = True
    stack = [start]
    while stack:
        v = stack.pop()
        for a in adj[v]:
            w = arcs[a].head if forward else arcs[a].tail
            if not seen[w]:
                seen[w] = True
                stack.append(w)
    return seen


def reachable(net: Network) -> tuple[list[bool], list[bool]]:
    """Nodes reachable from the source, and nodes that reach the sink."""
    fwd = _reach(len(net.keys), net.out_arcs(), net.arcs, net.source, True)
    bwd = _reach(len(net.keys), net.in_arcs(), net.arcs, net.sink, False)
    return fwd, bwd


def _prune(net: Network) -> Network:
    """Drop nodes and arcs on no source-sink path (keeps the model small)."""
    return rebuild(net)


def rebuild(net: Network, keep: list[bool] | None = None) -> Network:
    """The network of the arcs flagged in ``keep`` that lie on a source-sink path.

    When no path is left, the filtered network is returned unpruned (its sink is
    unreachable, which the caller reports).
    """
    arcs = net.arcs if keep is None else [a for a, k in zip(net.arcs, keep, strict=True) if k]
    sub = Network(keys=net.keys, index=net.index, arcs=arcs, source=net.source,
                  sink=net.sink)
    fwd, bwd = reachable(sub)
    live = [fwd[i] and bwd[i] for i in range(len(net.keys))]
    if not live[net.source]:
        return sub
    out = Network()
    remap: dict[int, int] = {}
    for i in net.topo_order():
        if live[i]:
            remap[i] = out.node(net.keys[i])
    for arc in arcs:
        if live[arc.tail] and live[arc.head]:
            out.arcs.append(Arc(remap[arc.tail], remap[arc.head], arc.kind, arc.time,
                                arc.busy, arc.energy, arc.bundle, arc.weight))
    out.source, out.sink = remap[net.source], remap[net.sink]
    return out


def arc_name(net: Network, arc: Arc) -> str:
    """The variable name after the maths, e.g. ``bundle[3..5,hub,614MHz]``,
    ``transfer[4,pi>hub]``, ``cont[7,hub,614MHz]`` (built only for arcs that reach the MIP).
    """
    if arc.bundle is not None:
        i, j, d, f = arc.bundle
        return f"{arc.kind}[{i}..{j},{_label(d)},{_label(f)}]"
    tail, head = net.keys[arc.tail], net.keys[arc.head]
    if arc.kind == "transfer":
        return f"transfer[{tail[1]},{_label(tail[2])}>{_label(head[2])}]"
    key = head if arc.kind in ("start", "preload") else tail
    return f"{arc.kind}[" + ",".join(_label(x) for x in key[1:]) + "]"


def bundle_arcs(net: Network) -> Iterable[int]:
    """Indices of the bundle arcs."""
    return (a for a, arc in enumerate(net.arcs) if arc.bundle is not None)
