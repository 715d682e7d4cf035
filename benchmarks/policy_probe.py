"""What each policy's replica did under the same load: latency, batch sizes and the cost curve
it measured, read from the replicas themselves (`ModelServer.stats()`).

    .venv/bin/python benchmarks/policy_probe.py [--model tiny-sd3] [--rate 2.8] \
        [--duration-s 40] [--rounds 2]

Starts one `serve run` with the model as `<id>-cost` and `<id>-fixed`, sends both the same
seeded Poisson arrivals of `standard` requests (256², b64 jpeg), arms alternating per round (each first in turn),
then connects to the cluster as a Ray driver and asks each replica for its step loop's counters
and cost model. Prints one line per arm and round: p50 and mean latency, denoiser calls, mean
batch, ms per call, the loop's ms between calls, and the cost model's step seconds by batch size
with their sample counts. For finding why a policy behaves as it does, not for ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import serving  # noqa: E402

ARMS = ("cost", "fixed")


async def poisson(base: str, model: str, arrivals: list[float]) -> dict:
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        latencies, started = [], time.perf_counter()

        async def one(at: float) -> None:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - started)))
            sent = time.perf_counter()
            response = await http.post("/v1/images/generations", json={
                "model": model, "prompt": "a lighthouse at dusk", "size": "256x256", "quality": "standard",
                "response_format": "b64_json", "output_format": "jpeg"})
            if response.status_code == 200:
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(one(at) for at in arrivals))
    latencies.sort()
    return {"ok": len(latencies), "p50_s": round(latencies[len(latencies) // 2], 3),
            "mean_s": round(sum(latencies) / len(latencies), 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-sd3")
    parser.add_argument("--rate", type=float, default=2.8, help="requests per second")
    parser.add_argument("--duration-s", type=float, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng, at, arrivals = random.Random(7), 0.0, []
    while at < args.duration_s:
        at += rng.expovariate(args.rate)
        arrivals.append(at)
    ray_tmp = Path(tempfile.mkdtemp(prefix="artserve-probe-"))  # short: Ray's socket paths
    with tempfile.TemporaryDirectory() as tmp:
        process, base = serving.start(Path(tmp), ray_tmp, [serving.variant(args.model, f"{args.model}-{arm}",
                                                                            policy=arm) for arm in ARMS])
        try:
            os.environ["RAY_TMPDIR"] = str(ray_tmp)
            import ray
            from ray import serve

            ray.init(address="auto", logging_level="ERROR")

            def stats(arm: str) -> dict:
                handle = serve.get_deployment_handle(f"ModelServer:{args.model}-{arm}", app_name="bench")
                return handle.stats.remote().result()

            for round_ in range(args.rounds):
                for arm in ARMS if round_ % 2 == 0 else ARMS[::-1]:  # each arm first in turn
                    before = stats(arm)["loop"]
                    latency = asyncio.run(poisson(base, f"{args.model}-{arm}", arrivals))
                    after = stats(arm)
                    loop = {k: after["loop"][k] - before[k] for k in before}
                    calls = max(1, loop["steps"])
                    print(round_, arm, json.dumps(latency), f"calls {loop['steps']}",
                          f"mean batch {loop['image_steps'] / calls:.2f}",
                          f"ms a call {1000 * loop['step_s'] / calls:.1f}",
                          f"ms between {1000 * loop['gap_s'] / max(1, loop['gaps']):.2f}",
                          json.dumps(after["costs"]), flush=True)
        finally:
            if "ray" in sys.modules:  # a connected driver keeps `serve run` from stopping
                sys.modules["ray"].shutdown()
            serving.stop(process, ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
