"""The step engine's policies against whole calls, measured in one run on one machine, and the
simulator checked against it.

    .venv/bin/python benchmarks/step_engine.py [--models tiny-flux tiny-sd3] [--duration-s 45] [--quick]

Runtime: about 25 minutes with the defaults on the 2-core development VM (`--quick`: the load
scenarios only, about 15). Starts its own `serve run` with each model three times: `<id>`
(`batching.policy: cost`, the default), `<id>-fixed` (`fixed`: join up to the cap) and
`<id>-call` (`call`: whole pipeline calls), everything else equal, then, per model, at 256²:
- capacity of the whole-call arm (closed loop, concurrency 8), mixed presets and standard only:
  "load" below is a fraction of it, the same definition as benchmarks/simulate.py's;
- mixed presets (standard/hd/low = 50/30/20 %), Poisson at 70 % of that capacity, every arm
  with the same arrivals and presets (seeded), arms interleaved per scenario (rotated: each first in turn);
- standard only, Poisson at 50 % and 90 % of capacity, every arm;
- the simulator on the same arrivals, with the cost curve the replicas measured in place
  (their cost-model gauges, read from Ray's Prometheus endpoints) and the HTTP path's own
  latency at concurrency 1: simulated against measured p50 and mean, per arm;
then (not with --quick) on tiny-sd the abandon test (8 clients drop n=4 hd requests after 1 s;
then one request, against the idle latency) on both arms; streaming on tiny-sd and tiny-flux
(plain vs streamed, time to the first of 3 partial images, what the previews cost); the serving
overhead of a near-empty generation (1 step, jpeg, b64_json, concurrency 1) against the same
pipeline call in-process; and, in process, the step loop's own time between denoiser calls.
Prints a table, writes benchmarks/results/step_engine-<time>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import replica_costs, serving, simulate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MIX = [("standard", 0.5), ("hd", 0.3), ("low", 0.2)]
ARMS = {"cost": "", "fixed": "-fixed", "call": "-call"}  # arm -> model id suffix
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def summary(latencies: list[float], images: int, wall_s: float, statuses: dict) -> dict:
    return {"n": len(latencies), "statuses": statuses, "p50_s": pct(latencies, 0.5), "p99_s": pct(latencies, 0.99),
            "mean_s": statistics.mean(latencies) if latencies else float("nan"),
            "images_per_s": images / wall_s if wall_s else 0.0}


class Bench:
    def __init__(self, base_url: str):
        self.http = httpx.AsyncClient(base_url=base_url, timeout=600)

    async def generate(self, model: str, quality: str = "standard", timeout: float | None = None, **extra) -> tuple:
        body = {"model": model, "prompt": "a lighthouse at dusk", "size": "256x256", "quality": quality,
                "response_format": "b64_json", "output_format": "jpeg", **extra}
        started = time.perf_counter()
        response = await self.http.post("/v1/images/generations", json=body, timeout=timeout or 600)
        return response.status_code, time.perf_counter() - started

    async def closed(self, model: str, qualities: list[str], concurrency: int = 8) -> float:
        """Requests per second over a closed loop: the arm's capacity for this mix."""
        queue = list(qualities)
        started = time.perf_counter()

        async def worker():
            while queue:
                await self.generate(model, queue.pop())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(qualities) / (time.perf_counter() - started)

    async def poisson(self, model: str, arrivals: list[tuple[float, str]]) -> dict:
        latencies, statuses = [], {}
        started = time.perf_counter()

        async def one(at: float, quality: str):
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - started)))
            status, seconds = await self.generate(model, quality)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(seconds)

        await asyncio.gather(*(one(at, q) for at, q in arrivals))
        return summary(latencies, len(latencies), time.perf_counter() - started, statuses)

    async def abandon(self, model: str) -> dict:
        idle = statistics.median([(await self.generate(model))[1] for _ in range(3)])

        async def drop():
            with contextlib.suppress(httpx.TimeoutException):
                await self.generate(model, "hd", timeout=1.0, n=4)

        await asyncio.gather(*(drop() for _ in range(8)))
        status, after = await self.generate(model)
        return {"idle_s": idle, "after_s": after, "ratio": after / idle, "status": status}


    async def stream(self, model: str, partial_images: int) -> tuple[float | None, float]:
        """(seconds to the first partial image or None, seconds to the completed event)."""
        body = {"model": model, "prompt": "a lighthouse at dusk", "size": "256x256", "stream": True,
                "partial_images": partial_images, "output_format": "jpeg"}
        started, first = time.perf_counter(), None
        async with self.http.stream("POST", "/v1/images/generations", json=body) as response:
            async for line in response.aiter_lines():
                if line == "event: image_generation.partial_image" and first is None:
                    first = time.perf_counter() - started
                if line == "event: image_generation.completed":
                    return first, time.perf_counter() - started
        raise RuntimeError(f"{model}: the stream ended without a completed event")

    async def streaming(self, model: str, repeats: int = 8) -> dict:
        """Concurrency 1: plain vs streamed with no previews vs with 3 previews."""
        plain = [(await self.generate(model))[1] for _ in range(repeats)]
        bare = [(await self.stream(model, 0))[1] for _ in range(repeats)]
        three = [await self.stream(model, 3) for _ in range(repeats)]
        p50 = statistics.median
        return {"plain_p50_s": p50(plain), "stream0_p50_s": p50(bare),
                "stream3_first_partial_p50_s": p50([f for f, _ in three]), "stream3_p50_s": p50([c for _, c in three]),
                "preview_cost_fraction": (p50([c for _, c in three]) - p50(bare)) / p50(bare)}


