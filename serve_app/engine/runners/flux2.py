"""FLUX.2: [dev] (`Flux2Pipeline`: Mistral-3 text encoder, guidance embedded in the transformer)
and [klein] (`Flux2KleinPipeline`: Qwen-3 text encoder; distilled, or base with true CFG against
a negative prompt, empty by default as in the pipeline).

Edits are reference-conditioned generations: every input image is VAE-encoded (the latent
distribution's mode: no draw from the generator) into tokens of its own, with position ids
whose time coordinate says which reference it is, and those tokens join the image's own in the
transformer's sequence at every step; the output is read back from the image's own tokens.
The latents start from the request's noise, as a generation's: there is no strength.

Batch key: size, CFG on or off, and the size of every reference after the pipeline's resize
(in order). The transformer takes one set of position ids for the whole batch (it reads
`img_ids[0]`), so images share a call only when their token layouts are identical; the
number and sizes of the references also set the sequence length, i.e. the step's cost.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from PIL import Image

from serve_app.engine.runners.base import DenoiseState, ImageSpec, Runner
from serve_app.engine.runners.flow import FlowRunner

DEFAULT_TEXT_LENGTH = 512  # both pipelines' max_sequence_length
REFERENCE_AREA = 1024 * 1024  # both pipelines shrink a larger reference to this many pixels


def text_length(configured: int | None) -> int:
    """Prompt tokens the text encoder reads: the model YAML's max_sequence_length, else 512."""
    return configured or DEFAULT_TEXT_LENGTH


class Flux2Runner(Runner):
    cfg_family = False  # [dev] embeds guidance; [klein] base runs CFG (uses_cfg)
    sets_begin_index = True
    # Flow matching: x0 = x_t - sigma * v, as for SD3 and FLUX.1.
    estimate = FlowRunner.estimate

    @property
    def klein(self) -> bool:
        return "is_distilled" in self.pipe.config

    def uses_cfg(self, spec: ImageSpec) -> bool:
        return self.klein and not self.pipe.config.is_distilled and spec.guidance > 1

    def batch_key(self, spec: ImageSpec) -> Hashable:
        return (spec.width, spec.height, self.uses_cfg(spec), tuple(self.reference_size(i) for i in spec.images))

    # -- references ---------------------------------------------------------------------
    def reference_size(self, image: Image.Image) -> tuple[int, int]:
        """A reference's size after the pipeline's resize: at most REFERENCE_AREA pixels (its
        `_resize_to_target_area`), then cropped to multiples of 16."""
        width, height = image.size
        if width * height > REFERENCE_AREA:
            scale = math.sqrt(REFERENCE_AREA / (width * height))
            width, height = int(width * scale), int(height * scale)
        multiple = self.pipe.vae_scale_factor * 2
        return width // multiple * multiple, height // multiple * multiple

    def reference_pixels(self, image: Image.Image) -> torch.Tensor:
        """One reference as the pipeline preprocesses it (`__call__`, step 4)."""
        processor = self.pipe.image_processor
        processor.check_image_input(image)  # the ingress refused what this refuses (config.REFERENCE_SHAPE)
        if image.width * image.height > REFERENCE_AREA:
            image = processor._resize_to_target_area(image, REFERENCE_AREA)
        width, height = self.reference_size(image)
        return processor.preprocess(image, height=height, width=width, resize_mode="crop")

    # -- the contract ---------------------------------------------------------------------
    def encode(self, spec: ImageSpec) -> dict[str, Any]:
        length = text_length(self.model.max_sequence_length)
        prompt, text_ids = self.pipe.encode_prompt(prompt=spec.prompt, device=self.device, num_images_per_prompt=1,
                                                   max_sequence_length=length)
        cond = {"prompt": prompt, "text_ids": text_ids}
        if self.uses_cfg(spec):  # [klein] base: the pipeline's negative is the empty prompt
            cond["negative"] = self.pipe.encode_prompt(prompt=spec.negative_prompt or "", device=self.device,
                                                       num_images_per_prompt=1, max_sequence_length=length)[0]
        return cond

    def initial_state(self, spec: ImageSpec, cond: dict[str, Any]) -> DenoiseState:
        if spec.strength != 1.0:
            raise ValueError("FLUX.2 edits condition on references and start from noise: strength must be 1.0")
        pipe, generator = self.pipe, self.generator(spec)
        latents, latent_ids = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, spec.height,
                                                   spec.width, cond["prompt"].dtype, self.device, generator)
        cond = {**cond, "latent_ids": latent_ids}
        if spec.images:
            references, reference_ids = pipe.prepare_image_latents(
                images=[self.reference_pixels(image) for image in spec.images], batch_size=1, generator=generator,
                device=self.device, dtype=pipe.vae.dtype,
            )
            cond.update(references=references, reference_ids=reference_ids)
        sigmas = None if pipe.scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / spec.steps, spec.steps)
        mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=spec.steps)
        scheduler, timesteps = self.schedule(spec, sigmas=sigmas, mu=mu)  # strength 1.0: the whole schedule
        return DenoiseState(spec, generator, scheduler, timesteps, latents, cond)

    def denoise(self, states: list[DenoiseState]) -> list[torch.Tensor]:
        first, cfg = states[0].cond, self.uses_cfg(states[0].spec)
        dtype = self.pipe.transformer.dtype
        latents = torch.cat([s.latents for s in states])
        hidden, ids = latents, first["latent_ids"]
        if "references" in first:  # the same layout in every state of the batch (batch_key)
            hidden = torch.cat([latents, torch.cat([s.cond["references"] for s in states])], dim=1)
            ids = torch.cat([ids, first["reference_ids"]], dim=1)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.tensor([s.spec.guidance for s in states], device=self.device, dtype=torch.float32)
        prediction = self.pipe.transformer(
            hidden_states=torch.cat([hidden, hidden]).to(dtype) if cfg else hidden.to(dtype),
            timestep=self.timesteps_of(states, 2 if cfg else 1).to(latents.dtype) / 1000,
            guidance=guidance,
            encoder_hidden_states=self.cfg_rows(states, "prompt", "negative"),
            txt_ids=first["text_ids"],
            img_ids=ids,
            return_dict=False,
        )[0]
        return self.guided(states, prediction[:, : latents.shape[1]])

    def decode(self, latents: torch.Tensor, states: list[DenoiseState]) -> list[Image.Image]:
        """The pipeline's decode: tokens back into place by their ids, the VAE's batch-norm
        statistics undone, 2x2 patches unfolded, then the VAE."""
        pipe, vae = self.pipe, self.pipe.vae
        ids = torch.cat([s.cond["latent_ids"] for s in states])
        latents = pipe._unpack_latents_with_ids(latents, ids)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                                latents.dtype)
        latents = pipe._unpatchify_latents(latents * std + mean)
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")
