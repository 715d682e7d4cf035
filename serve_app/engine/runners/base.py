"""What every runner shares: the per-image state and the step that advances a batch.

A runner adapts one diffusers family to the step engine, with tensors only:
- `prepare(specs)`: encode prompts (once per distinct prompt), initial latents from each
  image's own seeded generator exactly as the pipeline makes them, and each image's own
  deep copy of the pipeline's scheduler, set to its own step count;
- `step(states)`: ONE denoiser forward over every state (per-sample timesteps and
  guidance), then each image's scheduler step on its own slice;
- `finish(states)`: VAE decode to PIL images.
Only the denoiser call is batched; everything per image runs on its own slice with the
pipeline's own arithmetic, so an image alone is the pipeline's image, bit for bit.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from PIL import Image

from serve_app.config import ModelConfig


@dataclass(frozen=True)
class ImageSpec:
    """One image to make: plain data, the runner's whole input."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    # Edits: the input image (PIL, RGB, width x height), the mask (PIL, L, 255 = repaint,
    # 0 = keep: diffusers' convention) and the strength; None/None/1.0 for a generation.
    image: Any = None
    mask: Any = None
    strength: float = 1.0


@dataclass(eq=False)
class DenoiseState:
    """One image in flight: its latents, its own scheduler and generator, its conditioning."""

    spec: ImageSpec
    generator: torch.Generator
    scheduler: Any
    timesteps: torch.Tensor
    latents: torch.Tensor
    cond: dict[str, Any] = field(default_factory=dict)  # family-specific tensors
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    index: int = 0  # next timestep to run
    x0: torch.Tensor | None = None  # the last step's estimate of the final latents (previews)

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def remaining(self) -> int:
        return len(self.timesteps) - self.index

    @property
    def t(self) -> torch.Tensor:
        return self.timesteps[self.index]


