"""The Qwen-Image family's costs (benchmarks/README.md, "Qwen-Image"):

1. In process at 256x256 on the tiny models (CPU): one denoising step and one preview (a full VAE
   decode of the x0 estimate) for tiny-qwen-image (true CFG) and tiny-qwen-image-edit (one input
   image); then a 2-image edit against a generation with the same steps, whole requests
   (prepare + steps + decode). Arms interleaved, medians of `--repeats`.
2. At the real architectures on the meta device (no memory, no weights): the tokens one step of
   Qwen-Image-Edit-2509 carries at 1024x1024 with 0, 1 and 3 input images — image tokens from the
   runner's own reference sizes, text tokens from the published processor (vision tokens of each
   384x384 condition image) — checked by running the 20B transformer on them, and the step's
   FLOPs from the architecture (linear layers per token + attention per token pair).

    .venv/bin/python -m benchmarks.qwen_image [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from serve_app.config import load_model_config
from serve_app.engine.runners.base import ImageSpec, run_together

ROOT = Path(__file__).resolve().parents[1]


def load(model_id: str):
    from serve_app.engine.pipeline import DiffusersEngine
    from serve_app.engine.runners import make_runner

    engine = DiffusersEngine(load_model_config(ROOT / "models" / f"{model_id}.yaml"))
    return make_runner(engine)


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def step_and_preview(runner, spec: ImageSpec, repeats: int) -> tuple[float, float]:
    steps, previews = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            [state] = runner.prepare([spec])
            runner.step([state])  # warm: the first step allocates
            steps.append(timed(lambda: runner.step([state])))  # noqa: B023
            previews.append(timed(lambda: runner.preview(state)))  # noqa: B023
    return statistics.median(steps), statistics.median(previews)


def in_process(repeats: int) -> None:
    torch.set_num_threads(2)
    generation, edit = load("tiny-qwen-image"), load("tiny-qwen-image-edit")
    red, blue = Image.new("RGB", (256, 256), (200, 30, 30)), Image.new("RGB", (256, 256), (30, 30, 200))
    arms = {
        "tiny-qwen-image (true CFG)": (generation, ImageSpec("a fox", " ", 256, 256, 8, 4.0, 1)),
        "tiny-qwen-image-edit, 1 input image (true CFG)": (edit, ImageSpec("a fox", " ", 256, 256, 8, 4.0, 1,
                                                                            images=(red,))),
    }
    print("| model | step (ms) | preview (ms) | preview / step |\n|---|---:|---:|---:|")
    for name, (runner, spec) in arms.items():
        step_s, preview_s = step_and_preview(runner, spec, repeats)
        print(f"| {name} | {step_s * 1e3:.1f} | {preview_s * 1e3:.1f} | {preview_s / step_s:.2f} |")
    requests = {
        "generation": (generation, ImageSpec("a fox", " ", 256, 256, 8, 4.0, 2)),
        "edit, 2 input images": (edit, ImageSpec("a fox", " ", 256, 256, 8, 4.0, 2, images=(red, blue))),
    }
    seconds: dict[str, list[float]] = {name: [] for name in requests}
    for _ in range(repeats):  # interleaved: the machine's load moves both arms alike
        for name, (runner, spec) in requests.items():
            seconds[name].append(timed(lambda: run_together(runner, [spec])))  # noqa: B023
    base = statistics.median(seconds["generation"])
    print("\n| request (8 steps, true CFG, 256x256) | s | vs generation |\n|---|---:|---:|")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f}x |")


def step_tflops(image_tokens: int, text_tokens: int, rows: int, width: int = 3072, blocks: int = 60) -> float:
    """One transformer step: every block's linear layers (attention projections 4 w^2 and a 4x MLP
    8 w^2, per token of either stream) and its joint attention (2 x 2 N^2 w), 2 FLOPs a multiply-add."""
    tokens = image_tokens + text_tokens
    per_block = 2 * 12 * width * width * tokens + 4 * tokens * tokens * width
    return rows * blocks * per_block / 1e12


def at_full_size() -> None:
    from serve_app.engine import full_size
    from serve_app.engine.runners.qwen import QwenImageEditRunner

    pipeline = full_size.build_pipeline("qwen-image-edit", "meta", torch.bfloat16)
    runner = QwenImageEditRunner(pipeline, load_model_config(ROOT / "models" / "qwen-image-edit.yaml"), "meta")
    photo = Image.new("RGB", (1024, 1024), (90, 120, 150))
    print("\n| input images (0: a generation's shape) | image tokens | text tokens | tokens per row "
          "| step TFLOPs (2 rows: true CFG) | vs 0 |")
    print("|---:|---:|---:|---:|---:|---:|")
    baseline = None
    for count in (0, 1, 3):
        images = (photo,) * count
        spec = ImageSpec("replace the sky with a sunset", " ", 1024, 1024, 40, 4.0, 1, images=images)
        image_tokens = sum(h * w for _, h, w in runner.img_shapes(spec)[0])
        conditions = runner.condition_images(spec) if count else None
        template = pipeline.prompt_template_encode
        pictures = "".join(f"Picture {i + 1}: <|vision_start|><|image_pad|><|vision_end|>" for i in range(count))
        inputs = pipeline.processor(text=[template.format(pictures + spec.prompt)], images=conditions,
                                    padding=True, return_tensors="pt")
        text_tokens = inputs["input_ids"].shape[1] - pipeline.prompt_template_encode_start_idx
        with torch.inference_mode():  # the shapes fit the 20B MMDiT (meta: no memory, no time)
            [out] = pipeline.transformer(
                hidden_states=torch.zeros(2, image_tokens, 64, device="meta", dtype=torch.bfloat16),
                timestep=torch.full((2,), 0.5, device="meta", dtype=torch.bfloat16),
                encoder_hidden_states=torch.zeros(2, text_tokens, 3584, device="meta", dtype=torch.bfloat16),
                img_shapes=runner.img_shapes(spec) * 2, return_dict=False)
        assert out.shape[1] == image_tokens
        tflops = step_tflops(image_tokens, text_tokens, rows=2)
        baseline = baseline or tflops
        print(f"| {count} | {image_tokens} | {text_tokens} | {image_tokens + text_tokens} | {tflops:.1f} | "
              f"{tflops / baseline:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--meta-only", action="store_true", help="only the full-size token table")
    args = parser.parse_args()
    if not args.meta_only:
        in_process(args.repeats)
    at_full_size()


if __name__ == "__main__":
    main()
