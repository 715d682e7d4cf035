"""The wire: OpenAI Images/Models request and response types, and nothing else.

Field names are OpenAI's. Types are strict (`n: "2"` is an error, as with OpenAI), and every
validation failure becomes a 400 naming the field, never FastAPI's 422.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_app.config import LORA_NAME_PATTERN, LORA_SCALE_RANGE, MAX_LORA_NAME_CHARS
from serve_app.errors import InvalidRequestError

logger = logging.getLogger(__name__)

Quality = Literal["standard", "hd", "low", "medium", "high", "auto"]
Style = Literal["vivid", "natural"]
OutputFormat = Literal["png", "jpeg", "webp"]
ResponseFormat = Literal["url", "b64_json"]

MAX_SEED = 2**63
MAX_LORAS = 4


class LoraRef(BaseModel):
    """`extra_body.loras[i]`: an adapter the operator provides for the model, by name."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(max_length=MAX_LORA_NAME_CHARS, pattern=LORA_NAME_PATTERN,
                      description="An adapter of the model (GET /v1/models lists them as '<model>:<name>').")
    scale: float | None = Field(None, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1], allow_inf_nan=False,
                                description="How strongly it applies, -2 to 2 (0: not at all); default: the adapter's.")


class _ImageRequest(BaseModel):
    """What every image route takes (generations, edits, variations). `None` (JSON null)
    means "use the default", as in the OpenAI SDK; defaults that depend on the model are
    resolved by presets.py."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1, description="A configured model id.")
    n: int | None = Field(None, ge=1, le=10, description="Number of images, 1-10.")
    size: str | None = Field(None, description='"WIDTHxHEIGHT" or "auto".')
    response_format: ResponseFormat | None = Field(None, description="url or b64_json.")
    output_format: OutputFormat | None = Field(None, description="Image encoding.")
    output_compression: int | None = Field(
        None, ge=0, le=100, description="Quality 0-100 for jpeg/webp; 100 is lossless webp."
    )
    user: str | None = Field(None, description="End-user id, logged only.")
    # ArtServe extensions, sent by the SDKs through `extra_body`.
    seed: int | None = Field(
        None, ge=0, lt=MAX_SEED, description="Seed of the first image; image i uses seed+i."
    )
    num_inference_steps: int | None = Field(None, ge=1, description="Denoising steps.")
    guidance_scale: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="Classifier-free/distilled guidance."
    )
    deterministic: bool | None = Field(
        None,
        description="true: every image runs alone (shares no denoising step with other requests), so a seed "
        "gives the same bytes whatever the load. Slower under load.",
    )
    loras: list[LoraRef] | None = Field(
        None, max_length=MAX_LORAS,
        description="LoRA adapters to stack, up to 4, after the one a 'model: \"<model>:<adapter>\"' names.",
    )


class _PromptedRequest(_ImageRequest):
    """Generations and edits: a prompt and the presets."""

    prompt: str = Field(description="What to draw; the model caps its length.")
    quality: Quality | None = Field(None, description="Maps to a per-model preset.")
    background: Literal["transparent", "opaque", "auto"] | None = Field(
        None, description="Accepted; `transparent` only where the model can honour it."
    )
    moderation: Literal["low", "auto"] | None = Field(None, description="Accepted, logged.")
    stream: bool | None = Field(None, description="true: Server-Sent Events (partial images, then the image).")
    partial_images: int | None = Field(
        None, ge=0, le=3, description="Previews streamed before the final image (stream mode), 0-3."
    )
    negative_prompt: str | None = Field(None, description="What to steer away from.")

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt must not be empty")
        return prompt


class ImageGenerateRequest(_PromptedRequest):
    """`POST /v1/images/generations`."""

    style: Style | None = Field(None, description="Maps to a per-model preset.")


Strength = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class ImageEditRequest(_PromptedRequest):
    """`POST /v1/images/edits`, its scalar fields (multipart form fields, or JSON). The images
    and the mask are files (multipart) or `images`/`mask` references (JSON)."""

    input_fidelity: Literal["high", "low"] | None = Field(None, description="Accepted; no effect.")
    strength: Strength | None = Field(
        None, description="How much of the input is repainted (0-1]; default per model (edits in its YAML)."
    )
    preserve_unmasked: bool | None = Field(
        None,
        description="With a mask: true (default) returns the input's own pixels wherever the mask keeps them, "
        "blended over a short feathered band at its border; false returns the model's raw output.",
    )


class ImageRef(BaseModel):
    """JSON edits: one image reference (`ImageRefParam`)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    image_url: str | None = Field(None, description="A data: URL, or an http(s) URL on the operator's allow-list.")
    file_id: str | None = Field(None, description="Not supported: there is no Files API.")


