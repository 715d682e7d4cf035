"""The three policies on one replica's step loop in process: no HTTP, no Ray.

    .venv/bin/python benchmarks/policy_inprocess.py [--model tiny-sd3] [--rate 3.0] [--n 120] \
        [--rounds 1] [--arms call,cost,fixed] [--encode]

The real runner, `StepScheduler` and `StepLoop` (as the replica builds them), one seeded
Poisson stream of `standard` 256² requests (one image each) sent to each arm in turn;
`--encode` also PNG-encodes and base64s every image on a thread pool, as the replica does.
Prints per arm: p50 / mean / p99 latency, images/s, denoiser calls, mean batch, ms per call,
the loop's ms between calls, and the cost model it learned (ms by batch size, samples, prepare
and finish ms per image). It separates what the policies do from what the HTTP path adds.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class NoMetrics:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-sd3")
    parser.add_argument("--rate", type=float, default=3.0, help="requests per second")
    parser.add_argument("--n", type=int, default=120, help="requests per arm")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--arms", default="call,cost,fixed")
    parser.add_argument("--encode", action="store_true")
    args = parser.parse_args()
    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine
    from serve_app.engine.runners import ImageSpec, make_runner
    from serve_app.engine.threads import run_on_own_thread
    from serve_app.replica.scheduler import StepScheduler, Ticket
    from serve_app.replica.steploop import StepLoop, Work

    config = load_model_config(ROOT / "models" / f"{args.model}.yaml")
    engine = run_on_own_thread(DiffusersEngine, config)
    runner = run_on_own_thread(make_runner, engine)
    preset = config.quality["standard"]
    rng, arrivals, at = random.Random(0), [], 0.0
    for _ in range(args.n):
        at += rng.expovariate(args.rate)
        arrivals.append(at)
    encoders = ThreadPoolExecutor(4)

    def encode(image) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        base64.b64encode(buffer.getvalue())

    for round_ in range(args.rounds):
        for arm in args.arms.split(","):
            scheduler = StepScheduler(config.batching.max_batch_size, arm,
                                      max_wait_factor=config.batching.max_wait_factor)
            loop = StepLoop(runner, scheduler, NoMetrics(), lambda exc: exc)
            latencies: list[float] = []
            all_done = threading.Event()

            def deliverer(sent: float, latencies: list[float] = latencies, all_done: threading.Event = all_done):
                def deliver(image, batch_size: int) -> None:
                    latencies.append(time.monotonic() - sent)
                    if args.encode:
                        encoders.submit(encode, image)
                    if len(latencies) == args.n:
                        all_done.set()
                return deliver

            started = time.monotonic()
            for i, at in enumerate(arrivals):
                time.sleep(max(0.0, started + at - time.monotonic()))
                spec = ImageSpec("a lighthouse at dusk", None, 256, 256, preset.num_inference_steps,
                                 preset.guidance_scale, i)
                now = time.monotonic()
                ticket = Ticket(f"r{i}", 0, runner.batch_key(spec), now, steps=spec.steps)
                loop.submit([Work(ticket, spec, deliverer(now))])
            all_done.wait()
            wall = time.monotonic() - started
            loop.stop()
            stats, ordered = loop.stats, sorted(latencies)
            print(f"{arm:5s} round {round_} p50 {ordered[len(ordered) // 2]:.3f} mean {statistics.fmean(ordered):.3f} "
                  f"p99 {ordered[int(0.99 * len(ordered))]:.3f} s, {args.n / wall:.2f} images/s, {stats.steps} calls, "
                  f"batch {stats.image_steps / stats.steps:.2f}, {1000 * stats.step_s / stats.steps:.1f} ms a call, "
                  f"{1000 * stats.gap_s / max(1, stats.gaps):.2f} ms between", flush=True)
            for entry in loop.costs.snapshot():
                print(f"    {entry['key']}: ms {({k: round(v * 1000, 1) for k, v in entry['step_s'].items()})}, "
                      f"samples {entry['samples']}, prepare {entry['prepare_s'] * 1000:.1f} ms, "
                      f"finish {entry['finish_s'] * 1000:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
