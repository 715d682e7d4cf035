"""The step scheduler: pure policy, no torch, no Ray."""

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
    s = StepScheduler(4, join_running=False)
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