class ImageEditJsonRequest(ImageEditRequest):
    """`POST /v1/images/edits` with a JSON body (`EditImageBodyJsonParam`)."""

    images: list[ImageRef] = Field(min_length=1, max_length=16, description="1-16 image references.")
    mask: ImageRef | None = Field(None, description="PNG with alpha: alpha 0 is repainted.")


class ImageVariationRequest(_ImageRequest):
    """`POST /v1/images/variations` (multipart), its form fields besides `image`. No prompt:
    the class attributes below are what the presets read for a variation."""

    prompt: ClassVar[str] = ""
    quality: ClassVar[None] = None
    background: ClassVar[None] = None
    stream: ClassVar[None] = None
    partial_images: ClassVar[None] = None
    negative_prompt: ClassVar[None] = None
    strength: Strength | None = Field(None, description="Default: the model's variation strength.")


ImageRequest = ImageGenerateRequest | ImageEditRequest | ImageVariationRequest


def parse_generate_request(body: Any) -> ImageGenerateRequest:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    return parse_request(ImageGenerateRequest, body)


R = TypeVar("R", bound=BaseModel)


def parse_request(model: type[R], body: Any, *, from_form: bool = False) -> R:
    """Validate a decoded JSON body (strict types) or form fields (`from_form`: numbers and
    booleans arrive as strings, so they are converted); the first problem is a 400 naming its field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.", param=None)
    try:
        request = model.model_validate(body, strict=False if from_form else None)
    except ValidationError as exc:
        raise _first_error(exc) from None
    unknown = sorted(set(body) - set(model.model_fields))
    if unknown:
        logger.debug("ignoring unknown request fields: %s", unknown)
    return request


def _first_error(exc: ValidationError) -> InvalidRequestError:
    error = exc.errors(include_url=False, include_input=False)[0]
    param = _param(error["loc"])
    if error["type"] == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    message = error["msg"].removeprefix("Value error, ")
    return InvalidRequestError(f"Invalid value for '{param}': {message}.", param=param)


def _param(loc: tuple[int | str, ...]) -> str | None:
    """`images[0].image_url` for a nested field of a JSON edit; otherwise the top-level field."""
    if not loc:
        return None
    param = str(loc[0])
    if param in ("images", "mask", "loras"):
        fields = LoraRef.model_fields if param == "loras" else ImageRef.model_fields
        for part in loc[1:]:
            if isinstance(part, int):
                param += f"[{part}]"
            elif part in fields:
                param += f".{part}"
    return param


class AppliedLoraData(BaseModel):
    name: str = Field(description="The adapter's name.")
    scale: float = Field(description="The scale it was applied at.")
    sha256: str = Field(description="SHA-256 of the adapter file that was applied.")


class ImageData(BaseModel):
    url: str | None = Field(None, description="Signed, expiring link (url mode).")
    b64_json: str | None = Field(None, description="The encoded image (b64_json mode).")
    revised_prompt: str = Field(description="The prompt exactly as given to the model.")
    seed: int = Field(description="The seed that produced this image.")
    loras: list[AppliedLoraData] | None = Field(None, description="The LoRA adapters applied, in order (if any).")


# What the response echoes must stay inside OpenAI's published enums (typed clients reject
# anything else): quality as low/medium/high, size only when it is one of the schema's sizes.
EchoQuality = Literal["low", "medium", "high"]
ECHO_QUALITY: dict[str, EchoQuality] = {"standard": "medium", "hd": "high", "low": "low", "medium": "medium",
                                        "high": "high", "auto": "medium"}
SCHEMA_SIZES = ("1024x1024", "1024x1536", "1536x1024")


class InputTokensDetails(BaseModel):
    text_tokens: int = Field(description="Prompt tokens, by the model's own tokenizer.")
    image_tokens: int = Field(0, description="Latent tokens of input images (edits).")


class Usage(BaseModel):
    """OpenAI's image usage: output tokens are the latent tokens generated, (W/16) x (H/16) per
    image (4096 for 1024x1024)."""

    input_tokens: int = Field(description="text_tokens + image_tokens.")
    input_tokens_details: InputTokensDetails
    output_tokens: int = Field(description="Latent tokens generated: n x (W/16) x (H/16).")
    total_tokens: int = Field(description="input_tokens + output_tokens.")

    @classmethod
    def of(cls, text_tokens: int, images: int, width: int, height: int, image_tokens: int = 0) -> Usage:
        output = images * (width // 16) * (height // 16)
        inputs = text_tokens + image_tokens
        return cls(input_tokens=inputs, output_tokens=output, total_tokens=inputs + output,
                   input_tokens_details=InputTokensDetails(text_tokens=text_tokens, image_tokens=image_tokens))


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix seconds.")
    data: list[ImageData] = Field(description="Exactly n images, in order.")
    size: Literal["1024x1024", "1024x1536", "1536x1024"] | None = Field(
        None, description="Echoed only when it is one of OpenAI's listed sizes."
    )
    quality: EchoQuality = Field(description="The quality preset used, in OpenAI's vocabulary.")
    output_format: OutputFormat = Field(description="Encoding of every image.")
    background: Literal["opaque"] = Field("opaque", description="Generated background.")
    usage: Usage


class ImageStreamEvent(BaseModel):
    """`image_generation.partial_image` / `.completed` (edits: `image_edit.*`), one SSE message each."""

    type: str = Field(description="The event type, also the SSE event name.")
    b64_json: str = Field(description="The encoded preview or final image.")
    created_at: int = Field(description="Unix seconds.")
    size: Literal["1024x1024", "1024x1536", "1536x1024", "auto"] = Field(description="auto unless a schema size.")
    quality: EchoQuality
    background: Literal["opaque"] = "opaque"
    output_format: OutputFormat
    partial_image_index: int | None = Field(None, description="Partial events: 0 .. partial_images - 1.")
    usage: Usage | None = Field(None, description="Completed events.")
    loras: list[AppliedLoraData] | None = Field(None, description="Completed events: the LoRA adapters applied.")


class ModelCard(BaseModel):
    id: str = Field(description="The model id used in requests.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix seconds of the model file's last change.")
    owned_by: str = Field(description="Who publishes the weights.")
    family: str = Field(description="Pipeline family, e.g. stable-diffusion or flux.")
    sizes: list[str] = Field(description="Sizes listed as accepted.")
    size_rule: str | None = Field(None, description="Any other accepted WIDTHxHEIGHT.")
    default_size: str = Field(description='What "auto" and no size mean.')
    default_output_format: OutputFormat = Field(description="Encoding when none is asked.")
    max_prompt_chars: int = Field(description="Longest accepted prompt.")
    supports_negative_prompt: bool = Field(description="Whether negative_prompt is honoured.")
    supports_generation: bool = Field(True, description="Whether /v1/images/generations takes this model.")
    supports_edits: bool = Field(False, description="Whether /v1/images/edits and /variations take this model.")
    supports_inpainting: bool = Field(False, description="Whether an edit's mask is honoured.")
    max_input_images: int = Field(0, description="Input images an edit may carry (0: no edits).")
    status: str = Field(description="Serve's deployment status: HEALTHY, UPDATING, UPSCALING, UNHEALTHY...")
    running_replicas: int = Field(description="Replicas serving this model now (polled every 2 s).")
    base_model: str | None = Field(None, description="A LoRA adapter's card: the model it applies to.")
    lora_scale: float | None = Field(None, description="A LoRA adapter's card: its default scale.")
    description: str | None = Field(None, description="A LoRA adapter's card: what the operator says it does.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
