"""LoRA adapters in the step engine, measured in one run on one machine (in process, no Ray).

    .venv/bin/python benchmarks/loras.py [--models tiny-sd tiny-sdxl tiny-sd3 tiny-flux] [--rounds 30]

1. Denoiser call over a batch of 4 at 256²: no adapter / one adapter on every row / four different
   adapters (one per row), per tiny family, arms interleaved round by round; medians and ratios.
2. At the catalog's real shapes (flux-dev, sdxl, sd3.5-large at 1024², on the meta device): the
   FLOPs a rank-16 / rank-64 adapter adds, as a fraction of the denoiser step (attention
   projections only, and every Linear of the blocks).
3. Latency of a short request for adapter b arriving while a long batch of adapter a runs: mixed
   (the batch key stays size + CFG: it joins at the next step) vs adapter-in-the-key (it waits for
   the batch to drain), same arrivals, real step loop.
4. Cold loads of local adapter files while a batch runs: load seconds, and the running batch's
   step time during loads against its step time without (goal: at most 1.1x).
Writes benchmarks/results/loras-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from serve_app.engine.loras.loading import AdapterReader, sha256_of  # noqa: E402
from serve_app.engine.loras.rows import LoraRows  # noqa: E402
from serve_app.engine.runners import STEP_RUNNERS  # noqa: E402
from serve_app.engine.runners.base import ImageSpec  # noqa: E402
from tests.loras import fresh_pipeline, save_adapters, tiny_model  # noqa: E402

GUIDANCE = {"tiny-sd": 7.5, "tiny-sdxl": 5.0, "tiny-sd3": 4.5, "tiny-flux": 3.5}
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def engine(model_id: str, folder: Path, names: list[str]):
    files = save_adapters(model_id, folder / model_id, {n: i + 1 for i, n in enumerate(names)}, text_encoder=False)
    pipe = fresh_pipeline(model_id)
    runner = STEP_RUNNERS[tiny_model(model_id).family](pipe, tiny_model(model_id), "cpu")
    reader = AdapterReader(pipe)
    adapters = {n: reader.read(p, n, sha256_of(p)) for n, p in files.items()}
    runner.loras = LoraRows({a.key: a for a in adapters.values()}.__getitem__)
    return runner, {n: a.key for n, a in adapters.items()}


def denoiser_arms(model_id: str, folder: Path, rounds: int, size: int = 256) -> dict:
    runner, keys = engine(model_id, folder, ["a", "b", "c", "d"])
    arms = {"none": [()] * 4, "one adapter": [((keys["a"], 1.0),)] * 4,
            "4 different": [((keys[n], 1.0),) for n in "abcd"]}
    with torch.inference_mode():
        states = runner.prepare([ImageSpec("a fox", None, size, size, 30, GUIDANCE[model_id], s) for s in range(4)])
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        cfg = 2 if runner.uses_cfg(states[0].spec) else 1
        for round_ in range(rounds + 2):  # two warm-up rounds
            for arm, loras in arms.items():
                for state, row in zip(states, loras, strict=True):
                    state.spec = dataclasses.replace(state.spec, loras=row)
                started = time.perf_counter()
                with runner.loras.batch([s.spec.loras for s in states] * cfg):
                    runner.denoise(states)
                if round_ >= 2:
                    times[arm].append(time.perf_counter() - started)
    medians = {arm: statistics.median(t) * 1000 for arm, t in times.items()}
    return {"model": model_id, "ms": medians, "ratio": {arm: ms / medians["none"] for arm, ms in medians.items()}}


def lora_flops(model_id: str, ranks=(16, 64)) -> dict:
    """The base step's FLOPs (torch's counter) and what rank-r adapters add: 2·tokens·r·(in+out) per layer."""
    from torch.utils.flop_counter import FlopCounterMode

    from serve_app.engine import full_size

    name = "unet" if model_id == "sdxl" else "transformer"
    net = full_size.build_component(model_id, name, "meta")
    meta, dtype = torch.device("meta"), torch.bfloat16
    layers: list[tuple[str, int, int, int]] = []
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: layers.append((n, a[0].numel() // m.in_features,
                                                                         m.in_features, m.out_features)))
             for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]
    z = lambda *shape: torch.zeros(*shape, device=meta, dtype=dtype)  # noqa: E731
    if model_id == "sdxl":
        inputs = dict(sample=z(2, 4, 128, 128), timestep=torch.full((2,), 500.0, device=meta),
                      encoder_hidden_states=z(2, 77, 2048),
                      added_cond_kwargs={"text_embeds": z(2, 1280), "time_ids": z(2, 6)})
    elif model_id == "sd3.5-large":
        inputs = dict(hidden_states=z(2, 16, 128, 128), timestep=torch.full((2,), 500.0, device=meta),
                      encoder_hidden_states=z(2, 333, 4096), pooled_projections=z(2, 2048))
    else:
        inputs = dict(hidden_states=z(1, 4096, 64), encoder_hidden_states=z(1, 512, 4096), pooled_projections=z(1, 768),
                      timestep=torch.full((1,), 0.5, device=meta), guidance=torch.full((1,), 3.5, device=meta),
                      img_ids=z(4096, 3), txt_ids=z(512, 3))
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(**inputs, return_dict=False)
    for hook in hooks:
        hook.remove()
    base = counter.get_total_flops()
    in_blocks = [layer for layer in layers if "blocks" in layer[0]]
    sets = {"attention": [la for la in in_blocks if la[0].endswith(ATTENTION)], "all block linears": in_blocks}
    rows = {}
    for label, chosen in sets.items():
        for rank in ranks:
            added = sum(2 * tokens * rank * (fan_in + fan_out) for _, tokens, fan_in, fan_out in chosen)
            rows[f"{label}, rank {rank}"] = {"layers": len(chosen), "added_gflops": added / 1e9,
                                            "fraction": added / base}
    return {"model": model_id, "base_tflops": base / 1e12, "rows": rows}


def loop_for(runner, key_with_loras: bool):
    from serve_app.replica.scheduler import StepScheduler
    from serve_app.replica.steploop import StepLoop

    class Metrics:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    plain = type(runner).batch_key.__get__(runner)
    # vLLM-Omni's choice, for comparison: the adapter is part of the batch key.
    runner.batch_key = (lambda spec: (plain(spec), spec.loras)) if key_with_loras else plain
    return StepLoop(runner, StepScheduler(8), Metrics(), lambda exc: exc)


def submit(loop, runner, request: str, specs: list[ImageSpec]) -> threading.Event:
    from serve_app.replica.scheduler import Ticket
    from serve_app.replica.steploop import Work

    done, left = threading.Event(), [len(specs)]

    def deliver(image, batch: int) -> None:
        left[0] -= 1
        if left[0] == 0:
            done.set()

    loop.submit([Work(Ticket(request, i, runner.batch_key(s), time.monotonic()), s, deliver)
                 for i, s in enumerate(specs)])
    return done


def arrival_latency(model_id: str, folder: Path, repeats: int = 3, size: int = 128) -> dict:
    """A: 4 images x 40 steps with adapter a; B: 1 image x 10 steps with adapter b, arriving after A's 2nd step."""
    results: dict[str, dict[str, list[float]]] = {"mixed": {"a": [], "b": []}, "in the key": {"a": [], "b": []}}
    runner, keys = engine(model_id, folder, ["a", "b"])
    for _ in range(repeats):
        for arm in results:
            loop = loop_for(runner, arm == "in the key")
            a = [ImageSpec("a fox", None, size, size, 40, GUIDANCE[model_id], s, loras=((keys["a"], 1.0),))
                 for s in range(4)]
            b = [ImageSpec("a bird", None, size, size, 10, GUIDANCE[model_id], 9, loras=((keys["b"], 1.0),))]
            started = time.monotonic()
            done_a = submit(loop, runner, "A", a)
            while loop.stats.steps < 2:
                time.sleep(0.001)
            b_at = time.monotonic()
            done_b = submit(loop, runner, "B", b)
            done_b.wait(600)
            results[arm]["b"].append(time.monotonic() - b_at)
            done_a.wait(600)
            results[arm]["a"].append(time.monotonic() - started)
            loop.stop()
    return {arm: {k: statistics.median(v) for k, v in r.items()} for arm, r in results.items()}


