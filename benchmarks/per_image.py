"""Seconds per image for each tiny model, by size and quality: the pipeline called directly
in-process, and, when --url is given, the same request through a running server's HTTP API.

    .venv/bin/python benchmarks/per_image.py [--url http://127.0.0.1:8000/v1] [--repeats 3]
        [--sizes 256x256 1024x1024]

Prints a Markdown table row by row; each case is timed directly and then over HTTP, back
to back, so both see the same machine. Compare within one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart"]
QUALITIES = ["standard", "hd"]


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def direct_call(engine, size: str, quality: str):
    from serve_app.engine.pipeline import PipelineInputs

    preset = engine.model.quality_preset(quality)
    width, height = map(int, size.split("x"))
    inputs = PipelineInputs(width, height, preset.num_inference_steps, preset.guidance_scale,
                            ["a lighthouse at dusk"], [None], [1])
    return lambda: engine.generate(inputs)


def http_call(client, model_id: str, size: str, quality: str):
    kwargs = dict(model=model_id, prompt="a lighthouse at dusk", size=size, quality=quality, extra_body={"seed": 1})
    return lambda: client.images.generate(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", help="a running server's /v1 base URL")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["256x256", "1024x1024"])
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()

    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine

    client = None
    if args.url:
        import openai

        client = openai.OpenAI(base_url=args.url, api_key=os.environ.get("OPENAI_API_KEY", "none"), timeout=900)
    print("| model | size | quality | direct s/image | HTTP s/image | HTTP - direct (ms) |")
    print("|---|---|---|---|---|---|", flush=True)
    for model_id in args.models:
        engine = DiffusersEngine(load_model_config(ROOT / "models" / f"{model_id}.yaml"))
        for size in args.sizes:
            for quality in QUALITIES:
                base = median_s(direct_call(engine, size, quality), args.repeats)
                row = f"| {model_id} | {size} | {quality} | {base:.2f} |"
                if client:
                    http = median_s(http_call(client, model_id, size, quality), args.repeats)
                    row += f" {http:.2f} | {1000 * (http - base):+.0f} |"
                else:
                    row += " - | - |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
