"""The step scheduler: pure policy (no Ray, no torch, no clock). At every step boundary it says
which images leave (their request was cancelled), which waiting images are prepared now, and
which prepared images run the next denoiser call. The time and the cost of a step are inputs
(`plan(now, costs)`), so the simulator (benchmarks/simulate.py) drives this very class in
virtual time.

One ticket is one image. Images share a denoiser call only when their batch keys are equal
(the runner decides the key: size and CFG on/off for step runners; size, steps and guidance
for whole calls). Three policies (`batching.policy`):

- `call`: whole pipeline calls, first come first served. An empty batch takes the oldest
  waiting image's key and every waiting image of that key, up to the cap; nothing joins a
  running call.
- `fixed`: the step engine as it first shipped: like `call`, but waiting images join the
  running batch at any step boundary, up to the cap, while no image of another key has
  waited longer (so a busy key drains and the oldest other key goes next).
- `cost`: shortest remaining work first, a request's images together, the batch grown only
  while the measured cost curve says sharing pays, within a waiting bound (costpolicy.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from serve_app.replica.costpolicy import CostPolicy

Policy = Literal["call", "fixed", "cost"]


@dataclass(eq=False)  # identity semantics: two tickets are never "equal"
class Ticket:
    """One image of one request, as the scheduler sees it."""

    request_id: str
    index: int  # the image's position in its request
    key: Hashable  # images share a step only with equal keys
    arrived_s: float = 0.0  # monotonic time the request reached the replica
    order: int = field(default_factory=itertools.count().__next__)  # arrival order, ties broken
    steps: int = 1  # denoising steps this image runs (the loop corrects it once prepared)
    done: int = 0  # steps run so far (`stepped`)
    cost_key: Hashable = None  # the key its costs are measured under, when not `key` (deterministic images)

    def __repr__(self) -> str:
        return f"Ticket({self.request_id}#{self.index})"

    @property
    def costs_as(self) -> Hashable:
        return self.key if self.cost_key is None else self.cost_key


@dataclass
class Plan:
    """What changes at this step boundary."""

    evict: list[Ticket]  # running tickets of cancelled requests: stop stepping them
    admit: list[Ticket]  # waiting tickets to prepare now (they join the running ones)
    batch: list[Ticket]  # the tickets the next denoiser call runs (`call`/`fixed`: every running one)


class Costs(Protocol):
    """Seconds, as the replica measured them (serve_app/replica/costmodel.py) or as a
    simulated device costs them."""

    def step_s(self, key: Hashable, size: int) -> float: ...

    def step_error_s(self, key: Hashable, size: int) -> float: ...

    def prepare_s(self, key: Hashable, images: int = 1) -> float: ...  # one prepare call over `images`

    def finish_s(self, key: Hashable, images: int = 1) -> float: ...  # one decode over `images`

    def trusted(self, key: Hashable, size: int) -> bool: ...


class UnitCosts:
    """Every image-step costs one second: the order by remaining steps, nothing shared."""

    def step_s(self, key: Hashable, size: int) -> float:
        return float(size)

    def step_error_s(self, key: Hashable, size: int) -> float:
        return 0.0

    def prepare_s(self, key: Hashable, images: int = 1) -> float:
        return 0.0

    def finish_s(self, key: Hashable, images: int = 1) -> float:
        return 0.0

    def trusted(self, key: Hashable, size: int) -> bool:
        return True


class StepScheduler:
    """`cap`: images per denoiser call. `max_wait_factor` / `max_wait_s`: the `cost` policy's
    waiting bound (costpolicy.py): a request finishes at most that many times its own
    service time (or seconds, whichever is less) after first come first served would have
    finished it."""

    def __init__(self, cap: int, policy: Policy = "fixed", *, max_wait_factor: float = 1.0,
                 max_wait_s: float | None = None):
        if cap < 1:
            raise ValueError("cap must be at least 1")
        if policy not in ("call", "fixed", "cost"):
            raise ValueError(f"unknown policy {policy!r}")
        self.cap = cap
        self.policy = policy
        self.waiting: list[Ticket] = []  # arrival order
        self.running: list[Ticket] = []  # prepared (for `cost`: some may sit out a step)
        self._cancelled: set[str] = set()
        self._cost = CostPolicy(cap, max_wait_factor, math.inf if max_wait_s is None else max_wait_s)

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
        else:
            self._forget({request_id})
        return dropped

    def stepped(self, tickets: list[Ticket]) -> None:
        """The batch ran one denoising step."""
        for ticket in tickets:
            ticket.done += 1

    def finished(self, tickets: list[Ticket]) -> None:
        """Tickets whose last step is done (or that failed) leave the running batch."""
        gone = {id(t) for t in tickets}
        self.running = [t for t in self.running if id(t) not in gone]
        live = {t.request_id for t in self.running}
        self._cancelled &= live
        self._forget({t.request_id for t in tickets} - live)

    def _forget(self, request_ids: set[str]) -> None:
        for request_id in request_ids - {t.request_id for t in self.waiting}:
            self._cost.forget(request_id)

    def plan(self, now: float = 0.0, costs: Costs | None = None) -> Plan:
        evict = [t for t in self.running if t.request_id in self._cancelled]
        if evict:
            self.finished(evict)
        if self.policy == "cost":
            batch = self._cost.choose(self.running, self.waiting, now, costs or UnitCosts())
        else:
            batch = self.running + self._joining()
        taken = {id(t) for t in batch}
        admit = [t for t in self.waiting if id(t) in taken]
        if admit:
            self.waiting = [t for t in self.waiting if id(t) not in taken]
            self.running.extend(admit)
        return Plan(evict, admit, batch if self.policy == "cost" else list(self.running))

    def idle(self) -> bool:
        return not self.waiting and not self.running

    # -- call / fixed -------------------------------------------------------------------
    def _joining(self) -> list[Ticket]:
        if self.running and self.policy == "call":
            return []
        joining = bool(self.running)
        key = self.running[0].key if joining else (self.waiting[0].key if self.waiting else None)
        room = self.cap - len(self.running)
        # Joining a running batch: nothing younger than the oldest waiting ticket of another
        # key may join, so the batch drains and that key goes next.
        other = next((t.order for t in self.waiting if t.key != key), None) if joining else None
        admit: list[Ticket] = []
        for ticket in self.waiting:
            if room == 0 or (other is not None and ticket.order > other):
                break
            if ticket.key == key:
                admit.append(ticket)
                room -= 1
        return admit
