"""The `cost` policy of the step scheduler: which prepared or waiting images run the next
denoiser call, from what each request still has to do and what a step costs. Pure (no torch,
no Ray, no clock): `now` and the costs are inputs, as for the scheduler.

A diffusion request's work is known when it arrives: its images x steps x the cost of a step.
So, at every step boundary:

1. Order requests by remaining work (seconds alone, from where they are), shortest first:
   for a mean response time, shortest-remaining-work-first is the order to beat. A request's
   images stay together (its response needs all of them). Preemptive: a prepared image may sit
   out steps and resume later; its state stays in memory.
2. Bound the waiting. A request may be delayed by requests that arrived after it (overtaking
   it, or sharing its steps) for at most its slack, `max_wait_factor` x its own service time
   (at most `max_wait_s`), counted in the seconds the loop really took, not in estimates: at
   every boundary the last call's wall time (its step, and the prepares and decodes around it)
   is charged to each request it delayed, in proportion to the images of later arrivals in
   it (for a request in the call: to their share of what the call cost beyond its own images).
   Once later arrivals have taken half its slack it is urgent; urgent requests go first,
   oldest first, so nothing later overtakes it again.
3. Grow the batch, in that order, only where sharing pays (`sharing_pays`): the running
   requests lose what the newcomers add to each step, the newcomers and everyone behind
   them (waiting now, or arriving before the work drains) gain what sharing saves. The next
   newcomers are judged together until they pay or the cap is reached (on a bumpy measured
   curve one more may not pay where three more do). A saving within the measurements' noise
   counts only once one request at a time cannot keep up with the arrivals. On a linear
   curve that is one request at a time; on a sublinear one (this CPU's tiny models, a GPU
   with small work) the batch follows the curve, up to the cap. The other half of an urgent
   request's slack is what newcomers sharing its steps may spend: one whose prepare and decode
   (the loop runs them between steps; its prepare counted as what it adds to the one prepare
   call over the boundary's newcomers, from the measured cost by number of images) would take
   more than is left is passed over, so a stream of short requests, each prepared and decoded
   while it shares the urgent one's steps, cannot push it past its bound. Once the slack is
   gone (an overloaded replica) the guard lifts: refusing newcomers then would only turn a
   sublinear device into one that serves one image at a time, and everyone would wait longer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.replica.scheduler import Costs, Ticket

# Sharing counts only when it saves more than this many standard errors of the measured
# costs: on a linear device a saving that is only noise would turn one-at-a-time order into
# processor sharing. Only while one request at a time keeps up with the arrivals: once it
# cannot, refusing a saving that may be noise only loses capacity (in the simulator, a curve
# measured over HTTP here with 30 % noise, 90 % load: 1.24x whole calls' mean guarded
# throughout, 0.70x lifted; a linear curve pays 3-12 % of its p99 for it).
NOISE_ERRORS = 2.0
MAX_LOAD = 0.9  # the arrival term's 1 / (1 - load) stays finite near saturation
# A request is urgent once later arrivals have taken this share of its slack: what is left is
# the reserve newcomers may spend on it, by the prepares and decodes the loop runs between its
# steps while they share them.
RESERVE = 0.5
ARRIVAL_WEIGHT = 0.1  # of the newest gap in the moving average of gaps between requests


@dataclass
class Group:
    """The unfinished images of one request (of one key)."""

    tickets: list[Ticket]
    steps_left: int = 0
    extra_s: float = 0.0  # prepare + finish of its images (in calls of at most the cap)
    remaining_s: float = 0.0  # alone, from where it is
    service_s: float = 0.0  # alone, from the start
    slack_s: float = math.inf  # how much longer later arrivals may still delay it
    urgent: bool = False

    @property
    def key(self) -> Hashable:
        return self.tickets[0].key

    @property
    def costs_as(self) -> Hashable:
        return self.tickets[0].costs_as

    @property
    def request_id(self) -> str:
        return self.tickets[0].request_id

    @property
    def order(self) -> int:
        return min(t.order for t in self.tickets)


class CostPolicy:
    def __init__(self, cap: int, max_wait_factor: float, max_wait_s: float):
        self.cap = cap
        self.max_wait_factor = max_wait_factor
        self.max_wait_s = max_wait_s
        self._slack: dict[str, float] = {}  # request id -> seconds later arrivals may still delay it
        self._reserve: dict[str, float] = {}  # request id -> the slack left when it becomes urgent
        # The last call: when it was chosen, and (order, request id) per image.
        self._last: tuple[float, list[tuple[int, str]]] | None = None
        self._last_arrival_s: float | None = None
        self._gap_s: float | None = None  # moving average of the gaps between arrivals

    def forget(self, request_id: str) -> None:
        """The request left (finished, failed or cancelled)."""
        self._slack.pop(request_id, None)
        self._reserve.pop(request_id, None)

    def choose(self, running: list[Ticket], waiting: list[Ticket], now: float, costs: Costs) -> list[Ticket]:
        """The tickets of the next denoiser call (running ones first within a request)."""
        groups: dict[tuple[str, Hashable], Group] = {}
        for ticket in itertools.chain(running, waiting):
            groups.setdefault((ticket.request_id, ticket.key), Group([])).tickets.append(ticket)
        if not groups:
            self._last = None
            return []
        known: dict[tuple[Hashable, int], tuple[float, float]] = {}
        for group in groups.values():
            self._assess(group, costs, known)
        self._charge(groups.values(), now, costs)
        order = sorted(groups.values(), key=lambda g: (not g.urgent, g.order if g.urgent else g.remaining_s, g.order))
        coming, load = self._arriving(order)
        head, prepared = order[0], {id(t) for t in running}
        batch, requests = head.tickets[: self.cap], 1
        # The urgent requests in the batch, with the slack newcomers may still spend on them.
        spare = [(head, head.slack_s)] if head.urgent else []
        # Newcomers considered together: a measured curve is bumpy (over HTTP here 2 images 1.9x
        # one, 4 images 2.7x), so where one more does not pay, the next few together may. Those
        # still pending already count against urgent requests' slack (the cautious side).
        joining: list[Ticket] = []
        newcomers = 0
        admitting = sum(1 for t in batch if id(t) not in prepared)  # prepared in one call before the step
        for position, group in enumerate(order[1:], start=2):
            if len(batch) + len(joining) == self.cap:
                break
            if group.key != head.key or len(group.tickets) > self.cap - len(batch) - len(joining):
                continue  # a request's images stay together
            # The loop prepares a newcomer before the next step and decodes it between later ones
            # (if it finishes first): an urgent request waits for both, from what is left of its
            # slack. None left (spent, or max_wait_factor 0): sharing goes on where it pays.
            delays = [self._delay_s(group, urgent, costs, prepared, admitting) for urgent, _ in spare]
            if any(0 < left < delay for (_, left), delay in zip(spare, delays, strict=True)):
                continue
            spare = [(urgent, left - delay) for (urgent, left), delay in zip(spare, delays, strict=True)]
            if group.urgent:
                spare.append((group, group.slack_s))
            joining, newcomers = joining + group.tickets, newcomers + 1
            admitting += 0 if id(group.tickets[0]) in prepared else len(group.tickets)
            if sharing_pays(costs, group.costs_as, len(batch), len(joining), requests,
                            behind=len(order) - position + coming, newcomers=newcomers, guarded=load < 1):
                batch, joining, requests, newcomers = batch + joining, [], requests + newcomers, 0
        self._last = (now, [(t.order, t.request_id) for t in batch])
        return batch

    @staticmethod
    def _delay_s(joiner: Group, urgent: Group, costs: Costs, prepared: set[int], admitting: int) -> float:
        """The loop's work for `joiner`'s images that `urgent` waits for: preparing them (unless
        prepared: what they add to the one prepare call over the `admitting` images already
        chosen), and decoding them if they finish before it (images that finish with it are
        decoded in the same call as its own, batched: not counted)."""
        images, key = len(joiner.tickets), joiner.costs_as
        delay_s = 0.0 if id(joiner.tickets[0]) in prepared else \
            costs.prepare_s(key, admitting + images) - costs.prepare_s(key, admitting)
        if joiner.steps_left < urgent.steps_left:
            delay_s += costs.finish_s(key, images)
        return delay_s

    def _assess(self, group: Group, costs: Costs, known: dict) -> None:
        """Seconds of a request's images alone (in calls of at most `cap`)."""
        key, n = group.costs_as, len(group.tickets)
        if (key, n) not in known:  # (seconds a step, seconds outside steps) per request size
            sizes = calls(n, self.cap)
            known[key, n] = (sum(costs.step_s(key, size) for size in sizes),
                             sum(costs.prepare_s(key, size) + costs.finish_s(key, size) for size in sizes))
        per_step, group.extra_s = known[key, n]
        group.steps_left = max(t.steps - t.done for t in group.tickets)
        group.service_s = group.tickets[0].steps * per_step + group.extra_s
        group.remaining_s = group.steps_left * per_step + group.extra_s

    def _charge(self, groups: Iterable[Group], now: float, costs: Costs) -> None:
        """Each request's slack, less what the last call (its wall time: the step and the
        loop's prepares and decodes around it) delayed it for later arrivals."""
        for group in sorted(groups, key=lambda g: g.order):
            if group.request_id not in self._slack:
                slack_s = min(self.max_wait_factor * group.service_s, self.max_wait_s)
                self._slack[group.request_id] = slack_s
                self._reserve[group.request_id] = RESERVE * slack_s
                self._note_arrival(group.tickets[0].arrived_s)
            elif self._last is not None:
                chosen_s, images = self._last
                self._slack[group.request_id] -= (now - chosen_s) * delayed(group, images, costs)
            group.slack_s = self._slack[group.request_id]
            group.urgent = group.slack_s <= self._reserve[group.request_id]

    def _note_arrival(self, arrived_s: float) -> None:
        if self._last_arrival_s is not None and arrived_s > self._last_arrival_s:
            gap_s = arrived_s - self._last_arrival_s
            self._gap_s = gap_s if self._gap_s is None else (1 - ARRIVAL_WEIGHT) * self._gap_s + ARRIVAL_WEIGHT * gap_s
        self._last_arrival_s = arrived_s

    def _arriving(self, order: list[Group]) -> tuple[float, float]:
        """Requests not here yet that gain from every second sharing saves too: those that
        arrive before the work in hand drains (arrival rate x work / (1 - load)); and the load
        one request at a time would carry (arrival rate x a request's service alone)."""
        if not self._gap_s:
            return 0.0, 0.0
        rate = 1 / self._gap_s
        load = rate * sum(g.service_s for g in order) / len(order)
        return rate * sum(g.remaining_s for g in order) / (1 - min(MAX_LOAD, load)), load


