"""What the ingress sends a model replica, and what comes back. Plain data: no Ray, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    # Edits and variations (empty/None for a generation): every input image in request order, as
    # PNG bytes, RGB. A family that edits from one image gets it already resized to width x height
    # (as before: the image-to-image start); a reference family (config.REFERENCE_FAMILIES) gets
    # each at its own size, as uploaded (upright, within the model's pixel bound), because its
    # pipeline resizes references itself and the same image gives the pipeline's numbers.
    # The mask as PNG bytes, mode L, width x height, 255 where the image is repainted (OpenAI's
    # alpha-0 areas) and 0 where it is kept; the strength.
    images: tuple[bytes, ...] = ()
    mask: bytes | None = None
    strength: float | None = None
    preserve_unmasked: bool = True  # with a mask: the input's own pixels where it keeps (False: raw output)
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
    # Where the replica's milliseconds went, for the Server-Timing header: engine (arrival until
    # the last image left the step loop), encode (until the last image was encoded and stored).
    timings_ms: dict[str, float] = field(default_factory=dict)
    loras: tuple[AppliedLora, ...] = ()
