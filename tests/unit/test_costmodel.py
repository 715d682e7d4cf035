"""The replica's cost model: step seconds by (batch key, batch size) from the loop's own timings."""

import pytest

from serve_app.replica import costmodel
from serve_app.replica.costmodel import CostModel, describe_key

KEY = (256, 256, False)


def measured(*samples: tuple[int, float]) -> CostModel:
    costs = CostModel()
    for size, seconds in samples:
        costs.observe_step(KEY, size, seconds)
    return costs


def test_the_first_sample_of_a_size_is_dropped_then_the_median_of_recent_ones():
    costs = measured((1, 9.0))  # the first call at a shape pays for warm-up
    assert costs.measured_s(KEY, 1) is None
    costs.observe_step(KEY, 1, 1.0)
    assert costs.step_s(KEY, 1) == costs.measured_s(KEY, 1) == 1.0
    costs.observe_step(KEY, 1, 2.0)
    assert costs.step_s(KEY, 1) == pytest.approx(1.5)
    for seconds in (1.0, 1.1, 0.9, 8.0, 9.0):  # another process took the core twice
        costs.observe_step(KEY, 1, seconds)
    assert costs.step_s(KEY, 1) == pytest.approx(1.1)  # a moving average would read over 3
    for _ in range(costmodel.WINDOW):
        costs.observe_step(KEY, 1, 3.0)  # the machine slowed down: the old samples leave
    assert costs.step_s(KEY, 1) == pytest.approx(3.0)


def test_unmeasured_sizes_are_linear_from_the_nearest_measured_one_and_interpolated_between():
    costs = measured((1, 0), (1, 1.0))
    assert costs.step_s(KEY, 4) == pytest.approx(4.0)  # batching assumed to save nothing until seen
    costs.observe_step(KEY, 4, 0)
    costs.observe_step(KEY, 4, 2.0)  # then seen: 4 images cost twice one
    assert costs.step_s(KEY, 4) == pytest.approx(2.0)
    assert costs.step_s(KEY, 2) == pytest.approx(1 + (2 - 1) * 1 / 3)  # between 1 and 4
    assert costs.step_s(KEY, 8) == pytest.approx(4.0)  # linear beyond the largest


def test_no_size_is_estimated_dearer_than_a_bigger_one_measured():
    # Size 2 caught in a bad moment (measured on the step loop: 37 ms where 4 images took 15):
    # left as measured, the policy would never run 2 again, nor grow past it.
    costs = measured((1, 0), (1, 0.004), (2, 0), (2, 0.037), (3, 0), (3, 0.027), (4, 0), (4, 0.015))
    assert [costs.step_s(KEY, n) for n in (1, 2, 3, 4)] == pytest.approx([0.004, 0.015, 0.015, 0.015])
    assert costs.measured_s(KEY, 2) == pytest.approx(0.037)  # what was measured stays visible
    costs.observe_step(KEY, 2, 0.008)
    costs.observe_step(KEY, 2, 0.008)  # measured again, better: the estimate follows
    assert costs.step_s(KEY, 2) == pytest.approx(0.008)


def test_a_key_never_measured_borrows_the_per_image_cost_of_the_measured_ones():
    costs = measured((2, 0), (2, 3.0))
    assert costs.step_s(("other",), 3) == pytest.approx(4.5)
    assert CostModel().step_s(KEY, 2) == 2 * costmodel.DEFAULT_STEP_S


def test_a_size_is_trusted_after_enough_samples_and_until_it_is_stale():
    costs = measured((2, 0), (2, 1.0))
    assert not costs.trusted(KEY, 2)  # one kept sample
    costs.observe_step(KEY, 2, 1.0)
    assert costs.trusted(KEY, 2) and not costs.trusted(KEY, 4)
    for _ in range(costmodel.STALE_AFTER + 1):
        costs.observe_step(KEY, 1, 0.5)  # only batch 1 for a long while
    assert not costs.trusted(KEY, 2)  # re-measure: the machine's speed may have changed
    costs.observe_step(KEY, 2, 3.0)
    assert costs.measured_s(KEY, 2) == 3.0  # the stale samples are forgotten
    assert not costs.trusted(KEY, 2)
    costs.observe_step(KEY, 2, 3.0)
    assert costs.trusted(KEY, 2)


def test_the_error_of_an_estimate_follows_the_spread_of_its_samples():
    steady = measured(*[(1, 1.0)] * 30)
    noisy = measured(*[(1, 1.0 + (0.2 if i % 2 else -0.2)) for i in range(30)])
    assert steady.step_error_s(KEY, 1) == 0.0
    assert 0.02 < noisy.step_error_s(KEY, 1) < 0.2
    assert steady.step_error_s(KEY, 4) == pytest.approx(0.1 * 4.0)  # not measured: a tenth of the guess


def test_prepare_and_finish_are_learned_per_call_by_number_of_images():
    costs = CostModel()
    for seconds in (5.0, 0.3, 0.3):  # the key's first call is warm-up
        costs.observe_prepare(KEY, 3, seconds)
        costs.observe_finish(KEY, 2, seconds)
    assert costs.prepare_s(KEY, 3) == pytest.approx(0.3)
    assert costs.prepare_s(KEY) == pytest.approx(0.1)  # one image: linear from the one size measured
    assert costs.finish_s(KEY) == pytest.approx(0.15)
    assert CostModel().prepare_s(KEY) == 0.0 and CostModel().finish_s(KEY, 4) == 0.0
    costs.observe_prepare(KEY, 1, 0.2)  # a new number of images: its first call counts
    assert [costs.prepare_s(KEY, n) for n in (1, 2, 3, 6)] == pytest.approx([0.2, 0.25, 0.3, 0.6])
    costs.observe_finish(KEY, 1, 0.5)  # dearer than two measured: capped there (`monotone`)
    assert costs.finish_s(KEY, 1) == pytest.approx(0.3)
    row = costs.snapshot()[0]
    assert row["prepare_calls_s"] == {1: 0.2, 3: 0.3} and row["prepare_s"] == 0.2


def test_keys_are_bounded_least_recently_seen_forgotten():
    costs = CostModel(max_keys=2)
    for key in ("a", "b", "a", "c"):
        costs.observe_step(key, 1, 0)
        costs.observe_step(key, 1, 1.0)
    assert [row["key"] for row in costs.snapshot()] == ["a", "c"]


def test_snapshot_for_the_replica_stats():
    costs = measured((1, 0), (1, 0.01), (1, 0.01), (4, 0), (4, 0.03))
    costs.observe_finish(KEY, 1, 0.02)
    costs.observe_finish(KEY, 1, 0.02)
    assert costs.snapshot() == [{"key": "256x256", "step_s": {1: 0.01, 4: 0.03}, "samples": {1: 2, 4: 1},
                                 "prepare_s": 0.0, "finish_s": 0.02,
                                 "prepare_calls_s": {}, "finish_calls_s": {1: 0.02}}]
    assert describe_key((512, 512, True)) == "512x512+cfg"
    assert describe_key((256, 256, 28, 3.5)) == "256/256/28/3.5"