def calls(images: int, cap: int) -> list[int]:
    """A request's images run in calls of at most `cap`, the first ones full."""
    full, rest = divmod(images, cap)
    return [cap] * full + ([rest] if rest else [])


def delayed(group: Group, images: list[tuple[int, str]], costs: Costs) -> float:
    """The fraction of a call over `images` ((order, request) each) that delayed `group` for
    requests that arrived after it: their images' share of the call if it sat out; if it ran,
    their share of what the call cost beyond its own images alone (on a linear curve the
    same share; on a flat one almost nothing)."""
    later = sum(1 for order, request_id in images if order > group.order and request_id != group.request_id)
    if not later:
        return 0.0
    own = sum(1 for _, request_id in images if request_id == group.request_id)
    if not own:
        return later / len(images)
    beyond = 1 - costs.step_s(group.costs_as, own) / costs.step_s(group.costs_as, len(images))
    return max(0.0, beyond) * later / (len(images) - own)


def sharing_pays(costs: Costs, key: Hashable, size: int, joining: int, requests: int, behind: float,
                 newcomers: int = 1, guarded: bool = True) -> bool:
    """Whether `joining` images (of `newcomers` requests) should join a batch of `size` images
    from `requests` requests, with `behind` requests after them. Per shared step, each running
    request is delayed by what the newcomers add to the call (`together - alone`), and the
    newcomers and everyone behind them gain what sharing saves over running the newcomers
    afterwards, together (`saving`): comparing the two orders of two requests gives exactly
    that, whatever their steps. On a linear curve nothing is saved; on a flat one everything
    joins. A size whose cost is not
    measured (or was measured long ago) is probed: one newcomer joins, and it is measured (more
    newcomers judged together would probe the biggest size within reach every time one goes
    stale: in the simulator, p99 1.11x on FLUX.1-schnell at 50 %). `guarded`: the saving must
    also exceed the measurements' noise (`NOISE_ERRORS`)."""
    if not costs.trusted(key, size + joining):
        return newcomers == 1
    alone, together = costs.step_s(key, size), costs.step_s(key, size + joining)
    noise = NOISE_ERRORS * math.sqrt(sum(costs.step_error_s(key, s) ** 2 for s in (size, joining, size + joining))) \
        if guarded else 0.0
    saving = alone + costs.step_s(key, joining) - together - noise
    return (behind + newcomers) * saving > requests * (together - alone)
