"""The production catalog at full size with random weights: parameters anywhere, speed on a GPU.

    .venv/bin/python benchmarks/full_size.py --meta              # parameter table, no GPU, ~2 s
    .venv/bin/python benchmarks/full_size.py [--models flux-dev sdxl] [--arms eager yaml compile fp8 flash]
        [--repeats 3]                                            # on a CUDA machine; no download
    .venv/bin/python benchmarks/full_size.py --curves FILE.yaml [--models ...]   # cost curves (curves.yaml)

Each catalog model is built from serve_app/engine/architectures/ with random weights created
directly on the GPU in its YAML dtype (speed and memory do not depend on the weights' values),
then called through diffusers' `pipeline(...)` at its default size (1024², SDXL-Turbo 512²) with
its `standard` preset. One row per loading-option arm (`ARMS`; an arm the hardware cannot run is
reported as skipped, with the reason): cold start (build + options + first call), s/image at
batch 1 (median of --repeats after the first call), images/s at the model's max_batch_size, peak
memory. The step engine arm (`measure_step_engine`) runs the same pipeline through ArtServe's own
loop at batch 1/2/4/8 (its cold start is the first step-engine call, weights already built).
Prints a Markdown table and writes benchmarks/results/full_size-<time>.{md,json}. `--curves`
instead measures each model's cost curve for the simulator (`measure_curve`: one denoiser step at
batch 1/2/4/8, and one prepare and one finish call over as many images) into a YAML file in curves.yaml's layout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Each arm: the engine options it applies (serve_app/engine/optimize.py), over none at all.
ARMS = {
    "eager": {},
    "yaml": None,  # the model YAML's own `engine:` section
    "compile": {"compile": True},
    "fp8": {"quantization": "fp8"},
    "fp8+compile": {"quantization": "fp8", "compile": True},
    "flash": {"attention_backend": "flash"},
    "cudnn": {"attention_backend": "_native_cudnn"},
}
PROMPT = "a lighthouse on a cliff at dusk, volumetric light, highly detailed"


@dataclass
class Row:
    model: str
    arm: str
    size: str
    steps: int
    batch: int = 1
    cold_start_s: float | None = None
    s_per_image: float | None = None
    images_per_s: float | None = None
    peak_gib: float | None = None
    note: str = ""
    applied: list[str] = field(default_factory=list)


def model_config(model_id: str):
    from serve_app.config import load_model_config

    return load_model_config(ROOT / "models" / f"{model_id}.yaml")


def call_kwargs(config, batch: int, seed: int = 0) -> dict:
    """What the engine passes for this model's standard preset (serve_app/engine/pipeline.py)."""
    import torch

    preset = config.quality_preset("standard")
    width, height = map(int, config.default_size.split("x"))
    kwargs = dict(prompt=[PROMPT] * batch, width=width, height=height, num_inference_steps=preset.num_inference_steps,
                  guidance_scale=preset.guidance_scale, output_type="pil",
                  generator=[torch.Generator("cuda").manual_seed(seed + i) for i in range(batch)])
    if config.family != "flux" and config.default_negative_prompt:  # as the engine: only a non-empty one
        kwargs["negative_prompt"] = [config.default_negative_prompt] * batch
    if config.family in ("flux", "stable-diffusion-3"):
        kwargs["max_sequence_length"] = config.max_sequence_length
    return kwargs


def timed(fn) -> float:
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def measure_arm(model_id: str, arm: str, repeats: int) -> Row:
    import torch

    from serve_app.config import EngineOptions
    from serve_app.engine import full_size, optimize
    from serve_app.engine.pipeline import DTYPES

    config = model_config(model_id)
    preset = config.quality_preset("standard")
    row = Row(model_id, arm, config.default_size, preset.num_inference_steps)
    options = config.engine if ARMS[arm] is None else EngineOptions(**ARMS[arm])
    steps = optimize.plan(options, optimize.Hardware.detect())
    skipped = [f"{s.option}: {s.skipped}" for s in steps if s.skipped]
    if skipped:
        row.note = "skipped: " + "; ".join(skipped)
        return row
    if options.attention_backend and not _backend_available(options.attention_backend):
        row.note = f"skipped: attention backend {options.attention_backend} is not installed here"
        return row
    torch.cuda.reset_peak_memory_stats()
    built = {}
    try:
        def cold() -> None:
            built["pipeline"] = full_size.build_pipeline(model_id, "cuda", DTYPES[config.dtype])
            row.applied = optimize.apply(built["pipeline"], options, steps, "cuda", model_id)
            with torch.inference_mode():
                built["pipeline"](**call_kwargs(config, 1))

        row.cold_start_s = timed(cold)
        pipeline = built["pipeline"]
        with torch.inference_mode():
            times = [timed(lambda: pipeline(**call_kwargs(config, 1))) for _ in range(repeats)]
            row.s_per_image = statistics.median(times)
            row.batch = config.batching.max_batch_size
            pipeline(**call_kwargs(config, row.batch))  # a new batch shape: compiled arms recompile here
            row.images_per_s = row.batch / timed(lambda: pipeline(**call_kwargs(config, row.batch)))
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    except Exception as error:  # one arm failing must not lose the others' numbers
        row.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    finally:
        pipeline = None
        built.clear()
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return row


