"""Measure the tiny CPU cost curves for the simulator (benchmarks/curves.yaml), in process.

    .venv/bin/python benchmarks/measure_curves.py [--models tiny-flux tiny-sd3] [--size 256] [--rounds 15]

Per tiny model at its 256² default, through its step runner (what a replica runs): one
denoiser step over 1, 2, 4 and 8 images (rounds interleaved over the sizes; the fastest
round of each: on a shared machine a neighbour only ever adds time, so the minimum is the
device's own cost, and the medians are printed beside it),
one `prepare` (text encoding, first latents; new prompts each time, as every request brings
its own) and one `finish` (VAE decode) over as many images, as the step loop calls them. Then the whole-call path
(`pipeline(...)`) at batch 1 and 4 with 2 and 12 steps, whose difference gives its own
seconds per step and per-call overhead. Prints YAML to paste into curves.yaml.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SIZES = (1, 2, 4, 8)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(model_id: str, size: int, rounds: int) -> dict:
    import torch

    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine, PipelineInputs
    from serve_app.engine.runners import ImageSpec, make_runner

    config = load_model_config(ROOT / "models" / f"{model_id}.yaml")
    engine = DiffusersEngine(config)
    runner = make_runner(engine)
    preset = config.quality_preset("standard")
    prompts = iter(f"a lighthouse at dusk, take {i}" for i in range(10**6))

    def specs(count: int, steps: int = 900) -> list:  # DDIM takes at most its 1000 training timesteps
        return [ImageSpec(next(prompts), None, size, size, steps, preset.guidance_scale, i) for i in range(count)]

    step_s: dict[int, list[float]] = {b: [] for b in SIZES}
    prepare_s: dict[int, list[float]] = {b: [] for b in SIZES}
    finish_s: dict[int, list[float]] = {b: [] for b in SIZES}
    with torch.inference_mode():
        states = {b: runner.prepare(specs(b)) for b in SIZES}
        for b in SIZES:  # warm every shape
            runner.step(states[b])
            runner.finish(states[b])
        for _ in range(rounds):
            for b in SIZES:
                step_s[b].append(timed(lambda b=b: runner.step(states[b])))
                prepare_s[b].append(timed(lambda b=b: runner.prepare(specs(b))))
                finish_s[b].append(timed(lambda b=b: runner.finish(states[b])))
        call = {}
        for b in (1, 4):
            for steps in (2, 12):
                inputs = PipelineInputs(size, size, steps, preset.guidance_scale, [next(prompts)] * b, [None] * b,
                                        list(range(b)))
                engine.generate(inputs)
                call[b, steps] = min(timed(lambda i=inputs: engine.generate(i)) for _ in range(5))
    median = statistics.median
    return {
        "step_s": {b: round(min(v), 5) for b, v in step_s.items()},
        "median_step_s": {b: round(median(v), 5) for b, v in step_s.items()},
        "prepare_s": {b: round(min(v), 5) for b, v in prepare_s.items()},  # one call over b images
        "finish_s": {b: round(min(v), 5) for b, v in finish_s.items()},
        # the pipeline's own loop: seconds per step at batch 1 and 4, and the rest of a call
        "call_step_s": {b: round((call[b, 12] - call[b, 2]) / 10, 5) for b in (1, 4)},
        "call_fixed_s": {b: round(call[b, 2] - 2 * (call[b, 12] - call[b, 2]) / 10, 5) for b in (1, 4)},
        "steps": {q: p.num_inference_steps for q, p in config.quality.items() if q in ("standard", "hd", "low")},
        "cap": config.batching.max_batch_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["tiny-flux", "tiny-sd3", "tiny-sd", "tiny-sdxl"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    import yaml

    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for model_id in args.models:
        curve = measure(model_id, args.size, args.rounds)
        curve = {"kind": "measured",
                 "source": f"benchmarks/measure_curves.py, {stamp}, this 2-core VM (shared), torch CPU, "
                           f"{args.size}x{args.size}, fastest of {args.rounds} interleaved rounds", **curve}
        print(yaml.safe_dump({f"{model_id}-cpu": curve}, sort_keys=False, width=120))


if __name__ == "__main__":
    main()
