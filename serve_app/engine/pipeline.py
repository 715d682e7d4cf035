"""Load a diffusers pipeline once and run batched generation for one `PipelineCall`."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from serve_app.config import ModelConfig
from serve_app.engine import optimize
from serve_app.engine.weights import load_pipeline

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PipelineInputs:
    """One pipeline call: shared shape settings, and per-image prompt and seed."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    prompts: list[str]
    negative_prompts: list[str | None]
    seeds: list[int]


class DiffusersEngine:
    def __init__(self, model: ModelConfig):
        self.model = model
        if model.engine.num_threads:
            torch.set_num_threads(model.engine.num_threads)
        hardware = optimize.Hardware.detect()
        self.device = "cuda" if hardware.cuda else "cpu"
        dtype = DTYPES[model.dtype] if self.device == "cuda" else torch.float32
        if dtype != DTYPES[model.dtype]:
            logger.warning("model %s: %s needs a GPU; running float32 on CPU", model.id, model.dtype)
        logger.info("model %s: loading %s (%s) on %s", model.id, model.source, dtype, self.device)
        self.pipeline: DiffusionPipeline = load_pipeline(model, dtype)
        self.pipeline.set_progress_bar_config(disable=True)
        self.applied = optimize.apply(
            self.pipeline, model.engine, optimize.plan(model.engine, hardware), self.device, model.id
        )

        self._counters = self._token_counters()

    def _token_counters(self) -> list[tuple[Any, int]]:
        """Copies of the text encoders' tokenizers, each with what that encoder reads (77 for
        CLIP, the T5 length). Copies: a fast tokenizer keeps its padding and truncation
        settings in shared state, so counting on the event loop while the step loop's thread
        encodes a prompt with the same object can strip that prompt's padding."""
        from serve_app.engine.runners.flow import t5_length
        from serve_app.engine.runners.flux2 import text_length

        counters = []
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            tokenizer = getattr(self.pipeline, name, None)
            if tokenizer is None:
                continue
            tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor (FLUX.2 [dev]'s) wraps one
            limit = tokenizer.model_max_length
            if "t5" in type(getattr(self.pipeline, name.replace("tokenizer", "text_encoder"), None)).__name__.lower():
                limit = t5_length(limit, self.model.max_sequence_length)
            elif self.model.family == "flux2":
                limit = text_length(self.model.max_sequence_length)
            counters.append((copy.deepcopy(tokenizer), limit))
        return counters

    def count_tokens(self, prompt: str) -> int:
        """Prompt tokens as the model sees them: the longest count over its text encoders'
        tokenizers, each capped at what that encoder reads."""
        return max((len(t(prompt, truncation=True, max_length=limit).input_ids) for t, limit in self._counters),
                   default=0)

    def generate(self, inputs: PipelineInputs) -> list[Image.Image]:
        # One generator per image: its noise depends on its own seed only, whatever else
        # shares the call, so a seed reproduces the same image in any batch.
        generators = [torch.Generator(self.device).manual_seed(seed) for seed in inputs.seeds]
        kwargs = dict(
            prompt=inputs.prompts,
            width=inputs.width,
            height=inputs.height,
            num_inference_steps=inputs.num_inference_steps,
            guidance_scale=inputs.guidance_scale,
            generator=generators,
            output_type="pil",
        )
        kwargs.update(self._family_kwargs(inputs))
        with torch.inference_mode():
            return self.pipeline(**kwargs).images

    def _family_kwargs(self, inputs: PipelineInputs) -> dict:
        kwargs = {}
        if self.model.family != "flux" and any(inputs.negative_prompts):
            # SD, SDXL, SD3: classifier-free guidance against the negative prompt. (FLUX is
            # guidance-distilled: guidance_scale is an input, and negative prompts are refused.)
            kwargs["negative_prompt"] = [n or "" for n in inputs.negative_prompts]
        if self.model.family in ("flux", "stable-diffusion-3"):
            from serve_app.engine.runners.flow import t5_length

            t5 = self.pipeline.tokenizer_2 if self.model.family == "flux" else self.pipeline.tokenizer_3
            kwargs["max_sequence_length"] = t5_length(getattr(t5, "model_max_length", None),
                                                      self.model.max_sequence_length)
        elif self.model.max_sequence_length:  # generic pipelines: only when the YAML says so
            kwargs["max_sequence_length"] = self.model.max_sequence_length
        return kwargs
