"""The virtual-time simulator (benchmarks/simulate.py) against queueing theory, and its
determinism. It drives the real StepScheduler and CostModel, so these check them too."""

import itertools
import statistics

import pytest

from benchmarks import simulate
from benchmarks.simulate import Curve, Request, poisson

CONSTANT = Curve("constant", ((1, 0.1),), steps={"standard": 10}, cap=1)  # service D = 10 x 0.1 = 1 s


def lindley_waits(trace: list[Request], service_s: float) -> list[float]:
    """First come first served on one server, request by request: W' = max(0, W + D - gap)."""
    waits, wait = [0.0], 0.0
    for before, after in itertools.pairwise(trace):
        wait = max(0.0, wait + service_s - (after.at_s - before.at_s))
        waits.append(wait)
    return waits


@pytest.mark.parametrize("policy", simulate.POLICIES)
def test_one_preset_at_batch_1_is_first_come_first_served_request_by_request(policy):
    trace = poisson(0.8, 1500, {"standard": 1.0}, seed=5)
    result = simulate.simulate(trace, CONSTANT, policy, max_ongoing=10**9)
    assert result.waits_s == pytest.approx(lindley_waits(trace, 1.0), abs=1e-9)


def test_its_mean_wait_is_the_pollaczek_khinchine_one_of_an_m_d_1_queue():
    rho = 0.3  # Poisson arrivals at 0.3/s, deterministic 1 s service
    waits = [w for seed in range(1, 5) for w in simulate.simulate(
        poisson(rho, 50_000, {"standard": 1.0}, seed), CONSTANT, "call", max_ongoing=10**9).waits_s]
    expected = rho * 1.0 / (2 * (1 - rho))  # W = rho D / (2 (1 - rho)) for M/D/1
    print(f"mean wait {statistics.fmean(waits):.4f} s, Pollaczek-Khinchine {expected:.4f} s")
    assert statistics.fmean(waits) == pytest.approx(expected, rel=0.03)


def test_the_same_seed_gives_the_same_numbers():
    curve = simulate.load_curves()["tiny-flux-cpu"]
    mix = {"standard": 0.5, "hd": 0.3, "low": 0.2}

    def run(seed: int) -> dict:  # noisy timings too: the cost model learns from seeded jitter
        return simulate.simulate(poisson(2.5, 300, mix, seed), curve, "cost", seed=seed, noise=0.05).summary()

    assert run(3) == run(3)
    assert run(3)["mean_s"] != run(4)["mean_s"]


def test_capacity_is_whole_calls_in_a_closed_loop():
    curve = Curve("linear", ((1, 0.1), (4, 0.4)), steps={"standard": 10}, cap=4)
    # Linear: batching saves nothing, so whole calls serve one 1-second request a second.
    assert simulate.capacity_rps(curve, {"standard": 1.0}) == pytest.approx(1.0, rel=1e-6)
    flat = Curve("flat", ((1, 0.1), (4, 0.1)), steps={"standard": 10}, cap=4)
    assert simulate.capacity_rps(flat, {"standard": 1.0}) == pytest.approx(4.0, rel=1e-6)  # 4 per call


@pytest.mark.parametrize("policy", ["fixed", "call"])
def test_images_prepared_and_decoded_together_cost_one_call_of_their_measured_size(policy, tmp_path):
    """Four requests at once, admitted together: per image (a float) the prepare and the decode
    cost 4 x one; by number of images (curves.yaml's dict, as full_size.py --curves measures
    it) one call of 4 costs what it measured."""
    text = "curves:\n  c:\n    kind: measured\n    source: test\n    step_s: {1: 0.1, 4: 0.1}\n" \
           "    prepare_s: {1: 0.5, 4: 0.8}\n    finish_s: {1: 0.3, 8: 0.6}\n    steps: {standard: 10}\n"
    (tmp_path / "curves.yaml").write_text(text)
    by_size = simulate.load_curves(tmp_path / "curves.yaml")["c"]
    per_image = Curve("c", by_size.points, prepare_s=0.5, finish_s=0.3, steps={"standard": 10})
    trace = [Request(0.0, "standard")] * 4
    took = {c.prepare_s == 0.5: simulate.simulate(trace, c, policy).makespan_s for c in (by_size, per_image)}
    assert took[True] == pytest.approx(4 * 0.5 + 10 * 0.1 + 4 * 0.3)
    finish = lambda n: 0.3 + 0.3 * (n - 1) / 7  # noqa: E731 -- between the sizes measured
    assert took[False] == pytest.approx(0.8 + 10 * 0.1 + finish(4))
    # 6 images with a cap of 4: a call of 4, then one of 2
    assert by_size.service_s(10, n=6, cap=4) == pytest.approx(2 * 1.0 + 0.8 + finish(4) + 0.5 + 0.1 + finish(2))


def test_the_command_line_prints_the_numbers_asked_for(capsys):
    given = ["--cost", "1:0.0365,2:0.073,4:0.146", "--steps", "standard=25,hd=50,low=10",
             "--mix", "standard=0.5,hd=0.3,low=0.2", "--load", "0.7", "--policy", "fixed", "--json"]
    simulate.main([*given, "--prepare-s", "0.01", "--finish-s", "0.012", "--requests", "300"])
    import json

    out = json.loads(capsys.readouterr().out)
    assert {"p50_s", "p99_s", "mean_s", "images_per_s", "mean_batch", "longest_wait_s"} <= set(out)
    assert out["load"] == pytest.approx(0.7) and out["policy"] == "fixed" and out["requests"] == 300
    # prepares and decodes by number of images: cheaper calls, more capacity at the same load
    simulate.main([*given, "--prepare-s", "1:0.01,4:0.01", "--finish-s", "1:0.012,4:0.012", "--requests", "50"])
    assert json.loads(capsys.readouterr().out)["capacity_rps"] > out["capacity_rps"]