def cold_loads(model_id: str, folder: Path, loads: int = 6, size: int = 256) -> dict:
    """Step times of a running batch, inside and outside cold-load windows (a LoraManager loading files)."""
    from serve_app.engine.loras.manager import LoraManager
    from serve_app.job import LoraChoice
    from serve_app.lora_catalog import LoraCatalog

    names = [f"cold{i}" for i in range(loads)]
    save_adapters(model_id, folder / "dir" / model_id, {n: 100 + i for i, n in enumerate(names)}, rank=8)
    pipe = fresh_pipeline(model_id)
    model = tiny_model(model_id).model_copy(update={"max_loaded_loras": loads + 1})
    runner = STEP_RUNNERS[model.family](pipe, model, "cpu")
    loop = loop_for(runner, False)
    manager = LoraManager(pipe, model, LoraCatalog(str(folder / "dir"), {model.id: model}), loop.metrics)
    runner.loras = manager.rows
    steps: list[tuple[float, float]] = []
    step = runner.step

    def timed(states):
        started = time.monotonic()
        step(states)
        steps.append((started, time.monotonic()))

    runner.step = timed
    windows: list[tuple[float, float]] = []

    async def load_all():
        for name in names:
            await asyncio.sleep(0.5)  # steps without a load in between
            started = time.monotonic()
            (await manager.acquire([LoraChoice(name, 1.0, "model")])).release()
            windows.append((started, time.monotonic()))
        await asyncio.sleep(0.5)

    done = submit(loop, runner, "running", [ImageSpec("a fox", None, size, size, 100000, GUIDANCE[model_id], s)
                                            for s in range(2)])
    while len(steps) < 3:
        time.sleep(0.01)
    asyncio.run(load_all())
    loop.cancel("running")
    done.wait(1)
    loop.stop()
    overlaps = lambda s: any(s[0] < w[1] and s[1] > w[0] for w in windows)  # noqa: E731
    during = [e - s for s, e in steps[3:] if overlaps((s, e))]
    outside = [e - s for s, e in steps[3:] if not overlaps((s, e))]
    size_kb = (folder / "dir" / model_id / f"{names[0]}.safetensors").stat().st_size / 1024
    return {"model": model_id, "file_kb": size_kb, "load_s": statistics.median(e - s for s, e in windows),
            "step_ms_outside": statistics.mean(outside) * 1000, "step_ms_during": statistics.mean(during) * 1000,
            "ratio": statistics.mean(during) / statistics.mean(outside), "steps_during": len(during)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(GUIDANCE))
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        report["denoiser"] = [denoiser_arms(m, folder, args.rounds) for m in args.models]
        report["flops"] = [lora_flops(m) for m in ("flux-dev", "sdxl", "sd3.5-large")]
        report["arrival"] = {m: arrival_latency(m, folder) for m in ("tiny-sd", "tiny-flux")}
        report["cold"] = [cold_loads(m, folder) for m in ("tiny-sd", "tiny-flux")]
    md = markdown(report)
    print(md)
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results / f"loras-{stamp}.json").write_text(json.dumps(report, indent=2))
    (results / f"loras-{stamp}.md").write_text(md)


