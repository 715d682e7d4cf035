"""Load generator for ArtServe, on the OpenAI SDK's AsyncOpenAI.

    .venv/bin/serve run benchmarks/serve_config.yaml &        # or any server
    .venv/bin/python benchmarks/loadgen.py --url http://127.0.0.1:8000/v1 [--scenarios benchmarks/scenarios.yaml]

Closed-loop scenarios keep `concurrency` requests in flight; open-loop ones send Poisson
arrivals at `rates_per_s` whatever the answers. Per run: p50/p95/p99 latency, images/s,
errors by status, achieved batch sizes (`x-artserve-batch-size`). The direct baseline (the
same pipeline in-process, unbatched and batched) is measured in the same run, first, while
the server is idle. Writes JSON, a Markdown table and PNG plots under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import openai
import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Run:
    scenario: str
    model: str
    load: str  # "concurrency 4" or "rate 2/s"
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    retry_after: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        ok = sorted(self.latencies_s)

        def pct(p: float) -> float:
            return ok[min(len(ok) - 1, int(p * len(ok)))] if ok else float("nan")

        return {
            "scenario": self.scenario, "model": self.model, "load": self.load,
            "requests": sum(self.statuses.values()), "statuses": self.statuses,
            "p50_s": pct(0.50), "p95_s": pct(0.95), "p99_s": pct(0.99),
            "images_per_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "mean_batch_size": statistics.mean(self.batch_sizes) if self.batch_sizes else 0.0,
            "retry_after_values": sorted(set(self.retry_after)),
            "max_batch_size": max(self.batch_sizes, default=0),
        }


async def one_request(client: openai.AsyncOpenAI, run: Run, body: dict, bar: tqdm) -> None:
    start = time.perf_counter()
    try:
        raw = await client.images.with_raw_response.generate(**body)
        run.latencies_s.append(time.perf_counter() - start)
        run.batch_sizes.append(int(raw.headers.get("x-artserve-batch-size", 0)))
        status = "200"
    except openai.APIStatusError as exc:
        status = str(exc.status_code)
        if exc.response.headers.get("retry-after"):
            run.retry_after.append(exc.response.headers["retry-after"])
    except openai.APIConnectionError:
        status = "connection"
    run.statuses[status] = run.statuses.get(status, 0) + 1
    bar.update()


async def closed_loop(client, run: Run, body: dict, concurrency: int, requests: int, bar: tqdm) -> None:
    queue = list(range(requests))

    async def worker():
        while queue:
            queue.pop()
            await one_request(client, run, body, bar)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.wall_s = time.perf_counter() - start


async def open_loop(client, run: Run, body: dict, rate_per_s: float, duration_s: float, bar: tqdm) -> None:
    rng = random.Random(0)
    tasks, start = [], time.perf_counter()
    while (elapsed := time.perf_counter() - start) < duration_s:
        tasks.append(asyncio.create_task(one_request(client, run, body, bar)))
        await asyncio.sleep(rng.expovariate(rate_per_s))
    await asyncio.gather(*tasks)
    run.wall_s = max(elapsed, time.perf_counter() - start)


def direct_baseline(model_id: str, size: str, quality: str, batch_sizes: list[int], repeats: int = 3) -> dict:
    """The pipeline called in-process: seconds per call and images/s, per batch size."""
    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine, PipelineInputs

    engine = DiffusersEngine(load_model_config(ROOT / "models" / f"{model_id}.yaml"))
    preset = engine.model.quality_preset(quality)
    width, height = map(int, size.split("x"))
    result = {}
    for batch in batch_sizes:
        inputs = PipelineInputs(width, height, preset.num_inference_steps, preset.guidance_scale,
                                ["a lighthouse at dusk"] * batch, [None] * batch, list(range(batch)))
        engine.generate(inputs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.generate(inputs)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        result[batch] = {"call_s": median, "images_per_s": batch / median}
    return result


async def run_scenarios(url: str, config: dict) -> list[Run]:
    client = openai.AsyncOpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "none"),
                                max_retries=0, timeout=600)
    runs = []
    for scenario in config["scenarios"]:
        model = scenario.get("model", config["model"])
        body = {"model": model, "prompt": "a lighthouse at dusk", "size": config["size"],
                "quality": config["quality"], "response_format": "url", "extra_body": {"seed": 1}}
        await client.images.generate(**body)  # warm-up
        if scenario["kind"] == "closed":
            for concurrency in scenario["concurrency"]:
                run = Run(scenario["name"], model, f"concurrency {concurrency}")
                with tqdm(total=scenario["requests"], desc=f"{scenario['name']} c={concurrency}") as bar:
                    await closed_loop(client, run, body, concurrency, scenario["requests"], bar)
                runs.append(run)
        else:
            for rate in scenario["rates_per_s"]:
                run = Run(scenario["name"], model, f"rate {rate}/s")
                with tqdm(desc=f"{scenario['name']} {rate}/s") as bar:
                    await open_loop(client, run, body, rate, scenario["duration_s"], bar)
                runs.append(run)
    return runs


def markdown(summaries: list[dict], baseline: dict) -> str:
    lines = ["| scenario | model | load | requests | statuses | p50 s | p95 s | p99 s | images/s | mean batch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['scenario']} | {s['model']} | {s['load']} | {s['requests']} | {s['statuses']} | "
                     f"{s['p50_s']:.2f} | {s['p95_s']:.2f} | {s['p99_s']:.2f} | {s['images_per_s']:.2f} | "
                     f"{s['mean_batch_size']:.1f} |")
    lines += ["", "| direct baseline batch | s per call | images/s |", "|---|---|---|"]
    lines += [f"| {b} | {v['call_s']:.3f} | {v['images_per_s']:.2f} |" for b, v in baseline.items()]
    return "\n".join(lines)


def ratios(summaries: list[dict], baseline: dict) -> dict:
    by = {(s["scenario"], s["load"]): s for s in summaries}
    out = {}
    if ("overhead", "concurrency 1") in by and 1 in baseline:
        out["overhead_ms_at_c1"] = 1000 * (by[("overhead", "concurrency 1")]["p50_s"] - baseline[1]["call_s"])
    batched, unbatched = by.get(("batching", "concurrency 8")), by.get(("no-batching", "concurrency 8"))
    top = max(baseline)
    if batched:
        out[f"batched_c8_vs_direct_batch{top}"] = batched["images_per_s"] / baseline[top]["images_per_s"]
    if batched and unbatched:
        out["batched_vs_unbatched_service_c8"] = batched["images_per_s"] / unbatched["images_per_s"]
    return out


def plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [s for s in summaries if s["load"].startswith("concurrency")]
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(10, 4))
    for model in sorted({s["model"] for s in closed}):
        rows = [s for s in closed if s["model"] == model]
        xs = [int(s["load"].split()[1]) for s in rows]
        lat.plot(xs, [s["p50_s"] for s in rows], "o-", label=f"{model} p50")
        lat.plot(xs, [s["p99_s"] for s in rows], "x--", label=f"{model} p99")
        thr.plot(xs, [s["images_per_s"] for s in rows], "o-", label=model)
    lat.set(xlabel="concurrency", ylabel="latency (s)", title="Latency")
    thr.set(xlabel="concurrency", ylabel="images/s", title="Throughput")
    lat.legend()
    thr.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--scenarios", default=str(ROOT / "benchmarks" / "scenarios.yaml"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--no-baseline", action="store_true", help="remote servers: skip the in-process baseline")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.scenarios).read_text())
    baseline = {} if args.no_baseline else direct_baseline(
        config["model"], config["size"], config["quality"], config["baseline_batch_sizes"])
    runs = asyncio.run(run_scenarios(args.url, config))
    summaries = [r.summary() for r in runs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {"url": args.url, "config": config, "baseline": baseline, "runs": summaries,
              "ratios": ratios(summaries, baseline), "raw": [asdict(r) for r in runs]}
    (out / f"{stamp}.json").write_text(json.dumps(result, indent=2))
    table = markdown(summaries, baseline)
    (out / f"{stamp}.md").write_text(table + "\n\n" + json.dumps(result["ratios"], indent=2) + "\n")
    plot(summaries, out / f"{stamp}.png")
    print(table)
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
