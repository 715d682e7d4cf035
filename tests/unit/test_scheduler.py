"""The step scheduler: pure policy, no torch, no Ray."""

import math

from serve_app.replica.scheduler import StepScheduler, Ticket

A, B = ("256x256", False), ("512x512", False)


def tickets(request_id: str, key, n: int = 1) -> list[Ticket]:
    return [Ticket(request_id, i, key) for i in range(n)]


def ids(batch: list[Ticket]) -> list[str]:
    return [f"{t.request_id}#{t.index}" for t in batch]


def test_admits_the_oldest_key_up_to_the_cap_and_never_mixes_keys():
    s = StepScheduler(3)
    s.submit(tickets("a", A, 2) + tickets("b", B) + tickets("c", A, 2))
    plan = s.plan()
    assert ids(plan.admit) == ["a#0", "a#1", "c#0"]  # an empty batch takes its key's oldest, up to the cap
    assert ids(s.waiting) == ["b#0", "c#1"]
    assert {t.key for t in s.running} == {A}


def test_waiting_images_join_a_running_batch_at_a_step_boundary():
    s = StepScheduler(4)
    s.submit(tickets("a", A))
    s.plan()
    s.submit(tickets("b", A, 2))  # arrives while "a" is running
    assert ids(s.plan().admit) == ["b#0", "b#1"]
    assert ids(s.running) == ["a#0", "b#0", "b#1"]


def test_whole_call_mode_admits_only_into_an_empty_batch():
    s = StepScheduler(4, "call")
    s.submit(tickets("a", A))
    s.plan()
    s.submit(tickets("b", A))
    assert s.plan().admit == []
    s.finished(list(s.running))
    assert ids(s.plan().admit) == ["b#0"]


def test_images_finish_at_different_steps_and_free_their_slot():
    s = StepScheduler(2)
    s.submit(tickets("long", A) + tickets("short", A) + tickets("next", A))
    s.plan()
    assert ids(s.running) == ["long#0", "short#0"]
    s.finished([t for t in s.running if t.request_id == "short"])  # fewer steps: done first
    assert ids(s.plan().admit) == ["next#0"]
    assert ids(s.running) == ["long#0", "next#0"]


def test_a_busy_key_drains_so_an_older_other_key_does_not_starve():
    s = StepScheduler(4)
    s.submit(tickets("a1", A))
    s.plan()
    s.submit(tickets("b", B))  # waits: the batch runs key A
    s.submit(tickets("a2", A))  # younger than b: must not jump ahead of it
    assert s.plan().admit == []
    s.finished(list(s.running))
    assert ids(s.plan().admit) == ["b#0"]  # the oldest waiting key goes next
    s.finished(list(s.running))
    assert ids(s.plan().admit) == ["a2#0"]


def test_same_key_images_older_than_the_other_key_still_join():
    s = StepScheduler(4)
    s.submit(tickets("a1", A))
    s.plan()
    s.submit(tickets("a2", A))
    s.submit(tickets("b", B))
    assert ids(s.plan().admit) == ["a2#0"]


def test_cancel_before_admission_drops_the_waiting_images():
    s = StepScheduler(1)
    s.submit(tickets("a", A) + tickets("gone", A, 3))
    s.plan()
    assert ids(s.cancel("gone")) == ["gone#0", "gone#1", "gone#2"]
    assert s.waiting == []


def test_cancel_during_the_run_evicts_at_the_next_boundary_only_that_request():
    s = StepScheduler(4)
    s.submit(tickets("stay", A) + tickets("gone", A, 2))
    s.plan()
    assert s.cancel("gone") == []  # running: nothing dropped yet
    plan = s.plan()
    assert ids(plan.evict) == ["gone#0", "gone#1"]
    assert ids(s.running) == ["stay#0"]
    assert s.plan().evict == []  # evicted once


def test_idle_only_when_nothing_waits_or_runs():
    s = StepScheduler(1)
    assert s.idle()
    s.submit(tickets("a", A))
    assert not s.idle()
    s.plan()
    s.finished(list(s.running))
    assert s.idle()


