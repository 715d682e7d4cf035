"""The engine loop of one model replica, on its own thread: admit, step, retire, repeat.

The event loop hands it `Work` (one image each) and cancels requests; the thread asks the
pure scheduler what changes at each step boundary (giving it the time and the cost model),
lets the runner prepare newcomers, runs one denoiser call over the batch the scheduler
chose, and decodes whatever finished. It times prepare, steady steps (with the loop's own
time between steps) and finish into the replica's cost model (costmodel.py), which is how the
scheduler learns what sharing a step saves here. Its thread is the replica's one long-lived
thread that runs torch (engine/threads.py says why).
Results go back through each image's `deliver` callback (thread-safe, set by the caller).
Nothing here touches the asyncio loop or does encoding/uploads: the loop only ever waits on
the runner.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve_app.replica.costmodel import CostModel, describe_key
from serve_app.replica.scheduler import StepScheduler, Ticket

logger = logging.getLogger("ray.serve")

# deliver(image or exception, largest batch this image ran in)
Deliver = Callable[[Any, int], None]


@dataclass(eq=False)
class Work:
    ticket: Ticket
    spec: Any  # the runner's ImageSpec
    deliver: Deliver
    state: Any = None  # the runner's per-image state, once admitted
    largest_batch: int = 0
    previews: int = 0  # streamed partial images wanted, spaced over the steps the image runs
    preview_at: tuple[int, ...] = ()  # set at admission: after these steps, decode the estimate
    on_preview: Callable[[Any], None] | None = None


@dataclass
class LoopStats:
    """Counters for benchmarks and tests (the metrics carry the same to Prometheus)."""

    steps: int = 0  # denoiser calls
    image_steps: int = 0  # images x steps run
    cancelled_steps: int = 0  # image-steps not run because their request left
    step_s: float = 0.0  # time inside runner.step
    gap_s: float = 0.0  # loop time between consecutive steps with nothing admitted or finished
    gaps: int = 0


# Ray exports a gauge only while it keeps being set: an idle replica's cost model would vanish from
# Prometheus (and the dashboard) about half a minute after its last step. Set again this often.
REPUBLISH_S = 5.0


class StepLoop:
    def __init__(self, runner: Any, scheduler: StepScheduler, metrics: Any, on_error: Callable[[Exception], Exception],
                 costs: CostModel | None = None, republish_s: float = REPUBLISH_S):
        self.runner = runner
        self.scheduler = scheduler
        self.metrics = metrics
        self.on_error = on_error  # maps an engine exception to what the requests get
        self.costs = costs or CostModel()
        self.stats = LoopStats()
        self._republish_s = republish_s
        self._published = time.monotonic()
        # The last prepare or decode, observed once the next step shows what it left that step to pay.
        self._pending: tuple[str, Any, int, float] | None = None
        self._work: dict[int, Work] = {}  # id(ticket) -> work
        self._lock = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="step-loop", daemon=True)
        self._thread.start()

    def submit(self, works: list[Work]) -> None:
        with self._lock:
            for work in works:
                self._work[id(work.ticket)] = work
            self.scheduler.submit([w.ticket for w in works])
            self._lock.notify()

    def cancel(self, request_id: str) -> None:
        """The request's waiting images are dropped now, its running ones at the next step."""
        with self._lock:
            dropped = self.scheduler.cancel(request_id)
            saved = sum(t.steps for t in dropped)  # an edit runs steps x strength of them
            for t in dropped:
                self._work.pop(id(t))
        self._count_cancelled(saved)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()

    def _count_cancelled(self, steps: int) -> None:
        if steps:
            self.stats.cancelled_steps += steps
            self.metrics.cancelled_steps(steps)

    def _run(self) -> None:
        while True:
            try:
                self._loop()
                return
            except Exception as exc:  # a bug here must fail the images in flight, not stop the replica
                logger.exception("step loop error")
                with self._lock:
                    stuck = [w for w in self._work.values() if w.ticket in self.scheduler.running]
                self._fail(stuck, exc)

    def _loop(self) -> None:
        import torch  # the loop's thread does all tensor work

        last_step_ended: float | None = None  # set only when nothing but a step happened since
        while True:
            with self._lock:
                while self.scheduler.idle() and not self._stopped:
                    last_step_ended = None
                    self._settle()  # no step follows: nothing was left to pay
                    self._lock.wait(self._republish_s)
                    self._republish()
                if self._stopped:
                    return
                plan = self.scheduler.plan(time.monotonic(), self.costs)
                evicted = [self._work.pop(id(t)) for t in plan.evict]
                admitted = [self._work[id(t)] for t in plan.admit]
            self._count_cancelled(sum(w.state.remaining for w in evicted))
            with torch.inference_mode():
                self._admit(admitted)
                with self._lock:  # without the newcomers that failed to prepare
                    running = [self._work[id(t)] for t in plan.batch if id(t) in self._work]
                if not running:
                    continue
                started = time.monotonic()
                # A step right after a plain step: the steady state. After an admission or a decode
                # the caches hold the text encoders' or the VAE's weights, not the denoiser's (on a
                # CPU those steps made the batch-1 estimate 1.4-2x the steady one): what they cost
                # extra is charged to that prepare or decode (`_settle`), not to the batch size.
                steady = last_step_ended is not None and not (admitted or evicted)
                if steady:
                    self.stats.gap_s += started - last_step_ended
                    self.stats.gaps += 1
                finished = self._step(running, started, steady)
                last_step_ended = None if finished else time.monotonic()
            self._republish()

    def _admit(self, admitted: list[Work]) -> None:
        if not admitted:
            return
        now = time.monotonic()
        for work in admitted:
            self.metrics.queue_wait(now - work.ticket.arrived_s)
        try:
            states = self.runner.prepare([w.spec for w in admitted])
        except Exception as exc:
            self._fail(admitted, exc)
            return
        self._settle()
        self._pending = ("prepare", admitted[0].ticket.costs_as, len(admitted), time.monotonic() - now)
        with self._lock:  # what the runner will really run (an edit runs the last part of its schedule)
            for work, state in zip(admitted, states, strict=True):
                work.ticket.steps = state.remaining
        for work, state in zip(admitted, states, strict=True):
            work.state = state
            if work.previews and not getattr(self.runner, "whole_call", False):  # whole calls: no previews
                # Over the steps it runs: an edit runs only the last part of its schedule.
                work.preview_at = preview_steps(len(state.timesteps), work.previews)

    def _step(self, running: list[Work], started: float, steady: bool) -> bool:
        """One denoiser call over the running batch; decode and deliver what finished.
        True when anything left the batch."""
        try:
            self.runner.step([w.state for w in running])
        except Exception as exc:
            self._fail(running, exc)
            return True
        seconds = time.monotonic() - started
        with self._lock:
            self.scheduler.stepped([w.ticket for w in running])
        self.stats.steps += 1
        self.stats.image_steps += len(running)
        self.stats.step_s += seconds
        whole_call = getattr(self.runner, "whole_call", False)
        self.metrics.step(len(running), seconds, whole_call=whole_call)
        # What a call costs the loop: the denoiser's seconds and the loop's own between calls
        # (planning, bookkeeping), which every call pays whatever its size. Whole calls are never
        # steady (each follows its admission) and are learned as they come.
        key, call_s = running[0].ticket.costs_as, seconds + self.stats.gap_s / max(1, self.stats.gaps)
        if steady or whole_call:
            self._learn(key, len(running), call_s)
            self._settle()
        else:
            after_own = self._pending is not None and self._pending[1] == key
            self._settle(max(0.0, call_s - self.costs.step_s(key, len(running))) if after_own else 0.0)
        for work in running:
            work.largest_batch = max(work.largest_batch, len(running))
        failed = [w for w in running if not self._preview(w)]
        finished = [w for w in running if w.state.done and w not in failed]
        if not finished:
            return False
        decoding = time.monotonic()
        try:
            images = self.runner.finish([w.state for w in finished])
        except Exception as exc:
            self._fail(finished, exc)
            return True
        self._settle()
        self._pending = ("finish", finished[0].ticket.costs_as, len(finished), time.monotonic() - decoding)
        self._retire(finished)
        self.metrics.images(len(finished))
        for work, image in zip(finished, images, strict=True):
            work.deliver(image, work.largest_batch)
        return True

    def _settle(self, extra_s: float = 0.0) -> None:
        """Observe the pending prepare or decode, with what it left the next step to pay."""
        if self._pending is None:
            return
        kind, key, images, seconds = self._pending
        self._pending = None
        observe = self.costs.observe_prepare if kind == "prepare" else self.costs.observe_finish
        observe(key, images, seconds + extra_s)
        self.metrics.image_costs(describe_key(key), self.costs.prepare_s(key), self.costs.finish_s(key))

    def _learn(self, key: Any, size: int, seconds: float) -> None:
        self.costs.observe_step(key, size, seconds)
        measured = self.costs.measured_s(key, size)
        if measured is not None:  # not the warm-up sample
            self.metrics.step_cost(describe_key(key), size, measured)

    def _republish(self) -> None:
        """Every estimate of the cost model as a gauge again, every `republish_s` (see REPUBLISH_S)."""
        if time.monotonic() - self._published < self._republish_s:
            return
        self._published = time.monotonic()
        for entry in self.costs.snapshot():
            for size, seconds in entry["step_s"].items():
                self.metrics.step_cost(entry["key"], size, seconds)
            self.metrics.image_costs(entry["key"], entry["prepare_s"], entry["finish_s"])

    def _preview(self, work: Work) -> bool:
        """Previews due after this step (a position may repeat when steps are few)."""
        if not work.preview_at:
            return True
        for _ in range(work.preview_at.count(work.state.index)):
            try:
                image = self.runner.preview(work.state)
            except Exception as exc:
                self._fail([work], exc)
                return False
            work.on_preview(image)  # type: ignore[misc]
        return True

    def _fail(self, works: list[Work], exc: Exception) -> None:
        error = self.on_error(exc)
        self._retire(works)
        for work in works:
            work.deliver(error, work.largest_batch)

    def _retire(self, works: list[Work]) -> None:
        with self._lock:
            self.scheduler.finished([w.ticket for w in works])
            for work in works:
                self._work.pop(id(work.ticket), None)


def preview_steps(steps: int, partial_images: int) -> tuple[int, ...]:
    """After which steps to show previews: evenly spaced, never before the first step nor
    after the last (with fewer steps than previews, a step shows more than one)."""
    return tuple(max(1, min(steps, round((k + 1) * steps / (partial_images + 1)))) for k in range(partial_images))
