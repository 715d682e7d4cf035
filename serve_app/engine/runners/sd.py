"""UNet families: Stable Diffusion 1.x/2.x (`StableDiffusionPipeline`) and SDXL
(`StableDiffusionXLPipeline`: two text encoders, pooled text and size "time ids")."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from serve_app.engine.runners.base import DenoiseState, ImageSpec, Runner


class StableDiffusionRunner(Runner):
    def uses_cfg(self, spec: ImageSpec) -> bool:
        # As the pipeline: LCM-style UNets with a guidance embedding never run CFG.
        return spec.guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None

    def encode(self, spec: ImageSpec) -> dict[str, Any]:
        positive, negative = self.pipe.encode_prompt(
            spec.prompt, self.device, 1, self.uses_cfg(spec), spec.negative_prompt
        )
        return {"prompt": positive, "negative": negative}

    def initial_state(self, spec: ImageSpec, cond: dict[str, Any]) -> DenoiseState:
        generator = self.generator(spec)
        scheduler, timesteps = self.schedule(spec)
        # An edit's time ids (SDXL) are the text-to-image ones: the Img2Img/Inpaint pipelines'
        # `requires_aesthetics_score` is False by default, and a text-to-image checkpoint sets none.
        latents, edit = self.start(spec, generator, scheduler, timesteps, cond["prompt"].dtype,
                                   self.pipe.unet.config.in_channels)
        return DenoiseState(spec, generator, scheduler, timesteps, latents, cond,
                            self.step_kwargs(scheduler, generator), **edit)

    def after_noise(self, generator: torch.Generator, image_latents: torch.Tensor) -> None:
        # The Inpaint pipelines sample the masked image's latent distribution next: the same
        # draw without the encode, so that ancestral schedulers' noise matches theirs.
        randn_tensor(tuple(image_latents.shape), generator=generator, device=self.pipe.vae.device,
                     dtype=self.vae_encode_dtype)

    @property
    def vae_encode_dtype(self) -> torch.dtype:
        return self.pipe.vae.dtype

    def model_input(self, states: list[DenoiseState]) -> torch.Tensor:
        # Each image scaled by its own scheduler (Euler divides by its own sigma).
        latents = torch.cat([s.scheduler.scale_model_input(s.latents, s.t) for s in states])
        return torch.cat([latents, latents]) if self.uses_cfg(states[0].spec) else latents

    def unet_kwargs(self, states: list[DenoiseState]) -> dict[str, Any]:
        return {}

    def denoise(self, states: list[DenoiseState]) -> list[torch.Tensor]:
        repeat = 2 if self.uses_cfg(states[0].spec) else 1
        prediction = self.pipe.unet(
            self.model_input(states),
            self.timesteps_of(states, repeat),
            encoder_hidden_states=self.cfg_rows(states, "prompt", "negative"),
            return_dict=False,
            **self.unet_kwargs(states),
        )[0]
        return self.guided(states, prediction)

    def decode(self, latents: torch.Tensor, states: list[DenoiseState]) -> list[Image.Image]:
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * len(states))


class StableDiffusionXLRunner(StableDiffusionRunner):
    sets_begin_index = True

    def encode(self, spec: ImageSpec) -> dict[str, Any]:
        positive, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=spec.prompt, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=self.uses_cfg(spec), negative_prompt=spec.negative_prompt,
        )
        encoder_2 = self.pipe.text_encoder_2
        projection_dim = int(pooled.shape[-1]) if encoder_2 is None else encoder_2.config.projection_dim
        size = (spec.height, spec.width)
        time_ids = self.pipe._get_add_time_ids(
            size, (0, 0), size, dtype=positive.dtype, text_encoder_projection_dim=projection_dim
        ).to(self.device)
        return {"prompt": positive, "negative": negative, "pooled": pooled, "negative_pooled": negative_pooled,
                "time_ids": time_ids, "negative_time_ids": time_ids}

    def unet_kwargs(self, states: list[DenoiseState]) -> dict[str, Any]:
        return {"added_cond_kwargs": {
            "text_embeds": self.cfg_rows(states, "pooled", "negative_pooled"),
            "time_ids": self.cfg_rows(states, "time_ids", "negative_time_ids"),
        }}

    @property
    def vae_encode_dtype(self) -> torch.dtype:
        return torch.float32 if self.pipe.vae.config.force_upcast else self.pipe.vae.dtype

    def encode_image(self, pixels: torch.Tensor, generator: torch.Generator, spec: ImageSpec) -> torch.Tensor:
        # In float32 where the VAE must be upcast; Img2Img normalizes with the VAE's latents
        # mean/std where it has them, Inpaint only scales (as diffusers does, both).
        vae, dtype = self.pipe.vae, pixels.dtype
        if vae.config.force_upcast:
            vae.to(dtype=torch.float32)
        latents = vae.encode(pixels.to(self.vae_encode_dtype)).latent_dist.sample(generator)
        if vae.config.force_upcast:
            vae.to(dtype=dtype)
        latents = latents.to(dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if spec.mask is None and mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, dtype)
            return (latents - mean) * vae.config.scaling_factor / std
        return vae.config.scaling_factor * latents

    def decode(self, latents: torch.Tensor, states: list[DenoiseState]) -> list[Image.Image]:
        pipe, vae = self.pipe, self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # the fp16 SDXL VAE overflows
        if upcast:
            pipe.upcast_vae()
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil")