# -- the cost policy --------------------------------------------------------------------
class Curve:
    """Costs as the scheduler sees them: `step(size)` seconds a denoiser call, all trusted."""

    def __init__(self, step, prepare_s: float = 0.0, finish_s: float = 0.0, prepare=None):
        self.step = step
        self.finish = finish_s
        self.prepare = prepare or (lambda images: prepare_s * images)  # one call over `images`

    def step_s(self, key, size):
        return self.step(size)

    def step_error_s(self, key, size):
        return 0.0

    def prepare_s(self, key, images=1):
        return self.prepare(images)

    def finish_s(self, key, images=1):
        return self.finish * images

    def trusted(self, key, size):
        return True


LINEAR = Curve(lambda b: 1.0 * b)  # this CPU: four images cost four times one
FLAT = Curve(lambda b: 1.0 + 0.05 * b)  # a GPU with small work: sharing is nearly free


def cost_tickets(request_id: str, steps: int, n: int = 1, key=A, at: float = 0.0) -> list[Ticket]:
    return [Ticket(request_id, i, key, at, steps=steps) for i in range(n)]


def run_steps(s: StepScheduler, costs, now: float, until=None) -> tuple[float, list[list[str]], dict[str, float]]:
    """Drive the scheduler as the step loop does, in virtual time: plan, step, retire what
    finished. Returns the time, each step's batch and each request's finish time."""
    batches, finished = [], {}
    while not s.idle() and (until is None or not until(finished)):
        batch = s.plan(now, costs).batch
        now += costs.step_s(A, len(batch))
        s.stepped(batch)
        batches.append(ids(batch))
        done = [t for t in batch if t.done >= t.steps]
        s.finished(done)
        for t in done:
            if not any(x.request_id == t.request_id for x in s.running + s.waiting):
                finished[t.request_id] = now
    return now, batches, finished


def test_cost_runs_the_least_remaining_work_first_one_at_a_time_on_a_linear_curve():
    s = StepScheduler(4, "cost", max_wait_factor=100)
    s.submit(cost_tickets("long", 50) + cost_tickets("short", 10) + cost_tickets("mid", 25))
    _, batches, finished = run_steps(s, LINEAR, 0.0)
    assert sorted(finished, key=finished.get) == ["short", "mid", "long"]
    assert finished == {"short": 10.0, "mid": 35.0, "long": 85.0}  # one request at a time: no step shared
    assert {len(b) for b in batches} == {1}


def test_cost_preempts_a_running_request_for_a_shorter_one_and_resumes_it():
    s = StepScheduler(4, "cost", max_wait_factor=100)
    s.submit(cost_tickets("long", 30))
    now, _, _ = run_steps(s, LINEAR, 0.0, until=lambda _: s.running and s.running[0].done == 5)
    s.submit(cost_tickets("short", 3, at=now))
    plan = s.plan(now, LINEAR)
    assert ids(plan.admit) == ["short#0"] and ids(plan.batch) == ["short#0"]
    assert "long#0" in ids(s.running)  # paused with its state, not dropped
    s.stepped(plan.batch)
    _, batches, finished = run_steps(s, LINEAR, now + 1)
    assert batches == [["short#0"]] * 2 + [["long#0"]] * 25  # then it resumed where it stopped, none repeated
    assert finished["short"] < finished["long"]


def test_cost_keeps_a_requests_images_together():
    s = StepScheduler(4, "cost", max_wait_factor=100)
    s.submit(cost_tickets("three", 5, n=3) + cost_tickets("two", 6, n=2) + cost_tickets("one", 10))
    batch = s.plan(0.0, FLAT).batch
    # On a flat curve everyone would share, in order of remaining work (three, two, one), but
    # `two` does not fit beside `three` (3 + 2 > 4): it is not split; `one` fits.
    assert sorted(ids(batch)) == ["one#0", "three#0", "three#1", "three#2"]
    s2 = StepScheduler(4, "cost", max_wait_factor=100)
    s2.submit(cost_tickets("pair", 10, n=2) + cost_tickets("single", 15))
    assert ids(s2.plan(0.0, LINEAR).batch) == ["single#0"]  # 15 image-steps before 2 x 10, never half a pair


