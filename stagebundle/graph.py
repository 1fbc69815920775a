"""The mechanics of a stage graph, shared by the back end's verification, the in-process
executor and the workers: who waits for whom, what a unit sends, how row pieces are cut
and put back together.

A request flows as messages: the source sends ``bundle.input_sends``; a unit runs once a
message from every unit that sends to it has arrived (:func:`expected_senders`), then
sends its own (:func:`outgoing`); the request is done when every message for ``"output"``
has arrived. A message maps tensor names to *pieces*: ``(rows, array)`` where ``rows`` is
``None`` for a whole tensor or ``(first, last)`` of the full tensor's height axis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from stagebundle.errors import fail
from stagebundle.manifest import INPUT, OUTPUT, Bundle, Rows, Send, TensorSpec, Unit

__all__ = [
    "HEIGHT",
    "Piece",
    "Message",
    "expected_senders",
    "take_rows",
    "assemble",
    "outgoing",
    "Inbox",
    "run_graph",
    "exit_messages",
    "exit_result",
    "check_graph",
]

HEIGHT = 2  # NCHW: rows are the height axis
Piece = tuple["Rows | None", np.ndarray]
Message = dict[str, Piece]


def expected_senders(bundle: Bundle) -> dict[str, tuple[str, ...]]:
    """For every receiver (unit key, or ``"output"``), the senders it waits for."""
    senders: dict[str, list[str]] = {}
    for send in bundle.input_sends:
        senders.setdefault(send.to, []).append(INPUT)
    for unit in bundle.units():
        for send in unit.sends:
            senders.setdefault(send.to, []).append(unit.key)
    return {k: tuple(dict.fromkeys(v)) for k, v in senders.items()}


def take_rows(arr: np.ndarray, have: Rows | None, want: Rows | None, what: str) -> np.ndarray:
    """Rows ``want`` of a tensor of which ``arr`` holds rows ``have`` (None: all)."""
    if want is None:
        if have is not None:
            fail(f"{what}: the whole tensor was asked for but only rows {list(have)} are held")
        return arr
    lo = 0 if have is None else have[0]
    hi = arr.shape[HEIGHT] - 1 + lo
    if want[0] < lo or want[1] > hi:
        fail(f"{what}: rows {list(want)} asked for, rows {[lo, hi]} held")
    if (want[0], want[1]) == (lo, hi):
        return arr
    index = [slice(None)] * arr.ndim
    index[HEIGHT] = slice(want[0] - lo, want[1] - lo + 1)
    return np.ascontiguousarray(arr[tuple(index)])


def assemble(spec: TensorSpec, pieces: Iterable[Piece], what: str) -> np.ndarray:
    """The tensor ``spec`` (rows ``spec.rows`` or whole) from pieces that tile it exactly."""
    pieces = list(pieces)
    declared = _numpy_dtype(spec.dtype)
    for _, arr in pieces:  # an int8 cut tensor must not arrive as float (QUANT's g')
        if declared is not None and arr.dtype != declared:
            fail(f"{what}: tensor {spec.name} arrives as {arr.dtype.name}, declared "
                 f"{spec.dtype}")
    if len(pieces) == 1 and (pieces[0][0] is None or pieces[0][0] == spec.rows):
        arr = pieces[0][1]
        if tuple(arr.shape) != spec.shape:
            fail(f"{what}: tensor {spec.name} arrives with shape {list(arr.shape)}, declared "
                 f"{list(spec.shape)}")
        return arr
    if spec.rows is None:
        base, height = 0, spec.shape[HEIGHT]
    else:
        base, height = spec.rows[0], spec.rows[1] - spec.rows[0] + 1
    out = np.empty(spec.shape, dtype=pieces[0][1].dtype)
    covered = np.zeros(height, dtype=np.int8)
    for rows, arr in pieces:
        if rows is None:
            fail(f"{what}: tensor {spec.name} arrived whole and in pieces")
        a, b = rows[0] - base, rows[1] - base
        if a < 0 or b >= height or arr.shape[HEIGHT] != b - a + 1:
            fail(f"{what}: piece rows {list(rows)} of {spec.name} do not fit its rows "
                 f"{[base, base + height - 1]}")
        index = [slice(None)] * out.ndim
        index[HEIGHT] = slice(a, b + 1)
        out[tuple(index)] = arr
        covered[a:b + 1] += 1
    if not np.all(covered == 1):
        fail(f"{what}: the pieces of {spec.name} do not cover its rows exactly once")
    return out


def outgoing(unit_or_sends: Unit | Iterable[Send], held: Mapping[str, Piece],
             what: str) -> list[tuple[str, Message]]:
    """The messages a unit (or the source) sends, cut from the pieces it holds."""
    sends = unit_or_sends.sends if isinstance(unit_or_sends, Unit) else unit_or_sends
    result = []
    for send in sends:
        msg: Message = {}
        for p in send.tensors:
            if p.name not in held:
                fail(f"{what}: has no tensor {p.name!r} to send to {send.to}")
            have, arr = held[p.name]
            msg[p.name] = (p.rows, take_rows(arr, have, p.rows, f"{what} -> {send.to}"))
        result.append((send.to, msg))
    return result


@dataclass
class Inbox:
    """Messages arriving for one receiver of one request, until every sender has sent."""

    senders: tuple[str, ...]
    received: dict[str, Message] = field(default_factory=dict)

    def add(self, sender: str, message: Message) -> bool:
        """Store a message; True when the inbox is complete. A repeat is an error."""
        if sender not in self.senders:
            fail(f"unexpected message from {sender!r} (expected from "
                 f"{', '.join(self.senders)})")
        if sender in self.received:
            fail(f"a second message from {sender!r} for the same request")
        self.received[sender] = message
        return self.complete

    @property
    def complete(self) -> bool:
        return len(self.received) == len(self.senders)

    def tensors(self, specs: Iterable[TensorSpec], what: str) -> dict[str, np.ndarray]:
        """Assemble every tensor of ``specs`` from the pieces received."""
        pieces: dict[str, list[Piece]] = {}
        for msg in self.received.values():
            for name, piece in msg.items():
                pieces.setdefault(name, []).append(piece)
        out = {}
        for spec in specs:
            if spec.name not in pieces:
                fail(f"{what}: no sender sent tensor {spec.name}")
            out[spec.name] = assemble(spec, pieces[spec.name], what)
        return out


RunUnit = Callable[[Unit, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def held_after(unit: Unit, received: Mapping[str, np.ndarray],
               produced: Mapping[str, np.ndarray]) -> dict[str, Piece]:
    """What a unit holds after running: what it received and produced, with their rows."""
    rows = {t.name: t.rows for t in (*unit.receives, *unit.outputs)}
    held: dict[str, Piece] = {n: (rows.get(n), a) for n, a in received.items()}
    held.update({n: (rows.get(n), a) for n, a in produced.items()})
    return held


def run_graph(bundle: Bundle, feeds: Mapping[str, np.ndarray], run: RunUnit, *,
              request_id: str | None = None, exited: list[str] | None = None
              ) -> dict[str, np.ndarray]:
    """Run every unit in stage order in this process, passing messages as the workers do.

    ``run(unit, inputs)`` runs the unit's ONNX file on its inputs and returns its outputs.
    Returns the model outputs by name. With ``request_id``, early-exit heads take their
    rule (:func:`stagebundle.exits.exit_after`): a request that leaves returns only the
    head's output, no later unit runs, and the head's name is appended to ``exited``;
    without it (the back end's verification) every unit runs.
    """
    from stagebundle.exits import exit_after

    senders = expected_senders(bundle)
    inboxes = {k: Inbox(v) for k, v in senders.items()}
    source: dict[str, Piece] = {t.name: (None, np.asarray(feeds[t.name]))
                                for t in bundle.inputs if t.name in feeds}
    for to, msg in outgoing(bundle.input_sends, source, "source"):
        inboxes[to].add(INPUT, msg)
    for unit in bundle.units():
        what = f"unit {unit.key} ({unit.device})"
        inbox = inboxes.get(unit.key)
        if inbox is None or not inbox.complete:
            fail(f"{what}: not every sender sent to it before it runs (is the stage order "
                 f"topological?)")
        received = inbox.tensors(unit.receives, what)
        produced = run(unit, {t.name: received[t.name] for t in unit.inputs})
        messages = outgoing(unit, held_after(unit, received, produced), what)
        taken = None if request_id is None else exit_after(unit, produced, request_id)
        if taken is not None:
            if exited is not None:
                exited.append(taken)
            return exit_result(bundle, unit, messages, taken)
        for to, msg in messages:
            inboxes[to].add(unit.key, msg)
    final = inboxes.get(OUTPUT)
    if final is None or not final.complete:
        fail("bundle: the model outputs do not all reach the destination")
    return final.tensors(bundle.outputs, "destination")


def exit_messages(messages: list[tuple[str, Message]]) -> list[tuple[str, Message]]:
    """What an exit unit sends when a request leaves there: only its messages for
    ``"output"`` (the head's output; nothing goes on to later units)."""
    return [(to, msg) for to, msg in messages if to == OUTPUT]


def exit_result(bundle: Bundle, unit: Unit, messages: list[tuple[str, Message]],
                output: str) -> dict[str, np.ndarray]:
    """The result of a request that left at ``unit``'s head: its output alone."""
    spec = next((t for t in bundle.outputs if t.name == output), None)
    pieces = [msg[output] for _, msg in exit_messages(messages) if output in msg]
    if spec is None or not pieces:
        fail(f"unit {unit.key}: exit head {output!r} is not sent to the destination")
    return {output: assemble(spec, pieces, f"exit {output} at unit {unit.key}")}


def check_graph(bundle: Bundle) -> None:
    """Refuse a bundle whose sends do not add up (a dry run with zero-filled tensors).

    Every receiver gets every tensor it declares, tiled exactly by the pieces it is sent,
    from senders that hold them; each receiver's senders come earlier in stage order.
    """
    def zeros(t: TensorSpec) -> np.ndarray:  # a broadcast view: allocates nothing
        return np.broadcast_to(np.zeros((), dtype=_np_dtype(t.dtype)), t.shape)

    feeds = {t.name: zeros(t) for t in bundle.inputs}

    def fake(unit: Unit, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {t.name: zeros(t) for t in unit.outputs}

    keys = {u.key for u in bundle.units()} | {OUTPUT}
    for to in expected_senders(bundle):
        if to not in keys:
            fail(f"bundle: a send goes to {to!r}, which is no unit of the bundle")
    run_graph(bundle, feeds, fake)


def _numpy_dtype(name: str) -> np.dtype | None:
    """The numpy dtype of a manifest dtype; None for those numpy lacks (int4...)."""
    try:
        return np.dtype(name)
    except TypeError:
        return None


def _np_dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:  # int4 and friends travel packed: a byte per element is enough here
        return np.dtype("uint8")
