"""Seconds per image for each tiny model, by size and quality: the pipeline called directly
in-process, and, when --url is given, the same request through a running server's HTTP API.

    .venv/bin/python benchmarks/per_image.py [--url http://127.0.0.1:8000/v1] [--repeats 3]

Prints a Markdown table. The direct call runs first, then HTTP, so both see the same
machine; compare within one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CASES = [(m, s, q) for m in ["tiny-sd", "tiny-flux"] for s in ["256x256", "1024x1024"] for q in ["standard", "hd"]]


def direct(repeats: int) -> dict[tuple, float]:
    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine, PipelineInputs

    results, engines = {}, {}
    for model_id, size, quality in CASES:
        if model_id not in engines:
            engines[model_id] = DiffusersEngine(load_model_config(ROOT / "models" / f"{model_id}.yaml"))
        engine = engines[model_id]
        preset = engine.model.quality_preset(quality)
        width, height = map(int, size.split("x"))
        inputs = PipelineInputs(width, height, preset.num_inference_steps, preset.guidance_scale,
                                ["a lighthouse at dusk"], [None], [1])
        engine.generate(inputs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.generate(inputs)
            times.append(time.perf_counter() - start)
        results[(model_id, size, quality)] = statistics.median(times)
    return results


def over_http(url: str, repeats: int) -> dict[tuple, float]:
    import openai

    client = openai.OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "none"), timeout=600)
    results = {}
    for model_id, size, quality in CASES:
        kwargs = dict(model=model_id, prompt="a lighthouse at dusk", size=size, quality=quality,
                      extra_body={"seed": 1})
        client.images.generate(**kwargs)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            client.images.generate(**kwargs)
            times.append(time.perf_counter() - start)
        results[(model_id, size, quality)] = statistics.median(times)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", help="a running server's /v1 base URL")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base = direct(args.repeats)
    http = over_http(args.url, args.repeats) if args.url else {}
    print("| model | size | quality | direct s/image | HTTP s/image | HTTP - direct (ms) |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        row = f"| {' | '.join(case)} | {base[case]:.2f} |"
        if case in http:
            row += f" {http[case]:.2f} | {1000 * (http[case] - base[case]):+.0f} |"
        else:
            row += " – | – |"
        print(row)


if __name__ == "__main__":
    main()