def test_cost_grows_the_batch_only_while_the_curve_says_sharing_pays():
    def first_batch(costs, waiting: int) -> int:
        s = StepScheduler(8, "cost", max_wait_factor=100)
        s.submit([t for i in range(waiting) for t in cost_tickets(f"r{i}", 20)])
        return len(s.plan(0.0, costs).batch)

    assert first_batch(LINEAR, 6) == 1  # sharing saves nothing: first come first served
    assert first_batch(FLAT, 6) == 6  # sharing is nearly free: everyone, up to the cap
    assert first_batch(FLAT, 12) == 8
    # A mildly sublinear curve (each extra image costs 0.8 of one): sharing pays only when
    # enough requests wait behind to gain from the time it saves.
    mild = Curve(lambda b: 1.0 + 0.8 * (b - 1))
    assert first_batch(mild, 2) == 1
    assert first_batch(mild, 8) > 1
    # A bumpy curve, as measured over HTTP here (2 images cost twice one, 4 little more than 2):
    # one more does not pay, the next ones together do.
    bumpy = Curve(lambda b: 1.0 if b == 1 else 2.0 + 0.1 * (b - 2))
    assert first_batch(bumpy, 2) == 1
    assert first_batch(bumpy, 4) == 4


def test_cost_shares_a_saving_within_the_noise_once_one_at_a_time_cannot_keep_up():
    """A saving smaller than the measurements' noise is refused while one request at a time
    keeps up with the arrivals (on a linear device it may be noise); once it cannot, refusing
    it would only lose capacity (over HTTP here the replica then fell ever further behind)."""
    class Noisy(Curve):
        def step_error_s(self, key, size):
            return 0.3 * self.step(size)

    noisy = Noisy(lambda b: 1.0 + 0.6 * (b - 1))  # sublinear, but the saving is within the noise

    def first_batch(gap_s: float) -> int:
        s = StepScheduler(4, "cost", max_wait_factor=100)
        s.submit([t for i in range(8) for t in cost_tickets(f"r{i}", 20, at=i * gap_s)])
        return len(s.plan(8 * gap_s, noisy).batch)

    assert first_batch(40.0) == 1  # a request alone takes 20 s, one arrives every 40: half loaded
    assert first_batch(10.0) == 4  # one every 10: one at a time would carry twice what it can


def test_cost_with_no_slack_is_first_come_first_served_that_still_shares_steps():
    """`max_wait_factor: 0`: every request is urgent on arrival. Newcomers that cost it a prepare
    still share its steps where the curve says sharing pays: refusing them would serve one image
    at a time on a sublinear device (in the simulator: 100-300x whole calls' mean at 90 %)."""
    flat = Curve(lambda b: 1.0 + 0.05 * b, prepare_s=0.1, finish_s=0.1)
    s = StepScheduler(4, "cost", max_wait_factor=0)
    s.submit([t for i in range(6) for t in cost_tickets(f"r{i}", 20 - i)])  # the oldest is the longest
    _, batches, finished = run_steps(s, flat, 0.0)
    assert batches[0] == ["r0#0", "r1#0", "r2#0", "r3#0"]  # oldest first, not shortest first
    assert max(len(b) for b in batches[1:]) == 4  # and the next ones join as soon as there is room
    assert len(finished) == 6 and len(batches) < 6 * 20 / 2  # sharing: far fewer calls than image-steps


