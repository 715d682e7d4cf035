"""The replica's step loop on its own thread, in-process (no Ray) with a real tiny runner:
images join at step boundaries, leave as soon as they are done, cancelled requests stop
within a step, failures reach their requests and the loop goes on."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest

from serve_app.config import load_model_config
from serve_app.errors import GenerationError
from serve_app.replica.scheduler import StepScheduler, Ticket
from serve_app.replica.steploop import StepLoop, Work

MODELS = Path(__file__).resolve().parents[2] / "models"


class Recorder:
    """Stands in for the Prometheus metrics (Ray's metric objects need a running Ray)."""

    def __init__(self):
        self.steps: list[int] = []
        self.cancelled = 0

    def step(self, images, seconds, whole_call=False):
        self.steps.append(images)

    def cancelled_steps(self, steps):
        self.cancelled += steps

    def queue_wait(self, seconds): ...

    def images(self, count): ...

    def step_cost(self, key, batch_size, seconds): ...

    def image_costs(self, key, prepare_s, finish_s): ...


@pytest.fixture(scope="module")
def engine():
    from serve_app.engine.pipeline import DiffusersEngine

    return DiffusersEngine(load_model_config(MODELS / "tiny-flux.yaml"))


@pytest.fixture(scope="module")
def runner(engine):
    from serve_app.engine.runners import make_runner

    return make_runner(engine)


def spec(steps: int, seed: int = 1, size: int = 128):
    from serve_app.engine.runners import ImageSpec

    return ImageSpec("a fox", None, size, size, steps, 3.5, seed)


def start(runner, cap: int = 4):
    metrics = Recorder()
    loop = StepLoop(runner, StepScheduler(cap), metrics, lambda exc: GenerationError(str(exc)))
    return loop, metrics


def submit(loop, runner, request_id: str, specs, results: queue.Queue, order: int | None = None):
    # steps as ModelServer sets them: the cost policy fixes a request's deadline when it first sees it
    works = [Work(Ticket(request_id, i, runner.batch_key(s), time.monotonic(), steps=s.steps), s,
                  lambda out, batch, rid=request_id, i=i: results.put((rid, i, out, batch)))
             for i, s in enumerate(specs)]
    loop.submit(works)


def test_a_short_request_joins_a_running_one_and_leaves_first(runner):
    loop, metrics = start(runner)
    results: queue.Queue = queue.Queue()
    submit(loop, runner, "long", [spec(40)], results)
    while loop.stats.steps < 3:
        time.sleep(0.005)
    submit(loop, runner, "short", [spec(4, seed=2)], results)
    first, second = results.get(timeout=60), results.get(timeout=60)
    loop.stop()
    assert (first[0], second[0]) == ("short", "long")  # finished images leave at once
    assert first[3] == 2 and second[3] == 2  # they shared steps
    assert 2 in metrics.steps and metrics.steps[0] == 1
    assert loop.stats.image_steps == 44


def test_a_cancelled_request_stops_within_a_step_and_frees_the_loop(runner):
    loop, metrics = start(runner, cap=2)
    results: queue.Queue = queue.Queue()
    submit(loop, runner, "gone", [spec(200, seed=s) for s in range(4)], results)  # 2 run, 2 wait
    while loop.stats.steps < 2:
        time.sleep(0.005)
    loop.cancel("gone")
    submit(loop, runner, "next", [spec(3)], results)
    assert results.get(timeout=60)[0] == "next"
    loop.stop()
    assert results.empty()  # nothing delivered for the cancelled request
    # 2 waiting images x 200 steps, plus the 2 running ones' remaining steps
    assert loop.stats.cancelled_steps > 2 * 200 + 2 * 150
    assert metrics.cancelled == loop.stats.cancelled_steps
    assert loop.stats.image_steps < 2 * 20 + 3


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(runner):
    class Broken:
        whole_call = False

        def __init__(self):
            self.fail = threading.Event()
            self.fail.set()

        def batch_key(self, s):
            return runner.batch_key(s)

        def prepare(self, specs):
            return runner.prepare(specs)

        def step(self, states):
            if self.fail.is_set():
                self.fail.clear()
                raise RuntimeError("boom")
            runner.step(states)

        def finish(self, states):
            return runner.finish(states)

    broken = Broken()
    loop = StepLoop(broken, StepScheduler(4), Recorder(), lambda exc: GenerationError("failed"))
    results: queue.Queue = queue.Queue()
    submit(loop, broken, "bad", [spec(3)], results)
    request_id, _, outcome, _ = results.get(timeout=60)
    assert request_id == "bad" and isinstance(outcome, GenerationError)
    submit(loop, broken, "good", [spec(3)], results)
    request_id, _, outcome, _ = results.get(timeout=60)
    loop.stop()
    assert request_id == "good" and outcome.size == (128, 128)


def test_whole_call_mode_batches_same_shape_images_into_one_pipeline_call(engine):
    from serve_app.engine.runners import WholeCallRunner

    whole = WholeCallRunner(engine)
    loop = StepLoop(whole, StepScheduler(4, "call"), Recorder(), lambda exc: GenerationError(str(exc)))
    results: queue.Queue = queue.Queue()
    submit(loop, whole, "a", [spec(3, seed=s) for s in range(3)], results)
    outcomes = [results.get(timeout=60) for _ in range(3)]
    loop.stop()
    assert all(out.size == (128, 128) and batch == 3 for _, _, out, batch in outcomes)
    assert loop.stats.steps == 1  # one pipeline call for the three images


def test_previews_are_decoded_after_their_steps(runner):
    loop, _ = start(runner)
    results: queue.Queue = queue.Queue()
    previews: list = []
    s = spec(6)
    work = Work(Ticket("p", 0, runner.batch_key(s)), s, lambda out, batch: results.put(out),
                previews=2, on_preview=previews.append)
    loop.submit([work])
    final = results.get(timeout=60)
    loop.stop()
    assert len(previews) == 2 and all(p.size == final.size for p in previews)


def linear_costs(runner, size: int = 128):
    """A cost model that has already seen a linear curve, a second per image (slower than
    this CPU: as batch 1 is re-measured at its real speed, sharing only looks worse)."""
    from serve_app.replica.costmodel import CostModel

    costs = CostModel()
    key = runner.batch_key(spec(1, size=size))
    for batch in (1, 2, 3, 4):
        for _ in range(4):
            costs.observe_step(key, batch, 1.0 * batch)
    return costs


def test_cost_policy_pauses_a_long_image_for_a_short_one_and_resumes_it_unchanged(runner):
    results: queue.Queue = queue.Queue()
    alone = StepLoop(runner, StepScheduler(4, "cost"), Recorder(), lambda exc: GenerationError(str(exc)))
    submit(alone, runner, "alone", [spec(20, seed=7)], results)
    expected = results.get(timeout=60)[2]
    alone.stop()

    metrics = Recorder()
    loop = StepLoop(runner, StepScheduler(4, "cost", max_wait_factor=10), metrics,
                    lambda exc: GenerationError(str(exc)), costs=linear_costs(runner))
    submit(loop, runner, "long", [spec(20, seed=7)], results)
    while loop.stats.steps < 3:
        time.sleep(0.002)
    submit(loop, runner, "short", [spec(3, seed=2)], results)
    first, second = results.get(timeout=60), results.get(timeout=60)
    loop.stop()
    assert (first[0], second[0]) == ("short", "long")  # the short one went first
    assert first[3] == 1 and second[3] == 1  # on a linear curve nothing shares a step
    assert loop.stats.image_steps == 23  # the long image was paused, not restarted
    assert second[2].tobytes() == expected.tobytes()  # and resumed exactly where it stopped


class Costs(Recorder):
    def __init__(self):
        super().__init__()
        self.gauges = []

    def step_cost(self, key, batch_size, seconds):
        self.gauges.append((key, batch_size, seconds))


def test_the_loop_teaches_the_cost_model_what_a_step_costs(runner):
    metrics = Costs()
    loop = StepLoop(runner, StepScheduler(4), metrics, lambda exc: GenerationError(str(exc)))
    results: queue.Queue = queue.Queue()
    for i in range(3):
        submit(loop, runner, f"r{i}", [spec(4, seed=i), spec(4, seed=i + 10)], results)
    for _ in range(6):
        results.get(timeout=60)
    loop.stop()
    [row] = loop.costs.snapshot()
    assert row["key"] == "128x128"  # FLUX: no CFG pass
    assert all(seconds > 0 for seconds in row["step_s"].values()) and row["prepare_s"] > 0 and row["finish_s"] > 0
    # exported only for sizes run more than once (the first call at a size is warm-up)
    assert {size for _, size, _ in metrics.gauges} <= {b for b in metrics.steps if metrics.steps.count(b) > 1}
    assert metrics.gauges


def test_a_step_right_after_an_admission_is_not_what_its_size_costs(runner):
    """After a prepare the caches hold the text encoders, not the denoiser: that step's extra
    time is the prepare's, not the batch size's (a policy would stop running a size it only saw
    cold), and still counted (deadlines judged on costs without it would come too late)."""

    class ColdAfterPrepare:
        whole_call = False

        def __init__(self, inner):
            self.inner, self.cold, self.warm_s = inner, False, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def prepare(self, specs):
            self.cold = True
            return self.inner.prepare(specs)

        def step(self, states):
            was_cold, self.cold = self.cold, False
            if was_cold:
                time.sleep(1.0)
            started = time.monotonic()
            self.inner.step(states)
            if not was_cold:
                self.warm_s.append(time.monotonic() - started)

    cold = ColdAfterPrepare(runner)
    loop = StepLoop(cold, StepScheduler(4), Recorder(), lambda exc: GenerationError(str(exc)))
    results: queue.Queue = queue.Queue()
    for i in range(3):  # one after another: each request's first step is cold
        submit(loop, cold, f"r{i}", [spec(4, seed=i)], results)
        results.get(timeout=60)
    loop.stop()
    [row] = loop.costs.snapshot()
    # An average of warm steps (plus the loop's own ms between calls): one cold second in it, even
    # three steps back (the average's weight 0.2 * 0.8**3), would add more than 0.1 s.
    assert row["step_s"][1] < max(cold.warm_s) + 0.05
    assert row["prepare_s"] > 0.5  # the cold step's extra second is the prepare's (the first sample dropped)


def test_an_idle_loop_sets_its_cost_gauges_again(runner):
    """Ray drops a gauge that is not set again: an idle replica keeps showing what it measured."""
    metrics = Costs()
    loop = StepLoop(runner, StepScheduler(4), metrics, lambda exc: GenerationError(str(exc)), republish_s=0.1)
    results: queue.Queue = queue.Queue()
    submit(loop, runner, "r", [spec(4)], results)
    results.get(timeout=60)
    time.sleep(0.3)  # idle from here on
    metrics.gauges.clear()
    time.sleep(0.5)
    loop.stop()
    [row] = loop.costs.snapshot()
    assert {(key, size, seconds) for key, size, seconds in metrics.gauges} == \
        {(row["key"], size, seconds) for size, seconds in row["step_s"].items()}
    assert len(metrics.gauges) >= 2 * len(row["step_s"])  # again and again, not once


def test_setting_the_gauges_again_loses_no_pending_decode(runner):
    """A decode is observed at the next step (with what it left that step to pay): setting the
    gauges again in between (here after every step) must not drop it. (It did: `finish_s`
    stayed 0.)"""
    loop = StepLoop(runner, StepScheduler(4), Costs(), lambda exc: GenerationError(str(exc)), republish_s=0.0)
    results: queue.Queue = queue.Queue()
    for i in range(3):
        submit(loop, runner, f"r{i}", [spec(2, seed=i)], results)
        results.get(timeout=60)
    loop.stop()
    [row] = loop.costs.snapshot()
    assert row["finish_s"] > 0
