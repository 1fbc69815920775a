"""The requests a worker holds while a unit waits for the rest of its senders.

A unit fed by several senders (a stage reading a skip tensor, a part's gather) keeps
each request's messages in an :class:`~stagebundle.graph.Inbox` until every sender has
sent. A worker must not grow without bound while it waits (issue 15: unbounded queues
took a worker from 83 to 660 MB), so :class:`WaitingRoom` caps both the number of
waiting requests and the tensor bytes they hold (refusing more with :class:`Busy`), and
hands back the ones whose deadline has passed so the worker can drop and report them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from runtime.stages import merge_timings
from stagebundle.errors import UserError
from stagebundle.graph import Inbox, Message

__all__ = ["Busy", "Waiting", "WaitingRoom", "InboxKey"]

InboxKey = tuple[str, str, int, str]  # (plan, request id, attempt, unit)


class Busy(Exception):
    """The worker cannot take the request now (inboxes or a unit queue are full)."""


@dataclass
class Waiting:
    """The inbox of one request for one unit, with what the worker needs to run it."""

    inbox: Inbox
    header: dict[str, Any]  # the first message's header (route, reply)
    deadline: float  # time.monotonic(): the earliest of its messages' deadlines
    opened: float  # time.monotonic() when its first message arrived
    timings: list[dict[str, Any]]
    nbytes: int = 0  # tensor bytes held


class WaitingRoom:
    """Inboxes by :data:`InboxKey`, at most ``max_count`` of them holding ``max_bytes``."""

    def __init__(self, device: str, max_count: int, max_bytes: int) -> None:
        self.device = device
        self.max_count, self.max_bytes = max_count, max_bytes
        self._boxes: dict[InboxKey, Waiting] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def file(self, key: InboxKey, senders: Sequence[str], sender: str, message: Message,
             header: dict[str, Any], deadline: float, now: float, where: str
             ) -> Waiting | None:
        """Add one message; the complete inbox (taken out of the room), else None.

        Raises:
            Busy: the room is full (a message that completes an inbox is always taken).
            UserError: a second message from the same sender.
        """
        if len(senders) == 1 and sender == senders[0]:
            # complete on arrival: nothing to file, so no lock (the common chain hop)
            whole = Waiting(Inbox((sender,), {sender: message}), header, deadline, now, [])
            merge_timings(whole.timings, header.get("timings"))
            return whole
        size = sum(arr.nbytes for _, arr in message.values())
        with self._lock:
            box = self._boxes.pop(key, None)
            if box is None:
                if len(senders) > 1 and len(self._boxes) >= self.max_count:
                    raise Busy(f"{where}: device {self.device} has {self.max_count} "
                               f"requests waiting for their senders")
                box = Waiting(Inbox(tuple(senders)), header, deadline, now, [])
            else:
                self._bytes -= box.nbytes
            try:
                box.inbox.add(sender, message)
            except UserError:
                self._keep(key, box)
                raise
            merge_timings(box.timings, header.get("timings"))
            box.deadline = min(box.deadline, deadline)
            if box.inbox.complete:
                return box
            if self._bytes + box.nbytes + size > self.max_bytes:
                del box.inbox.received[sender]
                self._keep(key, box)
                raise Busy(f"{where}: device {self.device} holds {self._bytes >> 20} MiB "
                           f"of requests waiting for their senders")
            box.nbytes += size
            self._keep(key, box)
            return None

    def _keep(self, key: InboxKey, box: Waiting) -> None:
        """(Re)file an incomplete inbox (the lock is held)."""
        if box.inbox.received:
            self._boxes[key] = box
            self._bytes += box.nbytes

    def expired(self, now: float) -> list[tuple[InboxKey, Waiting]]:
        """Take out and return the inboxes whose deadline has passed."""
        with self._lock:
            dead = [(k, b) for k, b in self._boxes.items() if b.deadline < now]
            for k, b in dead:
                del self._boxes[k]
                self._bytes -= b.nbytes
        return dead

    def usage(self) -> tuple[int, int]:
        """(requests waiting, tensor bytes they hold)."""
        with self._lock:
            return len(self._boxes), self._bytes
