"""Edits against generations, in process, per tiny family; and what reading an upload costs.

    .venv/bin/python benchmarks/edits.py [--repeats 5] [--size 256]

Per family (tiny-sd, tiny-sdxl, tiny-sd3, tiny-flux), one image alone through the step
runner (`run_together`), at the same size and the same denoising steps actually run (6):
a generation of 6 steps; image-to-image with 10 steps at strength 0.6 (runs 6); inpainting
with 6 steps at strength 1.0 (runs 6). Medians of `--repeats` after a warm-up; the ratios
are edit / generation. Then the ingress's side (`serve_app/api/uploads.py`): the header check
and the full decode + resize + PNG re-encode of 1024² inputs (png, jpeg, webp) and a mask,
against the time of the tiny generation above.
Prints Markdown tables; writes benchmarks/results/edits-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FAMILIES = ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_s(call, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def picture(size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def runners(size: int, repeats: int) -> dict:
    import torch
    from PIL import Image

    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine
    from serve_app.engine.runners import ImageSpec, make_runner
    from serve_app.engine.runners.base import run_together

    image = picture(size)
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size))  # repaint the left half
    out = {}
    for model_id in FAMILIES:
        runner = make_runner(DiffusersEngine(load_model_config(ROOT / "models" / f"{model_id}.yaml")))
        base = ImageSpec("a lighthouse at dusk", None, size, size, 6, 4.0, 0)
        cases = {"generation": base,
                 "img2img": ImageSpec(**{**base.__dict__, "steps": 10, "image": image, "strength": 0.6}),
                 "inpaint": ImageSpec(**{**base.__dict__, "image": image, "mask": mask, "strength": 1.0})}
        with torch.inference_mode():
            times = {name: median_s(lambda s=spec, r=runner: run_together(r, [s]), repeats)
                     for name, spec in cases.items()}
        out[model_id] = {**{f"{k}_s": v for k, v in times.items()},
                         "img2img_ratio": times["img2img"] / times["generation"],
                         "inpaint_ratio": times["inpaint"] / times["generation"]}
        print(model_id, json.dumps(out[model_id]), flush=True)
    return out


def uploads(repeats: int) -> dict:
    from PIL import Image

    from serve_app.api.uploads import Upload, input_size, prepare

    source, out = picture(1024), {}
    for fmt, pil in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
        buffer = io.BytesIO()
        source.save(buffer, format=pil)
        upload = [Upload("image", buffer.getvalue())]
        out[fmt] = {"bytes": len(buffer.getvalue()),
                    "header_ms": 1000 * median_s(lambda u=upload: input_size(u, 1792 * 1024), repeats),
                    "prepare_ms": 1000 * median_s(
                        lambda u=upload: prepare(u, None, width=1024, height=1024, max_pixels=1792 * 1024), repeats)}
    buffer = io.BytesIO()
    mask = Image.new("RGBA", (1024, 1024), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 512, 1024))
    mask.save(buffer, format="PNG")
    png = [Upload("image", _encoded(source, "PNG"))]
    out["png + mask"] = {"bytes": len(buffer.getvalue()) + len(png[0].data), "header_ms": float("nan"),
                         "prepare_ms": 1000 * median_s(lambda: prepare(png, Upload("mask", buffer.getvalue()),
                                                                       width=1024, height=1024,
                                                                       max_pixels=1792 * 1024), repeats)}
    return out


def _encoded(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def table(results: dict, size: int) -> str:
    lines = [f"| model ({size}², 6 steps run, alone) | generation s | img2img s (10 x 0.6) | ratio | "
             "inpaint s (6 x 1.0) | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {r['generation_s']:.3f} | {r['img2img_s']:.3f} | {r['img2img_ratio']:.2f}x | "
              f"{r['inpaint_s']:.3f} | {r['inpaint_ratio']:.2f}x |" for m, r in results["runners"].items()]
    generation_ms = 1000 * results["runners"]["tiny-sd"]["generation_s"]
    lines += ["", "| upload (1024², random pixels) | bytes | header check ms | decode + resize + PNG ms | "
              "vs a tiny-sd generation |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['bytes']:,} | {v['header_ms']:.2f} | {v['prepare_ms']:.1f} | "
              f"{v['prepare_ms'] / generation_ms:.2f}x |" for k, v in results["uploads"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    results = {"runners": runners(args.size, args.repeats), "uploads": uploads(args.repeats)}
    text = table(results, args.size)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"edits-{stamp}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"edits-{stamp}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