def test_cost_probes_a_batch_size_it_has_not_measured_then_follows_the_measurement():
    from serve_app.replica.costmodel import CostModel

    costs = CostModel()
    for size in (1, 1, 1):
        costs.observe_step(A, size, 1.0)
    s = StepScheduler(4, "cost", max_wait_factor=100)
    s.submit(cost_tickets("a", 20) + cost_tickets("b", 20))
    assert len(s.plan(0.0, costs).batch) == 2  # size 2 never measured: try it
    for _ in range(3):
        costs.observe_step(A, 2, 2.0)  # measured linear
    assert len(s.plan(1.0, costs).batch) == 1
    # Sizes 3 and 4 are not measured, but reaching them takes two newcomers or more, judged
    # together: a probe is one newcomer, so nothing joins.
    s4 = StepScheduler(4, "cost", max_wait_factor=100)
    s4.submit([t for name in "wxyz" for t in cost_tickets(name, 20)])
    assert len(s4.plan(0.0, costs).batch) == 1


def test_no_request_waits_past_its_bound_under_an_adversarial_stream_of_short_ones():
    """One long request, and short ones arriving as fast as the device serves them (alone
    they would keep it busy forever): the long one must finish by first come first served's
    time + max_wait_factor x its own service time; without the bound it starves. The bound
    is kept in the seconds the device really took: with the cost model's estimates half or
    twice the truth (a replica's estimates lag a machine whose speed changes), the first come
    first served part of it is the real one, and only the slack is judged on the estimates."""

    def long_finish(max_wait_factor: float, horizon_s: float = 2000.0, told: float = 1.0) -> float | None:
        s = StepScheduler(4, "cost", max_wait_factor=max_wait_factor)
        s.submit(cost_tickets("warm", 10) + cost_tickets("long", 50))
        now, arrivals, finished = 0.0, iter(range(10**6)), {}
        next_short, estimates = 0.0, Curve(lambda b: told * b)
        while now < horizon_s and "long" not in finished:
            while next_short <= now:
                s.submit(cost_tickets(f"s{next(arrivals)}", 10, at=next_short))
                next_short += 10.0  # one 10-step request every 10 s: load 1.0 from shorts alone
            batch = s.plan(now, estimates).batch
            now += len(batch)
            s.stepped(batch)
            done = [t for t in batch if t.done >= t.steps]
            s.finished(done)
            finished.update({t.request_id: now for t in done})
        return finished.get("long")

    # First come first served finishes it at 10 (warm) + 10 (the short at 0) + 50 = 70 s at
    # the latest; the bound adds factor x 50 s (x what the estimates say a step costs).
    for factor in (0.5, 1.0, 2.0):
        for told in (0.5, 1.0, 2.0):
            finish = long_finish(factor, told=told)
            assert finish is not None and finish <= 70 + factor * 50 * told + 1, (factor, told, finish)
    assert long_finish(1e9) is None  # pure shortest-first: starved for the whole horizon


def test_a_long_request_keeps_its_bound_while_short_ones_share_its_steps():
    """A sublinear curve (sharing pays, as on tiny-sd3 here), a closed loop of 8 clients of
    short requests, and the loop preparing and decoding images between steps (as the step
    loop does): the long request shares steps with short ones, and still finishes within first
    come first served one at a time (the 8 shorts in the replica, then itself) plus
    max_wait_factor x its own service time. Before the policy counted the newcomers' prepares
    and decodes against the urgent request, shorts kept joining its batch and it finished 33
    to 51 s past that bound at factors 0.5 to 2 (first come first served *with* sharing,
    `fixed`, finishes it 267 s after it arrived: past it too)."""
    sub = Curve(lambda b: 1.0 + 0.63 * (b - 1), prepare_s=2.0, finish_s=2.0)
    short_s, long_s = 10 + 4.0, 50 + 4.0  # alone: steps, then prepare and decode

    def run(factor: float) -> tuple[float, bool]:
        s = StepScheduler(4, "cost", max_wait_factor=factor)
        now, sent, finished, arrived, shared = 0.0, 0, {}, None, False
        for _ in range(8):
            s.submit(cost_tickets(f"s{sent}", 10, at=now))
            sent += 1
        while "long" not in finished and now < 5000:
            if arrived is None and now >= 30:
                s.submit(cost_tickets("long", 50, at=now))
                arrived = now
            plan = s.plan(now, sub)
            shared |= "long#0" in ids(plan.batch) and len(plan.batch) > 1
            now += sub.prepare(len(plan.admit)) + sub.step(len(plan.batch))
            s.stepped(plan.batch)
            done = [t for t in plan.batch if t.done >= t.steps]
            now += sub.finish * len(done)
            s.finished(done)
            for t in done:
                finished[t.request_id] = now
                s.submit(cost_tickets(f"s{sent}", 10, at=now))  # that client sends its next one
                sent += 1
        return finished["long"] - arrived, shared

    for factor in (0.5, 1.0, 2.0):
        took, shared = run(factor)
        assert shared, factor  # it did share steps: the bound held with sharing, not by refusing it
        assert took <= 8 * short_s + (1 + factor) * long_s, (factor, took)


