"""Runner adapters: one per diffusers family (the step engine), plus the whole-call path."""

from __future__ import annotations

from serve_app.engine import previews
from serve_app.engine.pipeline import DiffusersEngine
from serve_app.engine.runners.base import DenoiseState, ImageSpec, Runner
from serve_app.engine.runners.flow import FluxRunner, StableDiffusion3Runner
from serve_app.engine.runners.flux2 import Flux2Runner
from serve_app.engine.runners.qwen import QwenImageEditRunner, QwenImageRunner
from serve_app.engine.runners.sd import StableDiffusionRunner, StableDiffusionXLRunner
from serve_app.engine.runners.whole_call import WholeCallRunner

STEP_RUNNERS: dict[str, type[Runner]] = {
    "stable-diffusion": StableDiffusionRunner,
    "stable-diffusion-xl": StableDiffusionXLRunner,
    "stable-diffusion-3": StableDiffusion3Runner,
    "flux": FluxRunner,
    "flux2": Flux2Runner,
    "qwen-image": QwenImageRunner,
    "qwen-image-edit": QwenImageEditRunner,
}

__all__ = ["STEP_RUNNERS", "DenoiseState", "ImageSpec", "Runner", "WholeCallRunner", "make_runner"]


def make_runner(engine: DiffusersEngine) -> Runner | WholeCallRunner:
    """The model's step runner, or the whole-call path for `generic` pipelines and
    `batching.policy: call`."""
    model = engine.model
    if model.batching.policy != "call" and model.family in STEP_RUNNERS:
        runner = STEP_RUNNERS[model.family](engine.pipeline, model, engine.device)
        # At start, not at the first streamed request: a TAE download, a latent->RGB fit.
        runner.preview_decoder = previews.build_decoder(model.previews, model.family,
                                                        getattr(engine.pipeline, "vae", None), engine.device, model.id)
        return runner
    return WholeCallRunner(engine)