class Runner:
    """Base class of the per-family adapters (sd.py, sd3.py, flux.py)."""

    #: whether this family runs classifier-free guidance (two passes) at guidance > 1
    cfg_family = True
    #: the pipeline calls scheduler.set_begin_index(0) after setting timesteps
    sets_begin_index = False
    #: the pipeline's fallback for a scheduler config without max_shift
    default_max_shift = 1.15

    def __init__(self, pipeline: Any, model: ModelConfig, device: str):
        self.pipe = pipeline
        self.model = model
        self.device = torch.device(device)

    # -- the contract ---------------------------------------------------------------
    def batch_key(self, spec: ImageSpec) -> Hashable:
        """Images share a denoiser call only with equal keys: one size, CFG on or off."""
        return (spec.width, spec.height, self.uses_cfg(spec))

    def prepare(self, specs: list[ImageSpec]) -> list[DenoiseState]:
        encoded: dict[tuple, dict[str, Any]] = {}
        states = []
        for spec in specs:
            text_key = (spec.prompt, spec.negative_prompt, self.uses_cfg(spec))
            if text_key not in encoded:
                encoded[text_key] = self.encode(spec)
            states.append(self.initial_state(spec, encoded[text_key]))
        return states

    def step(self, states: list[DenoiseState]) -> None:
        outputs = self.denoise(states)
        for state, output in zip(states, outputs, strict=True):
            stepped = state.scheduler.step(output, state.t, state.latents, **state.step_kwargs)
            state.x0 = self.estimate(state, output, stepped)
            state.latents = stepped.prev_sample
            state.index += 1

    def finish(self, states: list[DenoiseState]) -> list[Image.Image]:
        latents = torch.cat([s.latents for s in states])
        return self.decode(latents, states)

    def preview(self, state: DenoiseState) -> Image.Image:
        """The current estimate of the final image (the scheduler's x0 prediction), decoded
        by the model's own VAE: what a streamed partial image shows."""
        return self.decode(state.x0 if state.x0 is not None else state.latents, [state])[0]

    def estimate(self, state: DenoiseState, output: torch.Tensor, stepped: Any) -> torch.Tensor | None:
        """x0 from the step: the scheduler's own prediction where it gives one (DDIM, Euler)."""
        return getattr(stepped, "pred_original_sample", None)

    # -- what families fill in --------------------------------------------------------
    def encode(self, spec: ImageSpec) -> dict[str, Any]:
        raise NotImplementedError

    def initial_state(self, spec: ImageSpec, cond: dict[str, Any]) -> DenoiseState:
        raise NotImplementedError

    def denoise(self, states: list[DenoiseState]) -> list[torch.Tensor]:
        """One denoiser forward over the batch; each state's model output, in order."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor, states: list[DenoiseState]) -> list[Image.Image]:
        raise NotImplementedError

    # -- helpers ------------------------------------------------------------------------
    def uses_cfg(self, spec: ImageSpec) -> bool:
        return self.cfg_family and spec.guidance > 1

    def generator(self, spec: ImageSpec) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(spec.seed)

    def schedule(self, spec: ImageSpec, **kwargs: Any) -> tuple[Any, torch.Tensor]:
        """The image's own copy of the pipeline's scheduler, set to its own steps."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        timesteps, _ = retrieve_timesteps(scheduler, spec.steps, self.device, **kwargs)
        if self.sets_begin_index and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return scheduler, timesteps

    def resolution_shift(self, image_seq_len: int) -> dict[str, float]:
        """FLUX.1-dev / SD3.5-style dynamic shifting: mu from the image's token count."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {}
        return {"mu": calculate_shift(
            image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", self.default_max_shift),
        )}

    def step_kwargs(self, scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
        """eta/generator for schedulers that take them (DDIM's eta, ancestral Euler's noise),
        as the SD pipelines' `prepare_extra_step_kwargs` does."""
        accepted = inspect.signature(scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = 0.0
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    def timesteps_of(self, states: list[DenoiseState], repeat: int = 1) -> torch.Tensor:
        return torch.stack([s.t for s in states] * repeat)

    def guided(self, states: list[DenoiseState], prediction: torch.Tensor) -> list[torch.Tensor]:
        """Split a (2B or B)-row prediction into per-state outputs, applying each state's own
        CFG scale on its own rows (rows are [uncond x B, cond x B] when CFG is on)."""
        count = len(states)
        if not self.uses_cfg(states[0].spec):
            return [prediction[i : i + 1] for i in range(count)]
        uncond, text = prediction.chunk(2)
        return [
            uncond[i : i + 1] + state.spec.guidance * (text[i : i + 1] - uncond[i : i + 1])
            for i, state in enumerate(states)
        ]

    def cfg_rows(self, states: list[DenoiseState], positive: str, negative: str) -> torch.Tensor:
        """A conditioning tensor for the batch: [negatives..., positives...] under CFG."""
        rows = [s.cond[positive] for s in states]
        if self.uses_cfg(states[0].spec):
            rows = [s.cond[negative] for s in states] + rows
        return torch.cat(rows)


def run_together(runner: Any, specs: list[ImageSpec], join_at: list[int] | None = None) -> list[Image.Image]:
    """Run images through a runner in-process, as the step loop would, each joining the
    batch at its step boundary `join_at[i]` (default: all at once) and leaving when done.
    For tests and benchmarks; the replica's loop is `serve_app.steploop`."""
    join_at = join_at or [0] * len(specs)
    states: list[Any] = [None] * len(specs)
    images: list[Image.Image | None] = [None] * len(specs)
    boundary = 0
    with torch.inference_mode():
        while any(image is None for image in images):
            for i, spec in enumerate(specs):
                if states[i] is None and join_at[i] <= boundary:
                    states[i] = runner.prepare([spec])[0]
            running = [s for s in states if s is not None and not s.done]
            if running:
                runner.step(running)
            for i, state in enumerate(states):
                if state is not None and state.done and images[i] is None:
                    images[i] = runner.finish([state])[0]
            boundary += 1
    return images  # type: ignore[return-value]
