"""The Qwen-Image family: generation (`QwenImagePipeline`) and Edit Plus (`QwenImageEditPlusPipeline`,
Qwen-Image-Edit-2509: 1-3 input images as references).

Both are flow-matching MMDiTs over a Qwen2.5-VL chat-template prompt, with *true* classifier-free
guidance: with a negative prompt and guidance > 1, the transformer sees the prompt and the negative
prompt, the guided prediction neg + g (pos - neg) is rescaled to the norm of the positive one (per
token), and the scheduler steps on that. Here the positive and negative rows of every image in the
batch go through ONE transformer call. Prompts encode to different lengths (Edit Plus's also carry
each input image's vision tokens), so the text rows are zero-padded to the longest and masked: the
transformer's joint attention takes a per-row text mask, and a padded token is never attended to.
Text RoPE positions start after the image grid and count up, so padding at the end moves no valid
token. With nothing to pad (one prompt, no CFG) the call is the pipeline's own, mask-free.

Edit Plus conditions on its input images twice, as its pipeline does: each image resized to
384x384's area (its aspect kept) through the VL processor into the prompt's encoding, and each
resized to the reference area (1024x1024's by default) into VAE latents that are appended to the
image tokens of every step (their predictions are dropped). It generates from noise: no strength,
no mask. Batch key: size, CFG on/off and the references' latent sizes — the RoPE layout of one call
is the first row's (`QwenEmbedRope`), so every row must share it; text length is not in the key.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage import retrieve_timesteps
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
from PIL import Image

from serve_app.config import ModelConfig
from serve_app.engine.runners.base import DenoiseState, ImageSpec, Runner
from serve_app.engine.runners.flow import FlowRunner

#: the generation pipeline's prompt length (its `__call__` default; its encoder reads at most 1024)
MAX_SEQUENCE_LENGTH = 512


class QwenImageRunner(Runner):
    sets_begin_index = True

    def uses_cfg(self, spec: ImageSpec) -> bool:
        # As the pipelines' `do_true_cfg`: a negative prompt (even " ") and guidance above 1.
        return spec.guidance > 1 and spec.negative_prompt is not None

    # -- prepare ----------------------------------------------------------------------------
    def encode(self, spec: ImageSpec) -> dict[str, Any]:
        conditions = self.condition_images(spec)
        cond = {"prompt": self.encode_text(spec.prompt, conditions)}
        if self.uses_cfg(spec):
            cond["negative"] = self.encode_text(spec.negative_prompt or "", conditions)
        return cond

    def condition_images(self, spec: ImageSpec) -> list[Image.Image] | None:
        """What the VL encoder sees besides the text (Edit Plus: the input images)."""
        return None

    def encode_text(self, text: str, conditions: list[Image.Image] | None) -> torch.Tensor:
        """One prompt's hidden states, (1, tokens, width): one prompt alone has no padding, no mask."""
        embeds, _ = self.pipe.encode_prompt(prompt=text, device=self.device, num_images_per_prompt=1,
                                            max_sequence_length=MAX_SEQUENCE_LENGTH)
        return embeds

    def initial_state(self, spec: ImageSpec, cond: dict[str, Any]) -> DenoiseState:
        generator = self.generator(spec)
        latents = self.noise(spec, cond["prompt"].dtype, generator)
        sigmas = np.linspace(1.0, 1 / spec.steps, spec.steps)
        scheduler, timesteps = self.schedule(spec, sigmas=sigmas, **self.resolution_shift(latents.shape[1]))
        return DenoiseState(spec, generator, scheduler, timesteps, latents, cond)

    def noise(self, spec: ImageSpec, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        """The first latents, packed: the pipeline's draw from the request's own generator."""
        return self.pipe.prepare_latents(1, self.pipe.transformer.config.in_channels // 4, spec.height, spec.width,
                                         dtype, self.device, generator)

    def schedule(self, spec: ImageSpec, **kwargs: Any) -> tuple[Any, torch.Tensor]:
        # The whole schedule, for edits too: Edit Plus starts from noise (no strength).
        scheduler = copy.deepcopy(self.pipe.scheduler)
        timesteps, _ = retrieve_timesteps(scheduler, spec.steps, self.device, **kwargs)
        scheduler.set_begin_index(0)
        return scheduler, timesteps

    # -- step -------------------------------------------------------------------------------
    def denoise(self, states: list[DenoiseState]) -> list[torch.Tensor]:
        count, cfg = len(states), self.uses_cfg(states[0].spec)
        rows = 2 if cfg else 1
        latents = torch.cat([s.latents for s in states])
        texts = [s.cond["prompt"] for s in states] + ([s.cond["negative"] for s in states] if cfg else [])
        text, text_mask = padded(texts)
        hidden = self.with_references(states, latents)
        prediction = self.pipe.transformer(
            hidden_states=torch.cat([hidden] * rows),
            timestep=self.timesteps_of(states, rows).to(latents.dtype) / 1000,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=text_mask,
            img_shapes=self.img_shapes(states[0].spec) * (count * rows),
            attention_kwargs={},
            return_dict=False,
        )[0][:, : latents.shape[1]]  # the references' predictions are not stepped
        outputs = []
        for i, state in enumerate(states):
            positive = prediction[i : i + 1]
            if not cfg:
                outputs.append(positive)
                continue
            negative = prediction[count + i : count + i + 1]
            guided = negative + state.spec.guidance * (positive - negative)
            # The pipelines' rescale: the guided prediction at the positive one's norm, per token.
            scale = torch.norm(positive, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True)
            outputs.append(guided * scale)
        return outputs

    def with_references(self, states: list[DenoiseState], latents: torch.Tensor) -> torch.Tensor:
        """The transformer's image tokens: the latents (Edit Plus appends the references')."""
        return latents

    def img_shapes(self, spec: ImageSpec) -> list[list[tuple[int, int, int]]]:
        """One row's RoPE layout: (frames, rows, columns) of 2x2 patches per image segment."""
        side = self.pipe.vae_scale_factor * 2
        return [[(1, spec.height // side, spec.width // side)]]

    estimate = FlowRunner.estimate  # x0 = x_t - sigma * v

    # -- finish -------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor, states: list[DenoiseState]) -> list[Image.Image]:
        spec, vae = states[0].spec, self.pipe.vae
        latents = self.pipe._unpack_latents(latents, spec.height, spec.width, self.pipe.vae_scale_factor)
        latents = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        # Divided by 1/std, not multiplied by std: the pipeline's arithmetic, so its rounding too.
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        image = vae.decode(latents / inverse_std + mean, return_dict=False)[0][:, :, 0]  # one frame
        return self.pipe.image_processor.postprocess(image, output_type="pil")


class QwenImageEditRunner(QwenImageRunner):
    """Edit Plus: `spec.images` (1-3, each at its own size) condition the prompt and the steps."""

    def __init__(self, pipeline: Any, model: ModelConfig, device: str):
        super().__init__(pipeline, model, device)
        module = sys.modules[type(pipeline).__module__]  # the pipeline's own areas
        self.condition_pixels: int = module.CONDITION_IMAGE_SIZE
        self.reference_pixels: int = model.edits.reference_pixels or module.VAE_IMAGE_SIZE

    def batch_key(self, spec: ImageSpec) -> Hashable:
        return (*super().batch_key(spec), tuple(self.reference_size(image) for image in spec.images))

    def reference_size(self, image: Image.Image) -> tuple[int, int]:
        """(width, height) an input image is resized to for the VAE: the reference area, its aspect."""
        return calculate_dimensions(self.reference_pixels, image.width / image.height)

    def prepare(self, specs: list[ImageSpec]) -> list[DenoiseState]:
        # The base class shares one encoding among images with the same prompts; here the encoding
        # also reads the input images, so it is shared only within one request's (the same objects).
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, spec in enumerate(specs):
            groups.setdefault(tuple(map(id, spec.images)), []).append(index)
        states: list[Any] = [None] * len(specs)
        for indices in groups.values():
            for index, state in zip(indices, super().prepare([specs[i] for i in indices]), strict=True):
                states[index] = state
        return states

    def encode(self, spec: ImageSpec) -> dict[str, Any]:
        if not spec.images:
            raise ValueError("Qwen-Image-Edit needs at least one input image")
        cond = super().encode(spec)
        return {**cond, "references": self.encode_references(spec, cond["prompt"].dtype)}

    def noise(self, spec: ImageSpec, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        # Edit Plus's prepare_latents takes the references first (None: only the noise).
        return self.pipe.prepare_latents(None, 1, self.pipe.transformer.config.in_channels // 4, spec.height,
                                         spec.width, dtype, self.device, generator)[0]

    def condition_images(self, spec: ImageSpec) -> list[Image.Image]:
        # As the pipeline: each image at the condition area, its aspect kept (multiples of 32).
        conditions = []
        for image in spec.images:
            width, height = calculate_dimensions(self.condition_pixels, image.width / image.height)
            conditions.append(self.pipe.image_processor.resize(image, height, width))
        return conditions

    def encode_text(self, text: str, conditions: list[Image.Image] | None) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(image=conditions, prompt=text, device=self.device, num_images_per_prompt=1)
        return embeds

    def encode_references(self, spec: ImageSpec, dtype: torch.dtype) -> torch.Tensor:
        """Every input image's latents, packed and in request order: (1, tokens, channels)."""
        packed = []
        channels = self.pipe.transformer.config.in_channels // 4
        for image in spec.images:
            width, height = self.reference_size(image)
            pixels = self.pipe.image_processor.preprocess(image, height, width).unsqueeze(2)
            # The pipeline takes the latent distribution's mode: no draw from the request's generator.
            latents = self.pipe._encode_vae_image(pixels.to(self.device, dtype), generator=None)
            packed.append(self.pipe._pack_latents(latents, 1, channels, *latents.shape[3:]))
        return torch.cat(packed, dim=1)

    def with_references(self, states: list[DenoiseState], latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([latents, torch.cat([s.cond["references"] for s in states])], dim=1)

    def img_shapes(self, spec: ImageSpec) -> list[list[tuple[int, int, int]]]:
        side = self.pipe.vae_scale_factor * 2
        references = [(1, h // side, w // side) for w, h in map(self.reference_size, spec.images)]
        return [[*super().img_shapes(spec)[0], *references]]


def padded(texts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text rows of different lengths as one (rows, longest, width) batch, zero-padded at the end,
    and their mask (1 = a real token); no mask when no row needs padding (the pipeline's call)."""
    longest = max(t.shape[1] for t in texts)
    if all(t.shape[1] == longest for t in texts):
        return torch.cat(texts), None
    batch = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[1])) for t in texts])
    positions = torch.arange(longest, device=batch.device)
    mask = torch.stack([(positions < t.shape[1]).long() for t in texts])
    return batch, mask
