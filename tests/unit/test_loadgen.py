"""The benchmark's own arithmetic: percentiles, throughput and the ratios it reports."""

from benchmarks.loadgen import Run, ratios


def test_summary_percentiles_and_throughput():
    run = Run("batching", "tiny-sd", "concurrency 8", wall_s=10.0, latencies_s=[float(i) for i in range(1, 101)],
              statuses={"200": 100, "429": 3}, batch_sizes=[1, 3, 4, 4])
    s = run.summary()
    assert (s["p50_s"], s["p95_s"], s["p99_s"]) == (51.0, 96.0, 100.0)
    assert s["images_per_s"] == 10.0 and s["requests"] == 103 and s["mean_batch_size"] == 3.0


def test_ratios_against_the_in_run_baseline():
    baseline = {1: {"call_s": 0.8, "images_per_s": 1.25}, 4: {"call_s": 2.0, "images_per_s": 2.0}}
    summaries = [
        {"scenario": "overhead", "load": "concurrency 1", "p50_s": 0.85, "images_per_s": 1.1},
        {"scenario": "batching", "load": "concurrency 8", "p50_s": 3.0, "images_per_s": 1.9},
        {"scenario": "no-batching", "load": "concurrency 8", "p50_s": 6.0, "images_per_s": 1.0},
    ]
    out = ratios(summaries, baseline)
    assert round(out["overhead_ms_at_c1"]) == 50
    assert out["batched_c8_vs_direct_batch4"] == 0.95
    assert out["batched_vs_unbatched_service_c8"] == 1.9