def markdown(report: dict) -> str:
    lines = ["| denoiser call, batch 4, 256² | none ms | one adapter ms | 4 different ms | one / none "
             "| 4 diff / none |", "|---|---|---|---|---|---|"]
    for r in report["denoiser"]:
        ms, ratio = r["ms"], r["ratio"]
        lines.append(f"| {r['model']} | {ms['none']:.1f} | {ms['one adapter']:.1f} | {ms['4 different']:.1f} | "
                     f"{ratio['one adapter']:.2f}x | {ratio['4 different']:.2f}x |")
    lines += ["", "| catalog model, 1024² (meta) | base TFLOPs/step | adapter | layers | added GFLOPs | fraction |",
              "|---|---|---|---|---|---|"]
    for r in report["flops"]:
        for label, row in r["rows"].items():
            lines.append(f"| {r['model']} | {r['base_tflops']:.2f} | {label} | {row['layers']} | "
                         f"{row['added_gflops']:.1f} | {100 * row['fraction']:.2f} % |")
    lines += ["", "| b arrives during a's batch (A: 4 x 40 steps, B: 1 x 10) | arm | B latency s | A latency s |",
              "|---|---|---|---|"]
    for model, arms in report["arrival"].items():
        for arm, r in arms.items():
            lines.append(f"| {model} | {arm} | {r['b']:.2f} | {r['a']:.2f} |")
    lines += ["", "| cold loads while a batch of 2 runs (256²) | file KB | load s (median) | step ms without | "
              "step ms during | during / without |", "|---|---|---|---|---|---|"]
    for r in report["cold"]:
        lines.append(f"| {r['model']} | {r['file_kb']:.0f} | {r['load_s']:.3f} | {r['step_ms_outside']:.1f} | "
                     f"{r['step_ms_during']:.1f} ({r['steps_during']} steps) | {r['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
