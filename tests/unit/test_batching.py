from serve_app.batching import ShapeKey, plan_calls, scatter, split_job
from serve_app.job import GenerationJob


def make(n, width=256, steps=10, seed=0, rid="r"):
    return GenerationJob(rid, "p", None, width, 256, steps, 7.5, tuple(range(seed, seed + n)),
                         "png", 100, "url", "http://h/")


def test_same_shape_requests_share_calls_cut_to_batch_size():
    jobs = [make(3, rid="a"), make(2, rid="b")]
    calls = plan_calls(jobs, max_batch_size=4)
    assert [len(c.slots) for c in calls] == [4, 1]
    assert [(s.job, s.image) for c in calls for s in c.slots] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]


def test_sizes_and_steps_never_share_a_call():
    jobs = [make(1, width=256), make(1, width=512), make(1, width=256, steps=20), make(1, width=256)]
    calls = plan_calls(jobs, max_batch_size=8)
    keys = [c.key for c in calls]
    assert len(calls) == 3 and len(set(keys)) == 3
    for call in calls:
        assert all(ShapeKey.of(jobs[s.job]) == call.key for s in call.slots)


def test_scatter_puts_results_back_in_request_order():
    jobs = [make(2, width=512), make(3, width=256), make(1, width=512)]
    calls = plan_calls(jobs, max_batch_size=2)
    outputs = [[(jobs[s.job].width, s.job, s.image) for s in call.slots] for call in calls]
    per_job = scatter(jobs, calls, outputs)
    assert [[r[1:] for r in rs] for rs in per_job] == [[(0, 0), (0, 1)], [(1, 0), (1, 1), (1, 2)], [(2, 0)]]


def test_split_job_keeps_seed_order_and_fits_the_batch():
    job = make(10, seed=70)
    parts = split_job(job, 4)
    assert [p.seeds for p in parts] == [(70, 71, 72, 73), (74, 75, 76, 77), (78, 79)]
    assert all(p.request_id == job.request_id and p.width == job.width for p in parts)
    assert split_job(job, 10) == [job]
