"""Flow-matching transformer families: Stable Diffusion 3/3.5 (MMDiT over CLIP-L + CLIP-G + T5,
CFG) and FLUX.1 (guidance-distilled: guidance is an input of the transformer, no CFG)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from serve_app.engine.runners.base import DenoiseState, ImageSpec, Runner


def t5_length(model_max_length: int | None, configured: int | None) -> int:
    """The T5 prompt length: the model YAML's, else the tokenizer's, capped at 512."""
    return configured or min(512, model_max_length or 512)


class FlowRunner(Runner):
    """What SD3 and FLUX share: T5 prompt length, shift + scale before the VAE."""

    t5_tokenizer = "tokenizer_3"

    @property
    def max_sequence_length(self) -> int:
        tokenizer = getattr(self.pipe, self.t5_tokenizer, None)
        return t5_length(getattr(tokenizer, "model_max_length", None), self.model.max_sequence_length)

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator, spec: ImageSpec) -> torch.Tensor:
        vae = self.pipe.vae
        return (vae.encode(pixels).latent_dist.sample(generator) - vae.config.shift_factor) * vae.config.scaling_factor

    def noised(self, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # The flow-matching forward process: sigma * noise + (1 - sigma) * latents.
        return scheduler.scale_noise(latents, t, noise)

    def start_index(self, steps: int, strength: float) -> int:
        # The SD3/FLUX `get_timesteps`: int() after the subtraction, not before.
        return int(max(steps - min(steps * strength, steps), 0))

    def estimate(self, state: DenoiseState, output: torch.Tensor, stepped: Any) -> torch.Tensor:
        # Flow matching predicts the velocity v = noise - x0 at sigma = t / T: x0 = x_t - sigma * v.
        sigma = state.t / state.scheduler.config.num_train_timesteps
        return state.latents - sigma.to(state.latents.dtype) * output

    def vae_decode(self, latents: torch.Tensor) -> list[Image.Image]:
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil")


class StableDiffusion3Runner(FlowRunner):
    default_max_shift = 1.16
    def encode(self, spec: ImageSpec) -> dict[str, Any]:
        positive, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=spec.prompt, prompt_2=None, prompt_3=None, negative_prompt=spec.negative_prompt,
            do_classifier_free_guidance=self.uses_cfg(spec), device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt": positive, "negative": negative, "pooled": pooled, "negative_pooled": negative_pooled}

    def initial_state(self, spec: ImageSpec, cond: dict[str, Any]) -> DenoiseState:
        generator = self.generator(spec)
        patch, scale = self.pipe.transformer.config.patch_size, self.pipe.vae_scale_factor
        shift = self.resolution_shift((spec.height // scale // patch) * (spec.width // scale // patch))
        scheduler, timesteps = self.schedule(spec, **shift)
        latents, edit = self.start(spec, generator, scheduler, timesteps, cond["prompt"].dtype,
                                   self.pipe.transformer.config.in_channels)
        return DenoiseState(spec, generator, scheduler, timesteps, latents, cond, **edit)

    def denoise(self, states: list[DenoiseState]) -> list[torch.Tensor]:
        cfg = self.uses_cfg(states[0].spec)
        latents = torch.cat([s.latents for s in states])
        prediction = self.pipe.transformer(
            hidden_states=torch.cat([latents, latents]) if cfg else latents,
            timestep=self.timesteps_of(states, 2 if cfg else 1),
            encoder_hidden_states=self.cfg_rows(states, "prompt", "negative"),
            pooled_projections=self.cfg_rows(states, "pooled", "negative_pooled"),
            return_dict=False,
        )[0]
        return self.guided(states, prediction)

    def decode(self, latents: torch.Tensor, states: list[DenoiseState]) -> list[Image.Image]:
        return self.vae_decode(latents)


class FluxRunner(FlowRunner):
    cfg_family = False  # guidance-distilled: guidance is a transformer input
    sets_begin_index = True
    inpaint_from_noise = False
    t5_tokenizer = "tokenizer_2"

    def encode(self, spec: ImageSpec) -> dict[str, Any]:
        prompt, pooled, text_ids = self.pipe.encode_prompt(
            prompt=spec.prompt, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt": prompt, "pooled": pooled, "text_ids": text_ids}

    def initial_state(self, spec: ImageSpec, cond: dict[str, Any]) -> DenoiseState:
        generator = self.generator(spec)
        side = 2 * self.pipe.vae_scale_factor  # one token per 2x2 latent patch
        sigmas = None
        if spec.image is not None or not self.pipe.scheduler.config.get("use_flow_sigmas"):
            sigmas = np.linspace(1.0, 1 / spec.steps, spec.steps)  # the edit pipelines always pass these
        shift = self.resolution_shift((spec.height // side) * (spec.width // side))
        scheduler, timesteps = self.schedule(spec, sigmas=sigmas, **shift)
        dtype = cond["prompt"].dtype
        edit: dict[str, torch.Tensor] = {}
        if spec.image is not None:
            latents, edit = self.edit_start(spec, generator, scheduler, timesteps, dtype)
            image_ids = self.pipe._prepare_latent_image_ids(1, spec.height // side, spec.width // side,
                                                            self.device, dtype)
        else:
            latents, image_ids = self.pipe.prepare_latents(
                1, self.pipe.transformer.config.in_channels // 4, spec.height, spec.width, dtype, self.device,
                generator,
            )
        return DenoiseState(spec, generator, scheduler, timesteps, latents, {**cond, "image_ids": image_ids}, **edit)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        return self.pipe._pack_latents(latents, batch, channels, height, width)

    def denoise(self, states: list[DenoiseState]) -> list[torch.Tensor]:
        latents = torch.cat([s.latents for s in states])
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.tensor([s.spec.guidance for s in states], device=self.device, dtype=torch.float32)
        prediction = self.pipe.transformer(
            hidden_states=latents,
            timestep=self.timesteps_of(states).to(latents.dtype) / 1000,
            guidance=guidance,
            pooled_projections=torch.cat([s.cond["pooled"] for s in states]),
            encoder_hidden_states=torch.cat([s.cond["prompt"] for s in states]),
            txt_ids=states[0].cond["text_ids"],
            img_ids=states[0].cond["image_ids"],
            return_dict=False,
        )[0]
        return [prediction[i : i + 1] for i in range(len(states))]

    def decode(self, latents: torch.Tensor, states: list[DenoiseState]) -> list[Image.Image]:
        spec = states[0].spec
        return self.vae_decode(self.unpacked(latents, spec))

    def unpacked(self, latents: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
        return self.pipe._unpack_latents(latents, spec.height, spec.width, self.pipe.vae_scale_factor)
