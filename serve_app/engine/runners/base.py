"""What every runner shares: the per-image state and the step that advances a batch.

A runner adapts one diffusers family to the step engine, with tensors only:
- `prepare(specs)`: encode prompts (once per distinct prompt), initial latents from each
  image's own seeded generator exactly as the pipeline makes them, and each image's own
  deep copy of the pipeline's scheduler, set to its own step count;
- `step(states)`: ONE denoiser forward over every state (per-sample timesteps and
  guidance), then each image's scheduler step on its own slice;
- `finish(states)`: VAE decode to PIL images (an inpainting's kept region: the input's own pixels);
- `preview(state)`: the current estimate of the final image, decoded cheaply (engine/previews.py).
Edits (image-to-image, masked inpainting) are the same loop, as diffusers' Img2Img and Inpaint
pipelines run it with a base (non-inpainting) denoiser: the input image's latents noised to
the first timestep that runs, the schedule's last part only, and for a mask, after every step,
the kept region reset to the input's latents noised to the next timestep.
Only the denoiser call is batched; everything per image runs on its own slice with the
pipeline's own arithmetic, so an image alone is the pipeline's image, bit for bit.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from serve_app.config import ModelConfig
from serve_app.engine import composite
from serve_app.engine.loras.rows import LoraRows

logger = logging.getLogger("ray.serve")


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
    # Edits: the first input image (PIL, RGB), the mask (PIL, L, width x height, 255 = repaint,
    # 0 = keep: diffusers' convention) and the strength; None/None/1.0 for a generation. The
    # families that edit from one image (SD, SDXL, SD3, FLUX.1) start from `image`, already
    # width x height; reference families (config.REFERENCE_FAMILIES) condition on every image of
    # `images`, each at its own size (their pipelines resize references themselves).
    image: Any = None
    mask: Any = None
    strength: float = 1.0
    images: tuple[Any, ...] = ()  # every input image, in request order; images[0] is `image`
    # LoRA adapters, stacked: (key of a loaded adapter, scale) pairs (engine/loras/); () for none.
    loras: tuple[tuple[str, float], ...] = ()
    # Inpainting: return the input's own pixels where the mask keeps them (engine/composite.py);
    # False: the model's raw output, diffusers' Inpaint pipelines' image.
    preserve_unmasked: bool = True

    def __post_init__(self) -> None:
        # One source of truth for the first image, whichever of the two fields the caller gave.
        if self.images:
            if self.image is not None and self.image is not self.images[0]:
                raise ValueError("ImageSpec: image must be images[0]")
            object.__setattr__(self, "image", self.images[0])
        elif self.image is not None:
            object.__setattr__(self, "images", (self.image,))


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
    # Inpainting: the input image's latents, the noise they were noised with, and the mask at
    # latent resolution (1 = repaint, 0 = keep); all None for generations and image-to-image.
    image_latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None
    mask: torch.Tensor | None = None

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
    #: the Inpaint pipeline starts from pure noise at strength 1.0 (FLUX's noises the image)
    inpaint_from_noise = True
    #: applies each image's LoRA adapters to its own rows; the replica sets its manager's
    loras: LoraRows = LoraRows(lambda key: _no_adapters(key))
    #: what previews are decoded with (engine/previews.py; set by make_runner); None: the VAE
    preview_decoder: Any = None

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
            text_key = (spec.prompt, spec.negative_prompt, self.uses_cfg(spec), spec.loras)
            if text_key not in encoded:
                with self.loras.prompt(spec.loras):  # an adapter's text-encoder part, for this prompt
                    encoded[text_key] = self.encode(spec)
            states.append(self.initial_state(spec, encoded[text_key]))
        return states

    def step(self, states: list[DenoiseState]) -> None:
        # Each image's adapters on its own rows: [uncond x B, cond x B] under CFG, B rows otherwise.
        rows = [s.spec.loras for s in states] * (2 if self.uses_cfg(states[0].spec) else 1)
        with self.loras.batch(rows):
            outputs = self.denoise(states)
        for state, output in zip(states, outputs, strict=True):
            stepped = state.scheduler.step(output, state.t, state.latents, **state.step_kwargs)
            state.x0 = self.estimate(state, output, stepped)
            state.latents = stepped.prev_sample
            state.index += 1
            if state.mask is not None:
                state.latents = self.blend(state, state.latents, noised=not state.done)
                if state.x0 is not None:  # previews show the kept region as it will end
                    state.x0 = self.blend(state, state.x0, noised=False)

    def finish(self, states: list[DenoiseState]) -> list[Image.Image]:
        latents = torch.cat([s.latents for s in states])
        return [self.kept_pixels(s, image) for s, image in zip(states, self.decode(latents, states), strict=True)]

    def preview(self, state: DenoiseState) -> Image.Image:
        """The current estimate of the final image (the scheduler's x0 prediction), decoded
        cheaply by the model's preview decoder, or by its own VAE without one: what a streamed
        partial image shows. Nothing of the state changes: the final image is the same."""
        latents = state.x0 if state.x0 is not None else state.latents
        image = None
        if self.preview_decoder is not None:
            spec = state.spec
            try:
                pixels = self.preview_decoder.decode(self.unpacked(latents, spec), spec.height, spec.width)
                image = self.pipe.image_processor.postprocess(pixels, output_type="pil")[0]
            except Exception:  # e.g. a family whose latents need unpacking it does not declare
                logger.exception("model %s: the %s preview decoder failed; previews use the full VAE decode from "
                                 "now on", self.model.id, self.preview_decoder.name)
                self.preview_decoder = None
        if image is None:
            image = self.decode(latents, [state])[0]
        return self.kept_pixels(state, image)

    def unpacked(self, latents: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
        """Latents as a preview decoder takes them, (1, channels, H/8, W/8): FLUX unpacks its 2x2 patches."""
        return latents

    def kept_pixels(self, state: DenoiseState, image: Image.Image) -> Image.Image:
        """An inpainting's image with the input's own pixels where the mask keeps them."""
        spec = state.spec
        if spec.mask is None or not spec.preserve_unmasked:
            return image
        return composite.keep_unmasked(spec.image, spec.mask, image, self.model.edits.mask_feather_px)

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

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator, spec: ImageSpec) -> torch.Tensor:
        """The input image's latents, as the family's edit pipelines make them: every one samples
        the VAE's latent distribution with the request's generator (`retrieve_latents`)."""
        vae = self.pipe.vae
        return vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor

    def noised(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`latents` noised to timestep `t` (a 1-element tensor): DDPM-style `add_noise`."""
        return scheduler.add_noise(latents, noise, t)

    def start_index(self, steps: int, strength: float) -> int:
        """How many of `steps` an edit skips: diffusers' SD/SDXL `get_timesteps` (it runs
        `int(steps * strength)` steps; the flow families round the other way, flow.py)."""
        return max(steps - min(int(steps * strength), steps), 0)

    # -- edits ----------------------------------------------------------------------------
    def edit_start(self, spec: ImageSpec, generator: torch.Generator, scheduler: Any, timesteps: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The first latents of an edit and, for a mask, what the blend needs (DenoiseState's
        image_latents, noise, mask): the generator draws in the pipelines' order (image latents,
        then noise), the image noised to the first timestep that runs."""
        pixels = self.pipe.image_processor.preprocess(spec.image, height=spec.height, width=spec.width)
        image_latents = self.encode_image(pixels.to(self.device, dtype), generator, spec).to(dtype)
        if spec.mask is not None:
            # The Inpaint pipelines copy the latents (`repeat`) where Img2Img keeps the VAE's memory
            # layout: the denoiser's rounding depends on it, so each keeps its pipeline's.
            image_latents = image_latents.contiguous()
        noise = randn_tensor(tuple(image_latents.shape), generator=generator, device=self.device, dtype=dtype)
        if spec.mask is not None and spec.strength == 1.0 and self.inpaint_from_noise:
            # The Inpaint pipelines start from pure noise at full strength (Img2Img noises the image).
            latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        else:
            latents = self.noised(scheduler, image_latents, noise, timesteps[:1])
        if spec.mask is None:
            return self.pack(latents), {}
        binary = self.mask_processor.preprocess(spec.mask, height=spec.height, width=spec.width)
        self.after_noise(generator, image_latents)
        mask = torch.nn.functional.interpolate(binary, size=tuple(image_latents.shape[-2:])).to(self.device, dtype)
        mask = mask.repeat(1, image_latents.shape[1], 1, 1)  # one per latent channel: packs like the latents
        return self.pack(latents), {"image_latents": self.pack(image_latents), "noise": self.pack(noise),
                                    "mask": self.pack(mask)}

    def start(self, spec: ImageSpec, generator: torch.Generator, scheduler: Any, timesteps: torch.Tensor,
              dtype: torch.dtype, channels: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The first latents: the pipeline's own noise for a generation; for an edit, the noised
        input and what inpainting's blend needs (`edit_start`). FLUX packs its own (flow.py)."""
        if spec.image is not None:
            return self.edit_start(spec, generator, scheduler, timesteps, dtype)
        return self.pipe.prepare_latents(1, channels, spec.height, spec.width, dtype, self.device, generator), {}

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the denoiser takes them (FLUX packs 2x2 patches)."""
        return latents

    def after_noise(self, generator: torch.Generator, image_latents: torch.Tensor) -> None:
        """What the Inpaint pipelines draw from the generator after the noise (they VAE-encode
        the masked image, unused by a base denoiser): only families whose scheduler draws from
        the generator later must mirror it (sd.py)."""

    @functools.cached_property
    def mask_processor(self) -> VaeImageProcessor:
        """The Inpaint pipelines' mask processor: grayscale, [0, 1], binarized at 0.5."""
        return VaeImageProcessor(vae_scale_factor=self.pipe.image_processor.config.vae_scale_factor,
                                 do_normalize=False, do_binarize=True, do_convert_grayscale=True)

    def blend(self, state: DenoiseState, latents: torch.Tensor, noised: bool) -> torch.Tensor:
        """The Inpaint pipelines' step: `latents` where the mask repaints, the input's latents
        where it keeps, noised to the next timestep (the state's own scheduler, already
        stepped) unless this was the last step."""
        kept = state.image_latents
        if noised:
            kept = self.noised(state.scheduler, kept, state.noise, state.timesteps[state.index : state.index + 1])
        return (1 - state.mask) * kept + state.mask * latents

    # -- helpers ------------------------------------------------------------------------
    def uses_cfg(self, spec: ImageSpec) -> bool:
        return self.cfg_family and spec.guidance > 1

    def generator(self, spec: ImageSpec) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(spec.seed)

    def schedule(self, spec: ImageSpec, **kwargs: Any) -> tuple[Any, torch.Tensor]:
        """The image's own copy of the pipeline's scheduler, set to its own steps; an edit's
        timesteps are the part its strength runs, its scheduler begins there (`get_timesteps`)."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        timesteps, steps = retrieve_timesteps(scheduler, spec.steps, self.device, **kwargs)
        if spec.image is not None:
            start = self.start_index(steps, spec.strength) * scheduler.order
            timesteps = timesteps[start:]
            if not len(timesteps):
                raise ValueError(f"strength {spec.strength} with {spec.steps} steps runs no denoising step")
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
        elif self.sets_begin_index and hasattr(scheduler, "set_begin_index"):
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


def _no_adapters(key: str) -> Any:
    raise RuntimeError(f"LoRA adapter {key} requested from a runner without adapters")


def run_together(runner: Any, specs: list[ImageSpec], join_at: list[int] | None = None) -> list[Image.Image]:
    """Run images through a runner in-process, as the step loop would, each joining the
    batch at its step boundary `join_at[i]` (default: all at once) and leaving when done.
    For tests and benchmarks; the replica's loop is `serve_app.replica.steploop`."""
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
