"""What a streamed preview costs, per decoder (`previews:` in the model YAML), against a full VAE decode.

    .venv/bin/python benchmarks/previews.py tiny flops          # in process, ~2 min
    .venv/bin/python benchmarks/previews.py cpu                 # 1024² random weights on this CPU, ~20 min
    .venv/bin/python benchmarks/previews.py laptop              # sd-turbo's architecture, 512², ~10 min
    .venv/bin/python benchmarks/previews.py http [--rounds 15]   # serve run, ~10 min

Sections (any of them, in one run):
- `tiny`: per tiny family at 256², in process, one torch thread: a denoising step, and a preview
  decoded with `full` (the VAE), `tae` (the random tiny autoencoder) and `latent_rgb` (the fitted
  map), repeats interleaved; median CPU and wall ms and the FLOPs torch counts for each.
- `flops`: the production architectures on the meta device (no memory, no time): FLOPs of one
  denoiser step at the model's default size and standard preset (CFG doubles the rows), of a
  full VAE decode, of the published tiny autoencoder's decode (AutoencoderTiny's default layout =
  TAESD's) and of the latent->RGB map. FLOPs carry from this CPU to any GPU; seconds do not.
- `cpu`: the same decoders with random weights on this CPU at 1024² (SD/SDXL's 4-channel VAE and
  SD3/FLUX's 16-channel one), interleaved.
- `laptop`: sd-turbo's architecture (SD 2.1's UNet, OpenCLIP-H text encoder, SD VAE) with random
  weights, float32 on this CPU: s/image through `pipeline(...)` at 512², 1 and 4 steps.
- `http`: a `serve run` of tiny-sd and tiny-flux, each with the three decoders (`<id>-full`,
  `-tae`, `-latent_rgb`): per size (256², 512²) and round, in shuffled order, a plain b64 request
  and a stream with 3 partial images; the cost of 3 previews = median streamed / median plain - 1.
Writes benchmarks/results/previews-<time>.{json,md} and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.serving, run as a script
from benchmarks.serving import start, stop, variant  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TINY = ("tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux")
DECODERS = ("full", "tae", "latent_rgb")


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def tiny_runner(model_id: str, decoder: str):
    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine
    from serve_app.engine.runners import make_runner

    config = load_model_config(ROOT / "models" / f"{model_id}.yaml")
    previews = config.previews.model_copy(update={"decoder": decoder})
    return make_runner(DiffusersEngine(config.model_copy(update={"previews": previews})))


def tiny(repeats: int = 15) -> dict:
    import torch

    from serve_app.engine.previews import count_flops
    from serve_app.engine.runners import ImageSpec

    out = {}
    for model_id in TINY:
        runner = tiny_runner(model_id, "full")
        decoders = {"full": None}
        for name in ("tae", "latent_rgb"):
            decoders[name] = tiny_runner(model_id, name).preview_decoder
        # One thread: CPU time then stays this process's work on a shared machine (with two, OpenMP
        # threads spin while waiting for a descheduled sibling, and that counts as CPU time too).
        torch.set_num_threads(1)
        with torch.inference_mode():
            state = runner.prepare([ImageSpec("a fox", None, 256, 256, 10 * repeats, 5.0, 0)])[0]
            runner.step([state])
            times: dict[str, list[float]] = {"step": [], **{d: [] for d in decoders}}
            cpu_times: dict[str, list[float]] = {name: [] for name in times}
            flops = {}
            for name, decoder in decoders.items():
                runner.preview_decoder = decoder
                runner.preview(state)  # warm-up
                flops[name] = count_flops(lambda: runner.preview(state))  # noqa: B023 - called at once
            flops["step"] = count_flops(lambda: runner.step([state]))  # noqa: B023 - called at once
            for _ in range(repeats):
                calls = [("step", lambda: runner.step([state]))]  # noqa: B023 - called at once
                calls += [(name, functools.partial(previewed, runner, decoder, state))
                          for name, decoder in random.sample(list(decoders.items()), len(decoders))]
                for name, call in calls:
                    started, cpu_started = time.perf_counter(), time.process_time()
                    call()
                    times[name].append(time.perf_counter() - started)
                    cpu_times[name].append(time.process_time() - cpu_started)
        out[model_id] = {"ms": {k: median_ms(v) for k, v in times.items()},
                         "cpu_ms": {k: median_ms(v) for k, v in cpu_times.items()}, "flops": flops}
        print(model_id, json.dumps(out[model_id]), flush=True)
    return out


def previewed(runner, decoder, state):
    runner.preview_decoder = decoder
    return runner.preview(state)


# --- the production architectures ----------------------------------------------------------

def denoiser_inputs(model_id: str, config, device: str, dtype):
    """One standard-preset step's denoiser arguments at the default size (CFG: two rows)."""
    import torch

    width, height = map(int, config.default_size.split("x"))
    preset = config.quality_preset("standard")
    rows = 2 if config.family != "flux" and preset.guidance_scale > 1 else 1
    h, w = height // 8, width // 8
    t = torch.full((rows,), 500.0, device=device)
    if config.family == "flux":
        tokens, length = (h // 2) * (w // 2), config.max_sequence_length or 512
        return {"hidden_states": torch.zeros(1, tokens, 64, device=device, dtype=dtype), "timestep": t / 1000,
                "guidance": torch.full((1,), 3.5, device=device) if model_id == "flux-dev" else None,
                "pooled_projections": torch.zeros(1, 768, device=device, dtype=dtype),
                "encoder_hidden_states": torch.zeros(1, length, 4096, device=device, dtype=dtype),
                "txt_ids": torch.zeros(length, 3, device=device), "img_ids": torch.zeros(tokens, 3, device=device)}
    if config.family == "stable-diffusion-3":
        return {"hidden_states": torch.zeros(rows, 16, h, w, device=device, dtype=dtype), "timestep": t,
                "encoder_hidden_states": torch.zeros(rows, 77 + config.max_sequence_length, 4096, device=device,
                                                     dtype=dtype),
                "pooled_projections": torch.zeros(rows, 2048, device=device, dtype=dtype)}
    xl = config.family == "stable-diffusion-xl"
    inputs = {"sample": torch.zeros(rows, 4, h, w, device=device, dtype=dtype), "timestep": t,
              "encoder_hidden_states": torch.zeros(rows, 77, 2048 if xl else 1024, device=device, dtype=dtype)}
    if xl:
        inputs["added_cond_kwargs"] = {"text_embeds": torch.zeros(rows, 1280, device=device, dtype=dtype),
                                       "time_ids": torch.zeros(rows, 6, device=device, dtype=dtype)}
    return inputs


def decoders_for(model_id: str, device: str, dtype) -> dict:
    """`full` (the model's VAE), `tae` (AutoencoderTiny's default = TAESD's layout, random) and
    `latent_rgb` (the family's published factors), each as latents -> pixels."""
    from diffusers import AutoencoderTiny

    from serve_app.config import PreviewSettings
    from serve_app.engine import full_size, previews

    config = model_config(model_id)
    vae = full_size.build_component(model_id, "vae", device, dtype)
    channels = vae.config.latent_channels
    with full_size._materialise(device, dtype):
        tae = previews.TinyAutoencoder(AutoencoderTiny(latent_channels=channels).eval())
    rgb = previews.build_decoder(PreviewSettings(decoder="latent_rgb"), config.family, vae, device, model_id)
    full = previews.vae_pixels(vae)
    return {"full": lambda z, h, w: full(z), "tae": tae.decode, "latent_rgb": rgb.decode, "channels": channels}


def model_config(model_id: str):
    from serve_app.config import load_model_config

    return load_model_config(ROOT / "models" / f"{model_id}.yaml")


def flops() -> dict:
    import torch

    from serve_app.engine import full_size
    from serve_app.engine.pipeline import DTYPES
    from serve_app.engine.previews import count_flops

    out = {}
    for model_id in full_size.CATALOG:
        config = model_config(model_id)
        dtype = DTYPES[config.dtype]
        width, height = map(int, config.default_size.split("x"))
        name = "transformer" if config.family in ("flux", "stable-diffusion-3") else "unet"
        denoiser = full_size.build_component(model_id, name, "meta", dtype)
        decoders = decoders_for(model_id, "meta", dtype)
        latents = torch.zeros(1, decoders.pop("channels"), height // 8, width // 8, device="meta", dtype=dtype)
        with torch.inference_mode():
            row = {"size": config.default_size,
                   "step": count_flops(lambda: denoiser(**denoiser_inputs(model_id, config, "meta", dtype)))}  # noqa: B023
            for decoder, decode in decoders.items():
                row[decoder] = count_flops(lambda: decode(latents, height, width))  # noqa: B023
        out[model_id] = row
        print(model_id, json.dumps(row), flush=True)
    return out


def cpu(repeats: int = 2) -> dict:
    import torch

    out = {}
    for model_id, label in (("sdxl", "4-channel VAE (SD, SDXL)"), ("flux-dev", "16-channel VAE (SD3, FLUX)")):
        decoders = decoders_for(model_id, "cpu", torch.float32)
        latents = torch.randn(1, decoders.pop("channels"), 128, 128, generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {d: [] for d in decoders}
        cpu_times: dict[str, list[float]] = {d: [] for d in decoders}
        with torch.inference_mode():
            for _ in range(repeats):
                for name, decode in random.sample(list(decoders.items()), len(decoders)):
                    started, cpu_started = time.perf_counter(), time.process_time()
                    decode(latents, 1024, 1024)
                    times[name].append(time.perf_counter() - started)
                    cpu_times[name].append(time.process_time() - cpu_started)
                    print(model_id, name, f"{times[name][-1]:.2f} s, {cpu_times[name][-1]:.2f} CPU-s", flush=True)
        out[label] = {name: statistics.median(v) for name, v in times.items()}
        out[label]["cpu"] = {name: statistics.median(v) for name, v in cpu_times.items()}
    return out


def laptop(repeats: int = 2) -> dict:
    """sd-turbo's architecture with random weights, float32, this CPU, 512²: its parts (prompt
    encoding, one UNet step, the VAE decode) and whole `pipeline(...)` calls at 1 and 4 steps.
    Wall seconds (best and median of the repeats: others' load only adds time) and CPU seconds
    (this process's, all threads): on a shared machine the CPU time barely moves with the load,
    and CPU seconds / cores is the wall time of an idle machine with that many such cores."""
    import torch

    from serve_app.engine import full_size

    started = time.perf_counter()
    pipeline = full_size.build_pipeline("sd-turbo", "cpu", torch.float32)
    out: dict = {"build_s": time.perf_counter() - started, "threads": torch.get_num_threads()}
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 64, 64, generator=generator)
    parts = {
        "encode_prompt": lambda: pipeline.encode_prompt("a lighthouse at dusk", "cpu", 1, False),
        "unet_step": lambda: pipeline.unet(latents, torch.tensor([999]), torch.zeros(1, 77, 1024)),
        "vae_decode": lambda: pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor),
        "1_step": lambda: pipeline(prompt="a lighthouse at dusk", width=512, height=512, num_inference_steps=1,
                                   guidance_scale=0.0, generator=torch.Generator().manual_seed(1)),
        "4_step": lambda: pipeline(prompt="a lighthouse at dusk", width=512, height=512, num_inference_steps=4,
                                   guidance_scale=0.0, generator=torch.Generator().manual_seed(1)),
    }
    times: dict[str, list[float]] = {name: [] for name in parts}
    cpu_times: dict[str, list[float]] = {name: [] for name in parts}
    with torch.inference_mode():
        parts["1_step"]()  # warm-up
        for _ in range(repeats):
            for name, run in random.sample(list(parts.items()), len(parts)):
                started, cpu_started = time.perf_counter(), time.process_time()
                run()
                times[name].append(time.perf_counter() - started)
                cpu_times[name].append(time.process_time() - cpu_started)
                print(f"sd-turbo {name}: {times[name][-1]:.1f} s, {cpu_times[name][-1]:.1f} CPU-s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
    for name, values in times.items():
        out[name] = {"best_s": min(values), "median_s": statistics.median(values),
                     "cpu_s": statistics.median(cpu_times[name])}
    return out


# --- over HTTP ------------------------------------------------------------------------------

def preview_variants() -> list[dict]:
    """tiny-sd and tiny-flux once per preview decoder, as `<id>-<decoder>`."""
    variants = []
    for model_id in ("tiny-sd", "tiny-flux"):
        for decoder in DECODERS:
            config = variant(model_id, f"{model_id}-{decoder}")
            variants.append({**config, "previews": {**config["previews"], "decoder": decoder}})
    return variants


def http_medians(samples: dict[tuple, list[float]]) -> dict:
    out: dict = {}
    for (model, size, kind), values in samples.items():
        if values:
            out.setdefault(model, {}).setdefault(size, {})[kind] = statistics.median(values)
    for sizes in out.values():
        for row in sizes.values():
            row["previews_cost"] = row["stream3"] / row["plain"] - 1
    return out


async def measure_http(base: str, rounds: int) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        async def plain(model: str, size: str) -> float:
            body = {"model": model, "prompt": "a lighthouse at dusk", "size": size, "response_format": "b64_json",
                    "output_format": "jpeg", "seed": 1}
            started = time.perf_counter()
            response = await http.post("/v1/images/generations", json=body)
            response.raise_for_status()
            return time.perf_counter() - started

        async def streamed(model: str, size: str) -> float:
            body = {"model": model, "prompt": "a lighthouse at dusk", "size": size, "stream": True,
                    "partial_images": 3, "output_format": "jpeg", "seed": 1}
            started = time.perf_counter()
            async with http.stream("POST", "/v1/images/generations", json=body) as response:
                async for line in response.aiter_lines():
                    if line.endswith(".completed"):
                        return time.perf_counter() - started
            raise RuntimeError(f"{model}: the stream ended without a completed event")

        arms = [(f"{m}-{d}", size, kind) for m in ("tiny-sd", "tiny-flux") for d in DECODERS
                for size in ("256x256", "512x512") for kind in ("plain", "stream3")]
        samples: dict[tuple, list[float]] = {arm: [] for arm in arms}
        for round_index in range(rounds):
            for arm in random.Random(round_index).sample(arms, len(arms)):
                model, size, kind = arm
                samples[arm].append(await (plain if kind == "plain" else streamed)(model, size))
            # Every finished round on disk: a run cut short (a busy machine) still has its medians.
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "previews-http-partial.json").write_text(json.dumps(
                {"rounds_done": round_index + 1, "medians": http_medians(samples),
                 "samples": {" ".join(arm): v for arm, v in samples.items()}}, indent=2))
            print(f"round {round_index + 1}/{rounds} done", json.dumps(http_medians(samples)), flush=True)
    return http_medians(samples)


def http(rounds: int) -> dict:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain kill still stops the server below
    # Ray's own temp dir: a `serve run` must never find and join another session's cluster.
    ray_tmp = Path(tempfile.mkdtemp(prefix="artserve-ray-"))
    with tempfile.TemporaryDirectory() as tmp:
        process, base = start(Path(tmp), ray_tmp, preview_variants())
        try:
            return asyncio.run(measure_http(base, rounds))
        finally:
            stop(process, ray_tmp)
            shutil.rmtree(ray_tmp, ignore_errors=True)


# --- tables ---------------------------------------------------------------------------------

def tables(results: dict) -> str:
    lines: list[str] = []
    if "tiny" in results:
        lines += ["| tiny model, 256², in process, CPU ms (wall ms) | step | full preview | tae | latent_rgb | "
                  "preview/step: full | tae | latent_rgb | FLOPs vs full: tae | latent_rgb |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for model, row in results["tiny"].items():
            ms, wall, fl = row["cpu_ms"], row["ms"], row["flops"]
            cells = " | ".join(f"{ms[k]:.1f} ({wall[k]:.1f})" for k in ("step", "full", "tae", "latent_rgb"))
            lines.append(f"| {model} | {cells} | {ms['full'] / ms['step']:.2f} | {ms['tae'] / ms['step']:.2f} | "
                         f"{ms['latent_rgb'] / ms['step']:.3f} | {fl['tae'] / fl['full']:.3f} | "
                         f"{fl['latent_rgb'] / fl['full']:.1e} |")
    if "flops" in results:
        lines += ["", "| production architecture | size | denoiser step TFLOPs | full decode | tae | latent_rgb | "
                  "full / step | tae / step | tae / full |", "|---|---|---|---|---|---|---|---|---|"]
        for model, row in results["flops"].items():
            lines.append(f"| {model} | {row['size']} | {row['step'] / 1e12:.2f} | {row['full'] / 1e12:.2f} | "
                         f"{row['tae'] / 1e12:.3f} | {row['latent_rgb'] / 1e12:.1e} | "
                         f"{row['full'] / row['step']:.2f} | "
                         f"{row['tae'] / row['step']:.3f} | {row['tae'] / row['full']:.3f} |")
    if "cpu" in results:
        lines += ["", "| 1024², random weights, this CPU, CPU s (wall s) | full VAE decode | tae | latent_rgb | "
                  "tae / full |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {row['cpu']['full']:.1f} ({row['full']:.1f}) | {row['cpu']['tae']:.2f} "
                  f"({row['tae']:.2f}) | {row['cpu']['latent_rgb']:.3f} ({row['latent_rgb']:.3f}) | "
                  f"{row['cpu']['tae'] / row['cpu']['full']:.3f} |" for label, row in results["cpu"].items()]
    if "laptop" in results:
        row = results["laptop"]
        lines += ["", f"| sd-turbo's architecture, random weights, float32, this CPU ({row['threads']} threads), "
                  "512² | wall s, best | wall s, median | CPU s (median) |", "|---|---|---|---|"]
        parts = ("encode_prompt", "unet_step", "vae_decode", "1_step", "4_step")
        lines += [f"| {name.replace('_', ' ')} | {row[name]['best_s']:.1f} | {row[name]['median_s']:.1f} | "
                  f"{row[name]['cpu_s']:.1f} |" for name in parts]
    if "http" in results:
        lines += ["", "| over HTTP, medians, s | size | plain | stream, 3 previews | 3 previews cost |",
                  "|---|---|---|---|---|"]
        for model, sizes in results["http"].items():
            for size, row in sizes.items():
                lines.append(f"| {model} | {size} | {row['plain']:.3f} | {row['stream3']:.3f} | "
                             f"{100 * row['previews_cost']:+.1f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sections", nargs="+", choices=["tiny", "flops", "cpu", "laptop", "http"])
    parser.add_argument("--rounds", type=int, default=15, help="http: interleaved rounds")
    parser.add_argument("--repeats", type=int, default=2, help="cpu, laptop: repeats")
    parser.add_argument("--tiny-repeats", type=int, default=15, help="tiny: interleaved repeats")
    args = parser.parse_args()
    runs = {"tiny": lambda: tiny(args.tiny_repeats), "flops": flops, "cpu": lambda: cpu(args.repeats),
            "laptop": lambda: laptop(args.repeats),
            "http": lambda: http(args.rounds)}
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": os.getloadavg()}
    for section in args.sections:
        results[section] = runs[section]()
    results["load_average_after"] = os.getloadavg()
    text = tables(results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"previews-{stamp}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"previews-{stamp}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
