"""The step scheduler: pure policy (no Ray, no torch). At every step boundary it says which
running images leave (their request was cancelled) and which waiting images join.

One ticket is one image. Images share a denoiser call only when their batch keys are equal
(the runner decides the key: size and CFG on/off in step mode; size, steps and guidance in
whole-call mode). An empty batch takes the oldest waiting image's key and every waiting
image of that key, up to the cap. Fairness: a waiting image joins a running batch only while
no image of another key has waited longer, so a busy key drains and the oldest other key
goes next. No key starves.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass(eq=False)  # identity semantics: two tickets are never "equal"
class Ticket:
    """One image of one request, as the scheduler sees it."""

    request_id: str
    index: int  # the image's position in its request
    key: Hashable  # images share a step only with equal keys
    arrived_s: float = 0.0  # monotonic time the request reached the replica
    order: int = field(default_factory=itertools.count().__next__)  # arrival order, ties broken

    def __repr__(self) -> str:
        return f"Ticket({self.request_id}#{self.index})"


@dataclass
class Plan:
    """What changes at this step boundary."""

    evict: list[Ticket]  # running tickets of cancelled requests: stop stepping them
    admit: list[Ticket]  # waiting tickets that join the running batch now


class StepScheduler:
    """`cap`: images per denoiser call. `join_running`: whether waiting images may join a batch
    that is already running (step mode) or only an empty one (whole-call mode)."""

    def __init__(self, cap: int, *, join_running: bool = True):
        if cap < 1:
            raise ValueError("cap must be at least 1")
        self.cap = cap
        self.join_running = join_running
        self.waiting: list[Ticket] = []  # arrival order
        self.running: list[Ticket] = []
        self._cancelled: set[str] = set()

    def submit(self, tickets: list[Ticket]) -> None:
        self.waiting.extend(tickets)
        self.waiting.sort(key=lambda t: t.order)

    def cancel(self, request_id: str) -> list[Ticket]:
        """Drop the request's waiting tickets now (returned); its running ones leave at the
        next `plan()`."""
        dropped = [t for t in self.waiting if t.request_id == request_id]
        self.waiting = [t for t in self.waiting if t.request_id != request_id]
        if any(t.request_id == request_id for t in self.running):
            self._cancelled.add(request_id)
        return dropped

    def finished(self, tickets: list[Ticket]) -> None:
        """Tickets whose last step is done (or that failed) leave the running batch."""
        gone = {id(t) for t in tickets}
        self.running = [t for t in self.running if id(t) not in gone]
        live = {t.request_id for t in self.running}
        self._cancelled &= live

    def plan(self) -> Plan:
        evict = [t for t in self.running if t.request_id in self._cancelled]
        if evict:
            self.finished(evict)
        admit: list[Ticket] = []
        if self.running and not self.join_running:
            return Plan(evict, admit)
        joining = bool(self.running)
        key = self.running[0].key if joining else (self.waiting[0].key if self.waiting else None)
        room = self.cap - len(self.running)
        # Joining a running batch: nothing younger than the oldest waiting ticket of another
        # key may join, so the batch drains and that key goes next.
        other = next((t.order for t in self.waiting if t.key != key), None) if joining else None
        for ticket in self.waiting:
            if room == 0 or (other is not None and ticket.order > other):
                break
            if ticket.key == key:
                admit.append(ticket)
                room -= 1
        if admit:
            taken = {id(t) for t in admit}
            self.waiting = [t for t in self.waiting if id(t) not in taken]
            self.running.extend(admit)
        return Plan(evict, admit)

    def idle(self) -> bool:
        return not self.waiting and not self.running
