"""What a second live torch thread costs the step loop on a CPU (serve_app/engine/threads.py).

    .venv/bin/python benchmarks/torch_threads.py [--model tiny-flux] [--rounds 5]

In one process, tiny-flux's runner at 256², one image, 28 steps, timed on a worker thread (as
the replica's step loop runs them) in two setups, rounds interleaved:
- `alone`: the worker is the only live thread that has run torch (what the replica does now);
- `second pool`: another live thread has run torch too (what the replica did when its own
  thread built the pipeline): OpenMP keeps that thread's worker pool, and with more pool
  threads than cores libgomp stops spinning between parallel regions.
Prints milliseconds per step (medians) and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import torch

    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine
    from serve_app.engine.runners import ImageSpec, make_runner
    from serve_app.engine.threads import run_on_own_thread

    config = load_model_config(ROOT / "models" / f"{args.model}.yaml")
    engine = run_on_own_thread(DiffusersEngine, config)
    runner = run_on_own_thread(make_runner, engine)
    spec = ImageSpec("a lighthouse at dusk", None, 256, 256, 28, config.quality["standard"].guidance_scale, 0)

    def steps_ms() -> float:
        with torch.inference_mode():
            states = runner.prepare([spec])
            started = time.perf_counter()
            while not states[0].done:
                runner.step(states)
            return 1000 * (time.perf_counter() - started) / 28

    stop = threading.Event()

    def neighbour(ready: threading.Event) -> None:  # has run torch, then lives on idle
        with torch.inference_mode():
            torch.ones(256, 256) @ torch.ones(256, 256)  # BLAS and ATen's parallel_for both
            torch.ones(1 << 20).mul_(2)
        ready.set()
        stop.wait()

    times: dict[str, list[float]] = {"alone": [], "second pool": []}
    run_on_own_thread(steps_ms)  # warm-up
    for _ in range(args.rounds):
        times["alone"].append(run_on_own_thread(steps_ms))
        ready = threading.Event()
        other = threading.Thread(target=neighbour, args=(ready,), daemon=True)
        other.start()
        ready.wait()
        times["second pool"].append(run_on_own_thread(steps_ms))
        stop.set()
        other.join()
        stop.clear()
    alone, second = (statistics.median(times[k]) for k in times)
    print(f"{args.model} 256², 1 image, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, {args.rounds} rounds")
    print(f"| setup | ms a step (median) | vs alone |\n|---|---|---|\n| alone | {alone:.1f} | 1.00x |\n"
          f"| second pool | {second:.1f} | {second / alone:.2f}x |")


if __name__ == "__main__":
    main()