def _backend_available(backend: str) -> bool:
    import importlib.util

    needs = {"flash": "flash_attn", "_flash_3": "flash_attn_interface", "sage": "sageattention"}
    return backend not in needs or importlib.util.find_spec(needs[backend]) is not None


def step_runner(model_id: str):
    """The model's random-weight pipeline on the GPU with its YAML loading options (as in a
    replica), and its step runner (serve_app/engine/runners)."""
    from serve_app.engine import full_size, optimize
    from serve_app.engine.pipeline import DTYPES
    from serve_app.engine.runners import STEP_RUNNERS

    config = model_config(model_id)
    pipeline = full_size.build_pipeline(model_id, "cuda", DTYPES[config.dtype])
    applied = optimize.apply(pipeline, config.engine, optimize.plan(config.engine, optimize.Hardware.detect()),
                             "cuda", model_id)
    return config, STEP_RUNNERS[config.family](pipeline, config, "cuda"), applied


def image_specs(config, batch: int, steps: int | None = None, first_seed: int = 0) -> list:
    """`batch` images of the model's standard preset at its default size (`steps` overrides the preset's)."""
    from serve_app.engine.runners import ImageSpec

    preset = config.quality_preset("standard")
    width, height = map(int, config.default_size.split("x"))
    return [ImageSpec(f"{PROMPT}, take {first_seed + i}", config.default_negative_prompt or None, width, height,
                      steps or preset.num_inference_steps, preset.guidance_scale, first_seed + i)
            for i in range(batch)]


def measure_step_engine(model_id: str, batch_sizes=(1, 2, 4, 8), repeats: int = 2) -> list[Row]:
    """The step engine (prepare, one denoiser call per step over the batch, finish) at each batch
    size, on the same random-weight pipeline: s/image at batch 1, images/s per batch, peak memory."""
    import torch

    from serve_app.engine.runners.base import run_together

    config = model_config(model_id)
    preset = config.quality_preset("standard")
    rows = [Row(model_id, "step engine", config.default_size, preset.num_inference_steps, b) for b in batch_sizes]
    torch.cuda.reset_peak_memory_stats()
    try:
        config, runner, applied = step_runner(model_id)
        rows[0].cold_start_s = timed(lambda: run_together(runner, image_specs(config, 1)))
        for row in rows:
            row.applied = applied
            run_together(runner, image_specs(config, row.batch))  # warm this batch shape
            seconds = statistics.median(timed(lambda b=row.batch: run_together(runner, image_specs(config, b)))
                                        for _ in range(repeats))
            row.images_per_s = row.batch / seconds
            row.s_per_image = seconds if row.batch == 1 else None
        rows[-1].peak_gib = torch.cuda.max_memory_allocated() / 2**30
    except Exception as error:
        for row in rows:
            row.note = row.note or f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def measure_curve(model_id: str, batch_sizes=(1, 2, 4, 8), repeats: int = 7) -> dict:
    """The model's cost curve for the simulator (benchmarks/curves.yaml), on this GPU, through
    its step runner, at each batch size: one denoiser step, one `prepare` (text encoding, first
    latents; new prompts each time) and one `finish` (VAE decode) over that many images, as the
    step loop runs them (the images it admits at a boundary are prepared in one call, those that
    finish together decoded in one). Every shape is warmed first, then `repeats` rounds run
    interleaved over all of them and each takes its median: a GPU's clocks ramp up over the first
    calls, which must not land on one size."""
    import torch

    started = time.perf_counter()
    config, runner, applied = step_runner(model_id)
    torch.cuda.synchronize()  # the random weights are made by kernels still queued
    build_s = time.perf_counter() - started
    try:
        with torch.inference_mode():
            seeds = iter(range(0, 10**9, 100))
            prepare = lambda b: runner.prepare(image_specs(config, b, repeats + 2, next(seeds)))  # noqa: E731
            # Enough steps that none finishes while it is timed.
            states = {b: prepare(b) for b in batch_sizes}
            for batch in batch_sizes:
                runner.step(states[batch])
                runner.finish(states[batch])
            times = {(part, b): [] for part in ("step", "prepare", "finish") for b in batch_sizes}
            for _ in range(repeats):
                for batch in batch_sizes:
                    times["step", batch].append(timed(lambda s=states[batch]: runner.step(s)))
                    times["prepare", batch].append(timed(lambda b=batch: prepare(b)))
                    times["finish", batch].append(timed(lambda s=states[batch]: runner.finish(s)))
            median = {name: round(statistics.median(values), 5) for name, values in times.items()}
            del states
        presets = {q: p.num_inference_steps for q, p in config.quality.items() if q in ("standard", "hd", "low")}
        return {"kind": "measured",
                "source": f"benchmarks/full_size.py --curves, {environment()['date']}, {torch.cuda.get_device_name()}, "
                          f"torch {torch.__version__}, random weights at {config.dtype}, {config.default_size}, "
                          f"eager (no compile), options {applied}, median of {repeats} interleaved rounds; "
                          f"built in {build_s:.0f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
                "step_s": {b: median["step", b] for b in batch_sizes},
                "prepare_s": {b: median["prepare", b] for b in batch_sizes},  # one call over b images
                "finish_s": {b: median["finish", b] for b in batch_sizes},
                "steps": presets, "cap": config.batching.max_batch_size}
    finally:
        runner = None
        gc.collect()
        torch.cuda.empty_cache()


