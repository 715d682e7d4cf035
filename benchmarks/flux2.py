"""FLUX.2 on the step engine: what a step and a preview cost on tiny-flux2, what reference
images add, and the real architectures' tokens (and transformer FLOPs) per step.

    .venv/bin/python benchmarks/flux2.py [--repeats 9] [--size 256]

1. In process, `tiny-flux2` at `--size`², one image: a denoiser step and a preview (the step's
   x0 estimate decoded by the VAE, what a streamed partial image costs), measured interleaved
   (step, preview, step, ...) so the machine's load hits both alike; medians and their ratio.
2. An edit with two references (`--size`² and 3/4 of it) against a generation, both of 8 steps,
   alone: the whole request (`run_together`) and one step, interleaved; ratios edit / generation.
3. The real architectures on the `meta` device at 1024² (no weights, no memory): per image and
   step, the transformer's sequence (512 text tokens + 4096 image tokens + 4096 per 1024²
   reference) and its FLOPs as torch's FlopCounterMode counts them, with 0 / 1 / 4 references.
Prints Markdown tables; writes benchmarks/results/flux2-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def interleaved(calls: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of each call, run in turn `repeats` times after a warm-up
    round. CPU time (this process's, all threads) is less disturbed by other work on the machine."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
    for round_ in range(repeats + 1):
        for name, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            if round_:
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {name: {"wall_s": statistics.median(w for w, _ in values), "cpu_s": statistics.median(c for _, c in values)}
            for name, values in times.items()}


def noise(width: int, height: int, seed: int):
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def tiny(size: int, repeats: int) -> dict:
    import torch

    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine
    from serve_app.engine.runners import ImageSpec, make_runner
    from serve_app.engine.runners.base import run_together

    runner = make_runner(DiffusersEngine(load_model_config(ROOT / "models" / "tiny-flux2.yaml")))
    references = (noise(size, size, 1), noise(size * 3 // 4, size, 2))
    generation = ImageSpec("a lighthouse at dusk", None, size, size, 8, 4.0, 0)
    edit = ImageSpec(**{**generation.__dict__, "images": references, "image": None})
    endless = {name: ImageSpec(**{**spec.__dict__, "steps": 10_000, "image": None})  # never finishes
               for name, spec in (("generation", generation), ("edit", edit))}
    with torch.inference_mode():
        states = {name: runner.prepare([spec])[0] for name, spec in endless.items()}
        steps = interleaved({"step": lambda: runner.step([states["generation"]]),
                             "preview": lambda: runner.preview(states["generation"]),
                             "edit_step": lambda: runner.step([states["edit"]])}, repeats)
        whole = interleaved({"generation": lambda: run_together(runner, [generation]),
                             "edit": lambda: run_together(runner, [edit])}, repeats)
    tokens = {name: int(state.latents.shape[1] + state.cond.get("references", state.latents[:, :0]).shape[1])
              for name, state in states.items()}
    return {"tokens": tokens, **steps, **whole}


def full_size() -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from serve_app.engine import full_size as architectures

    meta, out = torch.device("meta"), {}
    for model_id in ("flux2-dev", "flux2-klein-4b"):
        transformer = architectures.build_pipeline(model_id, "meta", torch.bfloat16).transformer
        config, rows = transformer.config, {}
        for references in (0, 1, 4):
            image_tokens = (1024 // 16) ** 2 * (1 + references)
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                transformer(
                    hidden_states=torch.zeros(1, image_tokens, config.in_channels, device=meta, dtype=torch.bfloat16),
                    encoder_hidden_states=torch.zeros(1, 512, config.joint_attention_dim, device=meta,
                                                      dtype=torch.bfloat16),
                    timestep=torch.ones(1, device=meta),
                    guidance=torch.ones(1, device=meta) if config.guidance_embeds else None,
                    img_ids=torch.zeros(1, image_tokens, 4, dtype=torch.long, device=meta),
                    txt_ids=torch.zeros(1, 512, 4, dtype=torch.long, device=meta), return_dict=False)
            rows[references] = {"sequence": 512 + image_tokens, "tflop": counter.get_total_flops() / 1e12}
        for row in rows.values():
            row["vs_none"] = row["tflop"] / rows[0]["tflop"]
        out[model_id] = rows
        print(model_id, json.dumps(rows), flush=True)
    return out


def table(results: dict, size: int) -> str:
    t = results["tiny"]

    def row(label: str, name: str, base: str | None) -> str:
        ratio = " | ".join(f"{t[name][k] / t[base][k]:.2f}x" if base else "1" for k in ("wall_s", "cpu_s"))
        return f"| {label} | {t[name]['wall_s']:.4f} | {t[name]['cpu_s']:.4f} | {ratio} |"

    lines = [f"| tiny-flux2, {size}², alone (median) | wall s | CPU s | ratio (wall) | ratio (CPU) |",
             "|---|---|---|---|---|",
             row(f"denoiser step (generation: {t['tokens']['generation']} image tokens)", "step", None),
             row("preview (x0 decoded by the VAE) / step", "preview", "step"),
             row(f"step of a 2-reference edit ({t['tokens']['edit']} image + reference tokens) / step", "edit_step",
                 "step"),
             row("generation, 8 steps, whole request", "generation", None),
             row("2-reference edit, 8 steps, whole request / generation", "edit", "generation"),
             "", "| model (meta, 1024², per image-step) | references | sequence tokens | transformer TFLOP | "
             "vs none |", "|---|---|---|---|---|"]
    for model_id, rows in results["full_size"].items():
        lines += [f"| {model_id} | {n} | {r['sequence']:,} | {r['tflop']:.1f} | {r['vs_none']:.2f}x |"
                  for n, r in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    results = {"tiny": tiny(args.size, args.repeats), "full_size": full_size()}
    text = table(results, args.size)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"flux2-{stamp}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"flux2-{stamp}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
