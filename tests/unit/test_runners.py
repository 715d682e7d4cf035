"""The step engine's runner adapters against diffusers' own `pipeline(...)`, per family: a
request alone gives the pipeline's image for the same inputs and seed; sharing the batch
with others (other seeds, steps and guidance, joining at other steps) stays within one
level. Run with the tiny models' schedulers and with each production scheduler config."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from serve_app.config import load_model_config

MODELS = Path(__file__).resolve().parents[2] / "models"
SIZE = 128  # small and fast; every family's multiple

# The catalog's scheduler/scheduler_config.json (Hub repos at the revisions pinned in models/).
EULER = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "interpolation_type": "linear",
         "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1, "use_karras_sigmas": False}
PRODUCTION_SCHEDULERS = {
    # FLUX.1-dev: resolution-dependent shift (mu from the image's token count)
    "flux-dev": ("tiny-flux", "FlowMatchEulerDiscreteScheduler", {
        "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
        "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}),
    "flux-schnell": ("tiny-flux", "FlowMatchEulerDiscreteScheduler", {
        "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
        "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}),
    "sdxl": ("tiny-sdxl", "EulerDiscreteScheduler", {**EULER, "timestep_spacing": "leading"}),
    # SDXL-Turbo: ancestral Euler draws fresh noise at every step from the image's own generator
    "sdxl-turbo": ("tiny-sdxl", "EulerAncestralDiscreteScheduler", {**EULER, "timestep_spacing": "trailing"}),
    "sd3.5-large": ("tiny-sd3", "FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
}


def level_difference(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def load(model_id: str, scheduler: tuple[str, dict] | None = None):
    import diffusers

    from serve_app.engine.pipeline import DiffusersEngine
    from serve_app.engine.runners import make_runner

    engine = DiffusersEngine(load_model_config(MODELS / f"{model_id}.yaml"))
    if scheduler:
        engine.pipeline.scheduler = getattr(diffusers, scheduler[0]).from_config(scheduler[1])
    return engine, make_runner(engine)


def check_parity(engine, runner, guidance: float, steps: int = 6, negative: str | None = None) -> tuple[int, int]:
    from serve_app.engine.pipeline import PipelineInputs
    from serve_app.engine.runners.base import ImageSpec, run_together

    spec = ImageSpec("a red fox in the snow", negative, SIZE, SIZE, steps, guidance, seed=1234)
    [reference] = engine.generate(PipelineInputs(SIZE, SIZE, steps, guidance, [spec.prompt], [negative], [1234]))
    [alone] = run_together(runner, [spec])
    others = [ImageSpec("a blue bird", None, SIZE, SIZE, steps + 3, guidance * 1.5 + 0.5, seed=7),
              ImageSpec("a castle", None, SIZE, SIZE, max(1, steps - 3), guidance, seed=99)]
    shared = run_together(runner, [others[0], spec, others[1]], join_at=[0, 2, 1])[1]
    return level_difference(reference, alone), level_difference(alone, shared)


@pytest.mark.parametrize("model_id,guidance", [("tiny-sd", 7.5), ("tiny-sd", 0.0), ("tiny-sdxl", 5.0),
                                                ("tiny-sd3", 4.5), ("tiny-flux", 3.5)])
def test_alone_equals_the_pipeline_and_shared_stays_within_one_level(model_id, guidance):
    engine, runner = load(model_id)
    alone, shared = check_parity(engine, runner, guidance)
    print(f"{model_id} guidance {guidance}: alone vs pipeline {alone} levels, shared vs alone {shared}")
    assert alone <= 1
    assert shared <= 1


def test_negative_prompt_parity():
    engine, runner = load("tiny-sd")
    alone, shared = check_parity(engine, runner, 7.5, negative="blurry, low quality")
    assert alone <= 1 and shared <= 1


@pytest.mark.parametrize("catalog_model", list(PRODUCTION_SCHEDULERS))
def test_parity_with_each_production_scheduler_config(catalog_model):
    model_id, scheduler_class, config = PRODUCTION_SCHEDULERS[catalog_model]
    engine, runner = load(model_id, (scheduler_class, config))
    guidance = {"tiny-flux": 3.5, "tiny-sd3": 3.5, "tiny-sdxl": 0.0 if catalog_model == "sdxl-turbo" else 5.0}[model_id]
    alone, shared = check_parity(engine, runner, guidance, steps=4)
    print(f"{catalog_model} scheduler on {model_id}: alone vs pipeline {alone} levels, shared vs alone {shared}")
    assert alone <= 1
    assert shared <= 1


def test_flux_dev_shift_depends_on_the_resolution():
    from serve_app.engine.runners.base import ImageSpec

    _, runner = load("tiny-flux", PRODUCTION_SCHEDULERS["flux-dev"][1:])
    small, large = (runner.prepare([ImageSpec("x", None, side, side, 4, 3.5, 1)])[0] for side in (128, 512))
    assert float(small.timesteps[1]) != float(large.timesteps[1])  # dynamic shifting really ran


def test_a_step_runs_one_denoiser_call_for_the_whole_batch():
    from serve_app.engine.runners.base import ImageSpec

    engine, runner = load("tiny-sd")
    calls = []
    unet_forward = engine.pipeline.unet.forward

    def counting_forward(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return unet_forward(sample, *args, **kwargs)

    engine.pipeline.unet.forward = counting_forward
    states = runner.prepare([ImageSpec("a", None, SIZE, SIZE, 3, 7.5, s) for s in (1, 2, 3)])
    runner.step(states)
    assert calls == [6]  # three images, CFG: one call of 2 x 3 rows
    assert all(s.index == 1 for s in states)


def test_batch_key_separates_sizes_and_cfg_but_not_steps_or_guidance():
    from serve_app.engine.runners.base import ImageSpec

    _, runner = load("tiny-sd")
    key = runner.batch_key(ImageSpec("a", None, 256, 256, 25, 7.5, 1))
    assert key == runner.batch_key(ImageSpec("b", "n", 256, 256, 50, 5.0, 2))
    assert key != runner.batch_key(ImageSpec("a", None, 512, 256, 25, 7.5, 1))
    assert key != runner.batch_key(ImageSpec("a", None, 256, 256, 25, 1.0, 1))  # CFG off: one pass


def test_generic_pipelines_and_the_call_policy_use_whole_calls():
    from serve_app.engine.pipeline import DiffusersEngine
    from serve_app.engine.runners import WholeCallRunner, make_runner

    assert isinstance(make_runner(DiffusersEngine(load_model_config(MODELS / "tiny-pixart.yaml"))), WholeCallRunner)
    config = load_model_config(MODELS / "tiny-flux.yaml")
    config = config.model_copy(update={"batching": config.batching.model_copy(update={"policy": "call"}),
                                       "edits": config.edits.model_copy(update={"enabled": False})})
    assert isinstance(make_runner(DiffusersEngine(config)), WholeCallRunner)


def test_counting_tokens_on_another_thread_never_changes_an_encoded_prompt():
    """The replica counts usage tokens on its event loop while the step loop's thread encodes
    prompts: a shared fast tokenizer's padding state raced (FLUX batches failed on a 14-token
    prompt among 128-token ones). 200 encodes against a counting thread: every one padded."""
    import torch

    from serve_app.engine.runners.base import ImageSpec

    engine, runner = load("tiny-flux")
    stop, counts = threading.Event(), set()

    def count():
        while not stop.is_set():
            counts.add(engine.count_tokens("a lighthouse at dusk"))

    counter = threading.Thread(target=count)
    counter.start()
    try:
        with torch.inference_mode():
            lengths = {runner.encode(ImageSpec("a lighthouse at dusk", None, 256, 256, 4, 3.5, 0))["prompt"].shape[1]
                       for _ in range(200)}
    finally:
        stop.set()
        counter.join()
    assert lengths == {runner.max_sequence_length}
    assert len(counts) == 1  # and the count itself never saw the encoder's padding


def test_image_spec_image_is_the_first_of_images():
    """`image` (what the one-image families edit from) and `images` (every input) stay one truth."""
    from PIL import Image

    from serve_app.engine.runners.base import ImageSpec

    a, b = Image.new("RGB", (8, 8)), Image.new("RGB", (16, 8))
    assert ImageSpec("p", None, 64, 64, 2, 1.0, 0, images=(a, b)).image is a
    assert ImageSpec("p", None, 64, 64, 2, 1.0, 0, image=a).images == (a,)
    assert ImageSpec("p", None, 64, 64, 2, 1.0, 0).images == ()
    with pytest.raises(ValueError, match="images"):
        ImageSpec("p", None, 64, 64, 2, 1.0, 0, image=b, images=(a, b))
