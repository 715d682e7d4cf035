"""Turn an OpenAI request into a `GenerationJob` for one model: defaults, size rules, the
quality/style presets and the extension bounds. Pure; the ingress calls it before any GPU
work, so every client mistake is a 400 here."""

from __future__ import annotations

import math
import secrets

from serve_app.api.protocol import MAX_SEED, ImageGenerateRequest, ImageRequest, ImageVariationRequest
from serve_app.config import ModelConfig, StylePreset, parse_size
from serve_app.errors import InvalidRequestError
from serve_app.job import GenerationJob

NO_STYLE = StylePreset()  # edits and variations: the prompt as given


def resolve_size(
    request: ImageRequest, model: ModelConfig, input_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """The output size. `auto` (or none) is the model's default size, or for an edit the
    input image's size rounded to the model's rule."""
    size = "auto" if request.size is None else request.size
    if size == "auto" and input_size is not None:
        return model.sizes.nearest(*input_size)
    dims = parse_size(model.default_size if size == "auto" else size)
    if dims is None or not model.sizes.accepts(*dims):
        raise InvalidRequestError(
            f"Invalid size '{size}' for model '{model.id}'. Accepted sizes: "
            f"auto, {model.sizes.describe()}.",
            param="size",
        )
    return dims


def check_generation(model: ModelConfig) -> None:
    """An edit-only model (`generations: false`) takes no generations: say which route it takes."""
    if not model.generations:
        raise InvalidRequestError(
            f"Model '{model.id}' only edits images: send its requests to POST /v1/images/edits "
            "(an input image and a prompt), not /v1/images/generations.",
            param="model",
        )


def check_edit(model: ModelConfig, *, images: int, mask: bool, image_param: str = "image") -> None:
    """What the model's `edits` settings allow: edits at all, this many images, a mask."""
    edits = model.edits
    if not edits.enabled:
        raise InvalidRequestError(f"Model '{model.id}' ({model.family}) does not take edits or variations.",
                                  param="model")
    if images > edits.max_input_images:
        raise InvalidRequestError(
            f"Model '{model.id}' takes at most {edits.max_input_images} input image(s); {images} were given.",
            param=image_param,
        )
    if mask and not edits.inpainting:
        raise InvalidRequestError(f"Model '{model.id}' does not take a mask (no inpainting).", param="mask")


def edit_schedule(request: ImageRequest, model: ModelConfig, *, mask: bool, steps: int) -> tuple[int, float]:
    """An edit's (steps, strength): the request's `strength` extension, or the model's default
    for this kind of edit. An edit runs about steps x strength denoising steps and must run at
    least one: the preset's steps are raised to make it so (a 1-step turbo preset at strength
    0.5 runs 2 x 0.5); steps the request chose itself are not, and give a 400."""
    strength = getattr(request, "strength", None)
    if model.reference_edits:  # references condition a generation from noise: nothing to keep
        if strength is not None:
            raise InvalidRequestError(
                f"Model '{model.id}' conditions on its input images as references and generates from noise: "
                "strength does not apply.",
                param="strength",
            )
        return steps, 1.0
    if strength is None:
        if isinstance(request, ImageVariationRequest):
            strength = model.edits.variation_strength
        else:
            strength = model.edits.inpaint_strength if mask else model.edits.default_strength
    if steps * strength < 1 and getattr(request, "num_inference_steps", None) is None:
        steps = min(math.ceil(1 / strength - 1e-9), model.limits.max_inference_steps)
    if steps * strength < 1:
        raise InvalidRequestError(
            f"num_inference_steps x strength must be at least 1 (here {steps} x {strength:g}): "
            "the edit would run no denoising step.",
            param="strength" if getattr(request, "strength", None) is not None else "num_inference_steps",
        )
    return steps, strength


def resolve_job(
    request: ImageRequest,
    model: ModelConfig,
    *,
    request_id: str,
    base_url: str,
    input_size: tuple[int, int] | None = None,
) -> GenerationJob:
    """A generation's job; for an edit or variation (`input_size`: its first image's), the
    same job before its input image is attached (ingress)."""
    if len(request.prompt) > model.max_prompt_chars:
        raise InvalidRequestError(
            f"The prompt is {len(request.prompt)} characters; model '{model.id}' accepts at "
            f"most {model.max_prompt_chars}.",
            param="prompt",
            code="string_above_max_length",
        )
    if request.background == "transparent":
        raise InvalidRequestError(
            f"Model '{model.id}' cannot generate a transparent background; use 'opaque' or 'auto'.",
            param="background",
        )
    if request.negative_prompt is not None and not model.supports_negative_prompt:
        raise InvalidRequestError(
            f"Model '{model.id}' ({model.family}) does not use a negative prompt.",
            param="negative_prompt",
        )
    width, height = resolve_size(request, model, input_size)
    quality = model.quality_preset(request.quality or "standard")
    style = model.style[request.style or "vivid"] if isinstance(request, ImageGenerateRequest) else NO_STYLE
    limits = model.limits

    steps = request.num_inference_steps or quality.num_inference_steps
    if steps > limits.max_inference_steps:
        raise InvalidRequestError(
            f"num_inference_steps must be at most {limits.max_inference_steps} for model "
            f"'{model.id}'.",
            param="num_inference_steps",
        )
    if steps < limits.min_inference_steps:
        raise InvalidRequestError(
            f"num_inference_steps must be at least {limits.min_inference_steps} for model '{model.id}'.",
            param="num_inference_steps",
        )
    if request.guidance_scale is not None:
        guidance = request.guidance_scale
        if not limits.min_guidance_scale <= guidance <= limits.max_guidance_scale:
            raise InvalidRequestError(
                f"guidance_scale must be between {limits.min_guidance_scale} and "
                f"{limits.max_guidance_scale} for model '{model.id}'.",
                param="guidance_scale",
            )
    else:
        guidance = quality.guidance_scale * style.guidance_scale_multiplier

    n = request.n or 1
    if request.stream and n > 1:
        raise InvalidRequestError(
            "Streaming returns one image: use n=1 with stream=true, or several requests.", param="n"
        )
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    if seed + n > MAX_SEED:
        raise InvalidRequestError("seed + n must stay below 2^63.", param="seed")

    output_format = request.output_format or model.default_output_format
    negative = request.negative_prompt
    if negative is None and model.supports_negative_prompt:
        negative = model.default_negative_prompt or None
    return GenerationJob(
        request_id=request_id,
        prompt=style.prompt_template.replace("{prompt}", request.prompt),
        negative_prompt=negative,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=round(guidance, 4),
        seeds=tuple(range(seed, seed + n)),
        output_format=output_format,
        output_compression=100 if request.output_compression is None else request.output_compression,
        # Stream events carry the image inline, as OpenAI's do.
        response_format="b64_json" if request.stream else request.response_format or "url",
        base_url=base_url,
        deterministic=bool(request.deterministic),
        partial_images=(request.partial_images or 0) if request.stream else 0,
    )
