"""What the ingress sends a model replica, and what comes back. Plain data: no Ray, no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraChoice:
    """One adapter a request asked for, checked against the catalog by the ingress."""

    name: str
    scale: float
    param: str  # the request field that named it ("model" or "loras[i].name"): where errors point


@dataclass(frozen=True)
class AppliedLora:
    """What the response reports for each adapter applied: name, scale, sha256 of its file."""

    name: str
    scale: float
    sha256: str


@dataclass(frozen=True)
class GenerationJob:
    """One client request, fully resolved: presets applied, defaults filled, sizes checked."""

    request_id: str
    prompt: str  # after the style template: what the pipeline is given
    negative_prompt: str | None
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seeds: tuple[int, ...]  # one per image: len(seeds) == n
    output_format: str
    output_compression: int
    response_format: str  # "url" or "b64_json"
    base_url: str  # where local links point when no public URL is configured
    deterministic: bool = False  # run each image alone: the solo bytes whatever the load
    partial_images: int = 0  # streamed previews before the final image (stream mode only)
    # Edits and variations (None for a generation): the first input image as PNG bytes, RGB,
    # already width x height; the mask as PNG bytes, mode L, width x height, 255 where the
    # image is repainted (OpenAI's alpha-0 areas) and 0 where it is kept; the strength.
    init_image: bytes | None = None
    mask: bytes | None = None
    strength: float | None = None
    image_tokens: int = 0  # usage: the input images' latent tokens
    event_prefix: str = "image_generation"  # stream events: "image_edit" for edits
    loras: tuple[LoraChoice, ...] = ()  # stacked in this order, up to 4

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class PartialImage:
    """A streamed preview: the current estimate of the final image, encoded."""

    index: int  # 0 .. partial_images - 1
    b64_json: str


@dataclass(frozen=True)
class ImageResult:
    seed: int
    batch_size: int  # the largest batch any of this image's denoising steps ran in
    url: str | None = None
    b64_json: str | None = None


@dataclass(frozen=True)
class GenerationResult:
    images: list[ImageResult]
    input_tokens: int  # prompt tokens, by the model's own tokenizers (usage)
    loras: tuple[AppliedLora, ...] = ()
