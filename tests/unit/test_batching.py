from serve_app.batching import Slot, split_job, take_call
from serve_app.job import GenerationJob


def make(n, width=256, steps=10, seed=0, rid="r"):
    return GenerationJob(rid, "p", None, width, 256, steps, 7.5, tuple(range(seed, seed + n)),
                         "png", 100, "url", "http://h/")


def slots(*jobs):
    return [Slot(job, i, handle=(j, i)) for j, job in enumerate(jobs) for i in range(job.n)]


def test_same_shape_slots_share_a_call_cut_to_batch_size():
    pending = slots(make(3), make(2))
    first = take_call(pending, 4)
    assert [s.handle for s in first] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert [s.handle for s in take_call(pending, 4)] == [(1, 1)]
    assert pending == [] and take_call(pending, 4) == []


def test_sizes_and_steps_never_share_a_call_and_the_oldest_goes_first():
    pending = slots(make(1, width=512), make(1, width=256), make(1, width=512, steps=20), make(2, width=512))
    calls = []
    while pending:
        calls.append([s.handle for s in take_call(pending, 8)])
    assert calls == [[(0, 0), (3, 0), (3, 1)], [(1, 0)], [(2, 0)]]


def test_split_job_keeps_seed_order_and_fits_the_batch():
    job = make(10, seed=70)
    parts = split_job(job, 4)
    assert [p.seeds for p in parts] == [(70, 71, 72, 73), (74, 75, 76, 77), (78, 79)]
    assert all(p.request_id == job.request_id and p.width == job.width for p in parts)
    assert split_job(job, 10) == [job]