def arrivals(rate_per_s: float, duration_s: float, mix: list[tuple[str, float]], seed: int) -> list[tuple[float, str]]:
    rng, at, out = random.Random(seed), 0.0, []
    while (at := at + rng.expovariate(rate_per_s)) < duration_s:
        out.append((at, rng.choices([q for q, _ in mix], [w for _, w in mix])[0]))
    return out


def mixed(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [rng.choices([q for q, _ in MIX], [w for _, w in MIX])[0] for _ in range(count)]


def in_process(models_dir: Path) -> dict:
    """The same 1-step pipeline call without HTTP; the loop's own time between denoiser calls."""
    import torch

    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine, PipelineInputs
    from serve_app.engine.runners import ImageSpec, make_runner
    from serve_app.replica.scheduler import StepScheduler, Ticket
    from serve_app.replica.steploop import StepLoop, Work

    engine = DiffusersEngine(load_model_config(models_dir / "tiny-sd.yaml"))
    inputs = PipelineInputs(256, 256, 1, 7.5, ["a lighthouse at dusk"], [None], [0])
    engine.generate(inputs)
    times = []
    for _ in range(20):
        started = time.perf_counter()
        engine.generate(inputs)
        times.append(time.perf_counter() - started)

    flux = DiffusersEngine(load_model_config(models_dir / "tiny-flux.yaml"))
    runner, denoiser_s = make_runner(flux), []
    forward = flux.pipeline.transformer.forward

    def timed_forward(*args, **kwargs):
        started = time.perf_counter()
        out = forward(*args, **kwargs)
        denoiser_s.append(time.perf_counter() - started)
        return out

    flux.pipeline.transformer.forward = timed_forward

    class Quiet:
        def __getattr__(self, name):
            return lambda *a, **k: None

    loop = StepLoop(runner, StepScheduler(4), Quiet(), lambda exc: exc)
    done = []
    with torch.inference_mode():
        specs = [ImageSpec("a fox", None, 256, 256, 50, 3.5, s) for s in range(4)]
        loop.submit([Work(Ticket("r", i, runner.batch_key(s)), s, lambda o, b: done.append(o))
                     for i, s in enumerate(specs)])
        while len(done) < 4:
            time.sleep(0.01)
    loop.stop()
    stats = loop.stats
    step_ms = 1000 * stats.step_s / stats.steps
    denoise_ms = 1000 * statistics.mean(denoiser_s)
    gap_ms = 1000 * stats.gap_s / max(1, stats.gaps)
    return {"pipeline_1_step_p50_s": statistics.median(times), "step_ms": step_ms, "denoiser_ms": denoise_ms,
            "host_in_step_ms": step_ms - denoise_ms, "loop_gap_ms": gap_ms,
            "overhead_fraction": (step_ms - denoise_ms + gap_ms) / step_ms}


def preview_cost(repeats: int = 10) -> dict:
    """Per tiny family, in process at 256², one image: a denoising step against a preview
    (decoding the step's x0 estimate with the model's VAE, as a streamed partial image)."""
    import torch

    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine
    from serve_app.engine.runners import ImageSpec, make_runner

    out = {}
    for model_id in ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"):
        runner = make_runner(DiffusersEngine(load_model_config(ROOT / "models" / f"{model_id}.yaml")))
        with torch.inference_mode():
            state = runner.prepare([ImageSpec("a fox", None, 256, 256, 4 * repeats, 5.0, 0)])[0]
            runner.step([state])  # warm-up, and an x0 to decode
            runner.preview(state)
            steps, previews = [], []
            for _ in range(repeats):
                started = time.perf_counter()
                runner.step([state])
                steps.append(time.perf_counter() - started)
                started = time.perf_counter()
                runner.preview(state)
                previews.append(time.perf_counter() - started)
        step_s, preview_s = statistics.median(steps), statistics.median(previews)
        out[model_id] = {"step_ms": 1000 * step_s, "preview_ms": 1000 * preview_s,
                         "preview_per_step": preview_s / step_s}
    return out


def variants(models: list[str]) -> list[dict]:
    """Each model three times (tiny-sd, for the abandon test only: cost and call)."""
    out = []
    for model_id in dict.fromkeys(["tiny-sd", *models]):
        for arm, suffix in ARMS.items():
            if model_id in models or arm != "fixed":
                out.append(serving.variant(model_id, model_id + suffix, policy=arm))
    return out


async def measure(base: str, models: list[str], duration_s: float, quick: bool, ray_tmp: Path) -> dict:
    bench, results = Bench(base), {"replica_costs": {}}
    for model in models:
        call = f"{model}-call"
        capacity_mixed = await bench.closed(call, mixed(24))
        capacity_standard = await bench.closed(call, ["standard"] * 24)
        # The HTTP path around the replica at concurrency 1 (the simulator adds it to each request).
        alone = {q: statistics.median([(await bench.generate(f"{model}-fixed", q))[1] for _ in range(5)])
                 for q, _ in MIX}
        runs = {"capacity_rps": {"mixed": capacity_mixed, "standard": capacity_standard}, "alone_s": alone}
        plan = [("mixed 70%", 0.7 * capacity_mixed, MIX, duration_s),
                ("standard 50%", 0.5 * capacity_standard, [("standard", 1.0)], duration_s * 2 / 3),
                ("standard 90%", 0.9 * capacity_standard, [("standard", 1.0)], duration_s * 2 / 3)]
        for turn, (name, rate, mix, duration) in enumerate(plan):
            schedule = arrivals(rate, duration, mix, seed=7)
            runs[name] = {"rate_per_s": rate, "arrivals": schedule, "order": first_in_turn(turn)}
            # Interleaved, so the machine's drift hits every arm alike, and each arm first in turn:
            # in one probe pair the arm that went first measured slower (benchmarks/README.md).
            for arm in runs[name]["order"]:
                runs[name][arm] = await bench.poisson(model + ARMS[arm], schedule)
            print(model, name, json.dumps({k: v for k, v in runs[name].items() if k != "arrivals"}), flush=True)
        results[model] = runs
        # Right after its runs: Ray exports a gauge only while its replica keeps setting it.
        results["replica_costs"].update(await asyncio.to_thread(replica_costs.scrape, ray_tmp, [f"{model}-fixed"], 30))
    if quick:
        return results
    results["abandon"] = {arm: await bench.abandon(arm) for arm in ("tiny-sd", "tiny-sd-call")}
    results["streaming"] = {model: await bench.streaming(model) for model in ("tiny-sd", "tiny-flux")}
    overhead = [(await bench.generate("tiny-sd", num_inference_steps=1))[1] for _ in range(21)][1:]
    results["http_1_step_p50_s"] = statistics.median(overhead)
    return results


def first_in_turn(turn: int) -> list[str]:
    """The arms in the order they run in the `turn`-th scenario: rotated, each first in turn."""
    arms = list(ARMS)
    return arms[turn % len(arms):] + arms[: turn % len(arms)]


def in_situ_curve(model: str, costs: dict) -> simulate.Curve | None:
    """The step curve the model's `fixed` replica measured while serving (it runs every batch
    size up to the cap), with its presets."""
    keys = costs.get(f"{model}-fixed") or {}
    entry = keys.get("256x256") or next(iter(keys.values()), None)
    if not entry or not entry["step_s"]:
        return None
    config = yaml.safe_load((ROOT / "models" / f"{model}.yaml").read_text())
    steps = {q: p["num_inference_steps"] for q, p in config["quality"].items()}
    return simulate.Curve(f"{model} in situ", tuple(sorted(entry["step_s"].items())), entry.get("prepare_s", 0.0),
                          entry.get("finish_s", 0.0), steps, config["batching"]["max_batch_size"], "measured",
                          "the fixed replica's cost-model gauges during this run")


def simulated(results: dict, models: list[str], costs: dict) -> dict:
    """Each scenario again in the simulator: the same arrivals, the in-situ curve, and the
    HTTP path's latency outside the replica (measured alone at concurrency 1, minus the
    simulated service) added to every request."""
    out = {}
    for model in models:
        curve = in_situ_curve(model, costs)
        if curve is None:
            continue
        alone = results[model]["alone_s"]
        overhead_s = statistics.median(alone[q] - curve.service_s(curve.steps[q]) for q in alone)
        out[model] = {"curve": {"step_s": dict(curve.points), "prepare_s": curve.prepare_s, "finish_s": curve.finish_s},
                      "overhead_s": overhead_s}
        for name, run in results[model].items():
            if not isinstance(run, dict) or "arrivals" not in run:
                continue
            trace = [simulate.Request(at, quality) for at, quality in run["arrivals"]]
            out[model][name] = {arm: simulate.simulate(trace, curve, arm, overhead_s=overhead_s).summary()
                                for arm in ARMS}
    return out


def table(results: dict, models: list[str]) -> str:
    lines = ["| model | scenario | rate req/s | arm | p50 s | p99 s | mean s | images/s | vs call: p50 | p99 | mean | "
             "images/s |", "|---" * 12 + "|"]
    for model in models:
        for name, run in results[model].items():
            if name in ("capacity_rps", "alone_s"):
                continue
            c = run["call"]
            for arm in ARMS:
                r = run[arm]
                ratio = (f"{r['p50_s'] / c['p50_s']:.2f}x | {r['p99_s'] / c['p99_s']:.2f}x | "
                         f"{r['mean_s'] / c['mean_s']:.2f}x | {r['images_per_s'] / c['images_per_s']:.2f}x")
                first = " (ran first)" if run.get("order", [None])[0] == arm else ""
                lines.append(f"| {model} | {name} | {run['rate_per_s']:.2f} | {arm}{first} | {r['p50_s']:.2f} | "
                             f"{r['p99_s']:.2f} | {r['mean_s']:.2f} | {r['images_per_s']:.2f} | {ratio} |")
    lines += ["", "Simulator (benchmarks/simulate.py) on the same arrivals, with the curve the replicas measured in "
              "place and the HTTP path's latency at c=1:", "",
              "| model | scenario | arm | HTTP p50 s | sim p50 s | sim/HTTP | HTTP mean s | sim mean s | sim/HTTP | "
              "within 20 % |", "|---" * 10 + "|"]
    for model, sim in results.get("simulated", {}).items():
        for name, arms in sim.items():
            if name in ("curve", "overhead_s"):
                continue
            for arm, s in arms.items():
                h = results[model][name][arm]
                p50, mean = s["p50_s"] / h["p50_s"], s["mean_s"] / h["mean_s"]
                ok = "yes" if max(abs(p50 - 1), abs(mean - 1)) <= 0.2 else "no"
                lines.append(f"| {model} | {name} | {arm} | {h['p50_s']:.2f} | {s['p50_s']:.2f} | {p50:.2f} | "
                             f"{h['mean_s']:.2f} | {s['mean_s']:.2f} | {mean:.2f} | {ok} |")
        lines.append(f"| {model} | curve: step s by batch {sim['curve']['step_s']}, prepare "
                     f"{sim['curve']['prepare_s']:.4f} s, finish {sim['curve']['finish_s']:.4f} s, HTTP path "
                     f"{sim['overhead_s']:.3f} s | | | | | | | | |")
    if "abandon" not in results:
        return "\n".join(lines)
    a, p = results["abandon"], results["in_process"]
    lines += ["", "| abandon test (tiny-sd) | idle s | after 8 x n=4 hd dropped, s | ratio |", "|---|---|---|---|"]
    lines += [f"| {arm} | {v['idle_s']:.2f} | {v['after_s']:.2f} | {v['ratio']:.2f}x |" for arm, v in a.items()]
    lines += ["", "| streaming (standard, 256², c=1), p50 s | plain b64 | stream, 0 partials | stream, 3 partials: "
              "first partial | completed | 3 previews cost |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {v['plain_p50_s']:.2f} | {v['stream0_p50_s']:.2f} | {v['stream3_first_partial_p50_s']:.2f} | "
              f"{v['stream3_p50_s']:.2f} | {100 * v['preview_cost_fraction']:+.0f} % |"
              for m, v in results["streaming"].items()]
    lines += ["", "| preview cost (in process, 256², 1 image) | step ms | preview ms | preview / step |",
              "|---|---|---|---|"]
    lines += [f"| {m} | {v['step_ms']:.1f} | {v['preview_ms']:.1f} | {v['preview_per_step']:.2f} |"
              for m, v in results["preview_cost"].items()]
    lines += ["", "Serving overhead (tiny-sd, 1 step, jpeg, b64_json, c=1): "
              f"HTTP p50 {results['http_1_step_p50_s']:.3f} s - in-process {p['pipeline_1_step_p50_s']:.3f} s = "
              f"**{1000 * (results['http_1_step_p50_s'] - p['pipeline_1_step_p50_s']):.0f} ms**.",
              f"Step loop (tiny-flux, 4 x 50 steps, 256²): step {p['step_ms']:.1f} ms = denoiser {p['denoiser_ms']:.1f}"
              f" + host {p['host_in_step_ms']:.1f} ms; loop gap between steps {p['loop_gap_ms']:.2f} ms; "
              f"overhead **{100 * p['overhead_fraction']:.1f} %** of a step."]
    return "\n".join(lines)


def plot(results: dict, models: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        names = [n for n in results[model] if n not in ("capacity_rps", "alone_s")]
        xs = range(len(names))
        for offset, arm in zip((-0.27, 0.0, 0.27), ARMS, strict=True):
            ax.bar([x + offset for x in xs], [results[model][n][arm]["p99_s"] for n in names], 0.27,
                   label=f"{arm} p99")
            ax.plot([x + offset for x in xs], [results[model][n][arm]["p50_s"] for n in names], "k_", ms=14)
        ax.set_xticks(list(xs), names)
        ax.set(title=f"{model} 256² (bars p99, ticks p50)", ylabel="latency (s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["tiny-flux", "tiny-sd3"])
    parser.add_argument("--duration-s", type=float, default=45)
    parser.add_argument("--quick", action="store_true", help="the load scenarios and the simulator only")
    args = parser.parse_args()
    # A plain `kill` must still stop the `serve run` below (its own session): unwind through finally.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ray_tmp = Path(tempfile.mkdtemp(prefix="artserve-bench-"))  # short: Ray's socket paths
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        process, base = serving.start(work, ray_tmp, variants(args.models))
        try:
            results = asyncio.run(measure(base, args.models, args.duration_s, args.quick, ray_tmp))
            results["simulated"] = simulated(results, args.models, results["replica_costs"])
        finally:
            serving.stop(process, ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)
        if not args.quick:
            results["in_process"] = in_process(ROOT / "models")
            results["preview_cost"] = preview_cost()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = table(results, args.models)
    (RESULTS / f"step_engine-{stamp}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"step_engine-{stamp}.md").write_text(text + "\n")
    plot(results, args.models, RESULTS / f"step_engine-{stamp}.png")
    print(text)


if __name__ == "__main__":
    main()