def test_an_urgent_request_is_charged_what_newcomers_add_to_one_prepare_call():
    """Newcomers admitted at one boundary are prepared in one call: what each one delays an
    urgent request is what it adds to that call, from the measured cost by number of images.
    Where preparing three costs what one does (a launch-bound text encoder on a GPU), all
    three share the urgent request's steps within its reserve; where it is linear, one."""

    def batch_beside_urgent(prepare) -> list[str]:
        s = StepScheduler(5, "cost", max_wait_factor=1.0)
        s.submit(cost_tickets("long", 10))  # alone 10 s: its slack 10 s, urgent at 5 s left
        s.stepped(s.plan(0.0, LINEAR).batch)
        s.submit(cost_tickets("short", 8, at=1.0))
        for now in range(1, 6):  # the short overtakes it on the linear curve: 5 s of its slack
            batch = s.plan(float(now), LINEAR).batch
            assert ids(batch) == ["short#0"]
            s.stepped(batch)
        s.submit(cost_tickets("a", 20, at=6.0) + cost_tickets("b", 20, at=6.0) + cost_tickets("c", 20, at=6.0))
        return ids(s.plan(6.0, Curve(lambda b: 1.0 + 0.05 * b, prepare=prepare)).batch)

    assert batch_beside_urgent(lambda images: 3.0 * images) == ["long#0", "short#0", "a#0"]
    assert batch_beside_urgent(lambda images: 3.0 if images else 0.0) == ["long#0", "short#0", "a#0", "b#0", "c#0"]


def test_cost_cancellation_evicts_running_and_paused_images():
    s = StepScheduler(4, "cost", max_wait_factor=100)
    s.submit(cost_tickets("gone", 40, n=2))
    s.stepped(s.plan(0.0, LINEAR).batch)
    s.submit(cost_tickets("short", 5, at=1.0))
    s.stepped(s.plan(1.0, LINEAR).batch)  # "gone" now sits out (prepared, paused)
    assert s.cancel("gone") == []
    plan = s.plan(2.0, LINEAR)
    assert sorted(ids(plan.evict)) == ["gone#0", "gone#1"] and ids(plan.batch) == ["short#0"]
    assert ids(s.running) == ["short#0"]


def test_cost_serves_another_key_within_its_bound():
    s = StepScheduler(4, "cost", max_wait_factor=1.0)
    s.submit(cost_tickets("b", 20, key=B))  # one 20-step request of another size
    now, finished = 0.0, {}
    for i in range(40):  # a stream of short A requests, one every step: they alone would fill the device
        s.submit(cost_tickets(f"a{i}", 3, at=now))
        batch = s.plan(now, LINEAR).batch
        assert len({t.key for t in batch}) == 1  # keys never mix in one call
        now += len(batch)
        s.stepped(batch)
        done = [t for t in batch if t.done >= t.steps]
        s.finished(done)
        finished.update({t.request_id: now for t in done})
    assert finished.get("b", math.inf) <= 20 + 20 + 1  # first come first served's 20 s + 1 x 20 s of slack