def write_curves(models: list[str], path: Path) -> None:
    """Measure each model's curve (`measure_curve`) and rewrite `path` (curves.yaml's layout)
    after each, so a run cut short keeps what it measured; a model that fails is noted, not fatal."""
    import torch
    import yaml

    curves, failed = {}, {}
    for model_id in models:
        torch.cuda.reset_peak_memory_stats()
        try:
            curves[f"{model_id}-{gpu_tag()}"] = measure_curve(model_id)
        except Exception as error:
            failed[model_id] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        gc.collect()
        torch.cuda.empty_cache()
        path.write_text(yaml.safe_dump({"curves": curves, "failed": failed}, sort_keys=False, width=110))
        print(f"{model_id}: {curves.get(f'{model_id}-{gpu_tag()}', {}).get('step_s') or failed[model_id]}",
              flush=True)


def gpu_tag() -> str:
    """`h200` from "NVIDIA H200", `h100` from "NVIDIA H100 80GB HBM3": the curve names' suffix."""
    import torch

    return next((w.lower() for w in torch.cuda.get_device_name().split() if any(c.isdigit() for c in w)), "gpu")


def meta_table() -> str:
    from serve_app.engine import full_size
    from serve_app.engine.pipeline import DTYPES

    lines = ["| model | dtype | component | class | parameters | GB at dtype |", "|---|---|---|---|---:|---:|"]
    for model_id in full_size.CATALOG:
        dtype = model_config(model_id).dtype
        pipeline = full_size.build_pipeline(model_id, "meta", DTYPES[dtype])
        counts, sizes = full_size.parameter_counts(pipeline), full_size.weight_bytes(pipeline)
        for name, count in counts.items():
            module = getattr(pipeline, name)
            lines.append(f"| {model_id} | {dtype} | {name} | {type(module).__name__} | {count:,} | "
                         f"{sizes[name] / 1e9:.2f} |")
        lines.append(f"| **{model_id}** | {dtype} | **all** | | **{sum(counts.values()):,}** | "
                     f"**{sum(sizes.values()) / 1e9:.2f}** |")
    return "\n".join(lines)


def gpu_table(rows: list[Row]) -> str:
    def num(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| model | size | steps | arm | cold start s | s/image (batch 1) | batch | images/s | peak GiB | "
             "note |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.model} | {r.size} | {r.steps} | {r.arm} | {num(r.cold_start_s, 1)} | "
                     f"{num(r.s_per_image)} | {r.batch} | {num(r.images_per_s)} | {num(r.peak_gib, 1)} | {r.note} |")
    return "\n".join(lines)


def environment() -> dict:
    import diffusers
    import torch
    import transformers

    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        env |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return env


def write(name: str, markdown: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".md").write_text(markdown + "\n")
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    return stem


def main() -> None:
    from serve_app.engine.full_size import CATALOG

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meta", action="store_true", help="print the parameter table (no GPU)")
    parser.add_argument("--models", nargs="+", default=list(CATALOG), choices=CATALOG)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--curves", type=Path, metavar="YAML",
                        help="measure each model's step cost curve for the simulator into this file instead")
    args = parser.parse_args()

    env = environment()
    if args.meta:
        table = meta_table()
        print(table)
        print(f"\nwritten: {write('full_size-meta', table, {'environment': env, 'table': table})}.md")
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --meta for the parameter table")
    print(f"{env}\n", flush=True)
    if args.curves:
        write_curves(args.models, args.curves)
        return
    rows: list[Row] = []
    for model_id in args.models:
        for arm in args.arms:
            rows.append(measure_arm(model_id, arm, args.repeats))
            print(gpu_table(rows[-1:]).splitlines()[-1], flush=True)
        rows += measure_step_engine(model_id)
    table = gpu_table(rows)
    print(f"\n{table}")
    stem = write("full_size", table, {"environment": env, "rows": [asdict(r) for r in rows]})
    print(f"\nwritten: {stem}.md")


if __name__ == "__main__":
    main()
