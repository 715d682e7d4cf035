"""The operator's vocabulary: the app config (serve config `args` + environment) and one
`ModelConfig` per `models/*.yaml`. Strict: a misspelled key is an error that names it."""

from __future__ import annotations

import inspect
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SIZE_PATTERN = re.compile(r"^([1-9][0-9]{1,4})x([1-9][0-9]{1,4})$")
# Pixel dimensions must be a multiple of this, per family: VAE scale (8) x latent patching.
# "generic": any other diffusers text-to-image pipeline, called with the standard arguments
# (its patching rule, if any, goes in sizes.multiple_of).
FAMILY_SIZE_MULTIPLE = {"stable-diffusion": 8, "stable-diffusion-xl": 8, "stable-diffusion-3": 16, "flux": 16,
                        "generic": 8, "flux2": 16, "qwen-image": 16, "qwen-image-edit": 16}
Family = Literal["stable-diffusion", "stable-diffusion-xl", "stable-diffusion-3", "flux", "generic", "flux2",
                 "qwen-image", "qwen-image-edit"]
# Families whose edits condition on every input image as a reference (its own tokens, at its own
# size: the pipeline resizes it), generating from noise: several images, no strength, no mask.
# Every other family edits from one image: image-to-image or inpainting from the first.
# (FLUX.2; Qwen-Image-Edit Plus: 1-3 references. Qwen-Image itself only generates.)
REFERENCE_FAMILIES: set[str] = {"flux2", "qwen-image-edit"}
# Families whose runner makes images from text alone (Qwen-Image's edits are qwen-image-edit's).
TEXT_TO_IMAGE_ONLY = {"generic", "qwen-image"}
# What a reference family's pipeline requires of each reference: the shortest side in pixels and
# the largest aspect ratio (FLUX.2: Flux2ImageProcessor.check_image_input). Checked from the header.
REFERENCE_SHAPE: dict[str, tuple[int, float]] = {"flux2": (64, 8.0)}
# Qualities a model may leave out, and the preset they then use.
QUALITY_FALLBACK = {"low": "standard", "medium": "standard", "high": "hd", "auto": "standard"}


class ConfigError(ValueError):
    """An operator mistake in a config file or the environment, found at start."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_size(size: str) -> tuple[int, int] | None:
    match = SIZE_PATTERN.match(size)
    return (int(match[1]), int(match[2])) if match else None


class SizeRules(Strict):
    allowed: list[str] = Field(description="Sizes always accepted, listed to clients.")
    multiple_of: int | None = Field(
        None, gt=0, description="Also accept any WxH whose sides are multiples of this."
    )
    min_side: int = Field(64, gt=0, description="Smallest side for the multiple-of rule.")
    max_side: int = Field(2048, gt=0, description="Largest side for the multiple-of rule.")
    max_pixels: int = Field(2048 * 2048, gt=0, description="Largest W*H for that rule.")

    @field_validator("allowed")
    @classmethod
    def _sizes_parse(cls, allowed: list[str]) -> list[str]:
        for size in allowed:
            if parse_size(size) is None:
                raise ValueError(f"size {size!r} is not WIDTHxHEIGHT")
        return allowed

    def accepts(self, width: int, height: int) -> bool:
        if f"{width}x{height}" in self.allowed:
            return True
        if self.multiple_of is None:
            return False
        return (
            width % self.multiple_of == 0
            and height % self.multiple_of == 0
            and self.min_side <= min(width, height)
            and max(width, height) <= self.max_side
            and width * height <= self.max_pixels
        )

    def describe(self) -> str:
        text = ", ".join(self.allowed)
        if self.multiple_of:
            text += (
                f", or any WIDTHxHEIGHT with sides multiples of {self.multiple_of} between "
                f"{self.min_side} and {self.max_side} and at most {self.max_pixels} pixels"
            )
        return text

    def max_input_pixels(self) -> int:
        """The largest input image (W*H) an edit may upload: the model's largest size."""
        areas = [w * h for w, h in (parse_size(size) or (0, 0) for size in self.allowed)]
        return max([*areas, self.max_pixels if self.multiple_of else 0])

    def nearest(self, width: int, height: int) -> tuple[int, int]:
        """An accepted size close to WxH (an edit's `size: auto`): WxH scaled into the
        multiple-of rule (pixel and side bounds) when the model has one, otherwise the listed
        size nearest in shape, then area. Arithmetic only: any input shape costs the same."""
        if self.multiple_of:
            m = self.multiple_of
            low, high = math.ceil(self.min_side / m) * m, self.max_side // m * m
            scale = min(1.0, (self.max_pixels / (width * height)) ** 0.5, self.max_side / max(width, height))
            scale = max(scale, self.min_side / min(width, height))
            w, h = (min(high, max(low, round(side * scale / m) * m)) for side in (width, height))
            if w * h > self.max_pixels:  # the short side was raised to min_side: trim the long one
                short = min(w, h)
                long = max(low, self.max_pixels // short // m * m)
                w, h = (long, short) if w >= h else (short, long)
            if self.accepts(w, h):
                return w, h
        sizes = [parse_size(size) for size in self.allowed]
        if not sizes:  # a rule that nothing satisfies near this shape: its smallest square
            return low, low
        return min(sizes, key=lambda s: (abs(math.log(s[0] * height / (s[1] * width))),  # type: ignore[index]
                                         abs(s[0] * s[1] - width * height)))  # type: ignore[index]

    def rule(self) -> str | None:
        return self.describe().partition(", or ")[2] or None


class QualityPreset(Strict):
    num_inference_steps: int = Field(gt=0, description="Denoising steps.")
    guidance_scale: float = Field(ge=0, description="Guidance scale.")


class StylePreset(Strict):
    prompt_template: str = Field("{prompt}", description="Must contain {prompt}.")
    guidance_scale_multiplier: float = Field(1.0, gt=0, description="Scales the guidance.")

    @field_validator("prompt_template")
    @classmethod
    def _has_prompt(cls, template: str) -> str:
        if "{prompt}" not in template:
            raise ValueError("prompt_template must contain {prompt}")
        return template


class Limits(Strict):
    max_inference_steps: int = Field(100, gt=0, description="Cap on num_inference_steps.")
    min_guidance_scale: float = Field(0.0, ge=0, description="Floor on guidance_scale.")
    max_guidance_scale: float = Field(30.0, ge=0, description="Cap on guidance_scale.")
    min_inference_steps: int = Field(
        1, gt=0, description="Floor on num_inference_steps (Qwen-Image's terminal-shifted schedule needs 2).")


class EditSettings(Strict):
    """`POST /v1/images/edits` and `/variations` for this model (README "Edits and variations")."""

    enabled: bool = Field(True, description="Whether the model takes edits and variations.")
    inpainting: bool = Field(True, description="Whether a mask is honoured (inpainting).")
    max_input_images: int = Field(
        1, ge=1, le=16,
        description="Input images an edit may carry (OpenAI's bound: 16). 1 for the families that edit from one "
        "image; a reference family (FLUX.2, Qwen-Image-Edit) takes what its model card allows.",
    )
    default_strength: float = Field(
        0.6, gt=0, le=1, description="Image-to-image strength of an edit without a mask (1: ignore the input)."
    )
    inpaint_strength: float = Field(1.0, gt=0, le=1, description="Strength of an edit with a mask, in the masked area.")
    variation_strength: float = Field(0.75, gt=0, le=1, description="Strength of a variation (no prompt).")
    reference_pixels: int | None = Field(
        None, gt=0,
        description="Qwen-Image-Edit: the area (W*H) each input image is resized to, its aspect kept, before the "
        "VAE makes its reference latents (area / 256 tokens per image in every step). Default: the pipeline's own, "
        "1024x1024; the tiny model uses 256x256 so that CPU tests stay fast.",
    )
    mask_feather_px: int = Field(
        8, ge=0, le=64,
        description="Inpainting returns the input's own pixels wherever the mask keeps them; over this many pixels "
        "inside the repainted area (chessboard distance from the kept region) the output blends from the input to "
        "the model's, so no seam shows. 8: one latent cell, the mask's resolution in the denoiser. 0: a hard edge.",
    )


class TinyAutoencoderSource(Strict):
    """Where a preview decoder's `AutoencoderTiny` weights come from."""

    source: str = Field(
        description="Hub repo id (e.g. madebyollin/taesd), a local AutoencoderTiny directory, or `tiny`: random "
        "weights built at replica start from a fixed seed, shaped like the published ones (tiny models)."
    )
    revision: str | None = Field(None, description="Hub revision (commit) to pin.")

    @field_validator("source")
    @classmethod
    def _no_gcs(cls, source: str) -> str:
        if source.startswith("gs://"):
            raise ValueError("a tiny autoencoder loads from the Hub or a local directory, not gs://")
        return source


class PreviewSettings(Strict):
    """How streamed partial images are decoded (docs/previews.md). The final image is always the full VAE decode."""

    decoder: Literal["tae", "latent_rgb", "full"] = Field(
        "full",
        description="tae: a tiny autoencoder (`tae`); latent_rgb: a linear latent-channels-to-RGB map, upsampled; "
        "full: the model's own VAE (a whole decode per preview). A decoder that cannot be built falls back to full, "
        "with the reason in the replica's log.",
    )
    tae: TinyAutoencoderSource | None = Field(None, description="The tiny autoencoder, for decoder: tae.")
    latent_rgb: Literal["published", "fit"] = Field(
        "published",
        description="published: the family's factors as ComfyUI ships them (serve_app/engine/previews.py names "
        "the source); fit: least squares against this model's own VAE at replica start (tiny random models).",
    )

    @model_validator(mode="after")
    def _tae_named(self) -> PreviewSettings:
        if self.decoder == "tae" and self.tae is None:
            raise ValueError("decoder tae needs `tae: {source: ..., revision: ...}`")
        return self


class Batching(Strict):
    """How a replica orders and batches images (docs/capacity.md; serve_app/replica/scheduler.py)."""

    policy: Literal["call", "fixed", "cost"] = Field(
        "fixed",
        description="fixed (the default: over HTTP on a CPU it measured better than cost, benchmarks/README.md): "
        "the step engine joining every waiting image of the running batch's key up to max_batch_size. "
        "cost: the step engine runs the request with the least remaining work first, a request's "
        "images together, and lets others share a denoiser call only while the replica's measured cost curve "
        "says sharing pays, within the waiting bound. call: one whole "
        "pipeline call per batch (same size, steps and guidance), first come first served; no edits, no "
        "previews. `generic` pipelines always use call.",
    )
    max_batch_size: int = Field(
        4, gt=0, description="Images per denoiser call (step engine) or pipeline call (call), at most."
    )
    max_wait_factor: float = Field(
        1.0, ge=0,
        description="cost: the waiting bound. Requests that arrived later may delay a request (overtaking it "
        "or sharing its steps) by at most this many times its own service time (its seconds alone), counted in "
        "the seconds the replica really took; then it goes first. 0: first come first served; larger: a lower "
        "mean, a higher p99 (docs/capacity.md).",
    )
    max_wait_s: float | None = Field(
        None, ge=0, description="cost: the same bound in seconds; with both set, the smaller applies.",
    )

    @model_validator(mode="before")
    @classmethod
    def _mode_is_deprecated(cls, data: Any) -> Any:
        # `mode: step|call` came before `policy`: still read, with a warning that says what to write.
        if isinstance(data, dict) and "mode" in data:
            data = dict(data)
            mode = data.pop("mode")
            policy = {"call": "call", "step": "fixed"}.get(mode) if isinstance(mode, str) else None
            if policy is None:
                raise ValueError(f"mode: deprecated, and {mode!r} is not step or call; write policy: call|fixed|cost")
            if data.setdefault("policy", policy) != policy:
                raise ValueError(f"mode: {mode} contradicts policy: {data['policy']}; remove the deprecated mode")
            warnings.warn(f"batching.mode is deprecated: write `policy: {policy}` instead of `mode: {mode}`",
                          FutureWarning, stacklevel=2)
        return data


class EngineOptions(Strict):
    """How the engine loads and speeds up the pipeline. Each is applied where the hardware
    can do it, and otherwise skipped with the reason in the replica's log."""

    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (CPU only).")
    compile: bool = Field(False, description="torch.compile the denoiser (CUDA only; first calls are slow).")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "max-autotune-no-cudagraphs", description="torch.compile mode."
    )
    channels_last: bool = Field(False, description="channels_last memory format for the UNet/VAE.")
    fuse_qkv: bool = Field(False, description="Fuse attention q/k/v projections (UNet and transformer models).")
    attention_backend: str | None = Field(
        None, description='diffusers attention backend for the denoiser: "native", "flash", "_flash_3", "sage", ...'
    )
    vae_tiling: bool = Field(False, description="Decode large images in tiles (less memory).")
    vae_slicing: bool = Field(False, description="Decode a batch one image at a time (less memory).")
    cpu_offload: Literal["model", "sequential"] | None = Field(
        None, description="Keep weights on the CPU between uses (small GPUs; slower). CUDA only."
    )
    quantization: Literal["fp8", "int8"] | None = Field(
        None, description="torchao weight quantization of the denoiser: fp8 (compute capability 8.9+) or int8."
    )
    quantize_text_encoders: bool = Field(
        False, description="With `quantization`: quantize the text encoders too (FLUX.2 [dev]'s 24B Mistral-3 does "
        "not fit beside its transformer in bf16 on an 80 GB GPU). Each quantized module is moved to the GPU and "
        "quantized on its own, so their bf16 weights are never all there at once.",
    )


LORA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$"  # no "/", no "..": never a path
MAX_LORA_NAME_CHARS = 64
LORA_SCALE_RANGE = (-2.0, 2.0)  # a request's scale; the YAML's default scale too


class LoraSource(Strict):
    """One adapter of a model's `loras:` block (README/docs/loras.md). Requests name it; only the
    operator says where its file is."""

    source: str = Field(
        min_length=1,
        description="A .safetensors file: an absolute local path, gs://bucket/path/file.safetensors, or a Hugging "
        "Face Hub repo id (then weight_name and revision are required).",
    )
    weight_name: str | None = Field(
        None, description="Hub repos: the file in the repo, e.g. pytorch_lora_weights.safetensors."
    )
    revision: str | None = Field(None, pattern=r"^[0-9a-f]{40}$", description="Hub repos: the commit to pin (40 hex).")
    scale: float = Field(
        1.0, ge=LORA_SCALE_RANGE[0], le=LORA_SCALE_RANGE[1], description="Default scale when a request gives none."
    )
    description: str = Field("", description="One line, shown in /v1/models.")

    def kind(self) -> Literal["local", "gcs", "hub"]:
        if self.source.startswith("gs://"):
            return "gcs"
        if self.source.startswith(("/", "~")):
            return "local"
        return "hub"

    @model_validator(mode="after")
    def _complete(self) -> LoraSource:
        if not self.source.endswith(".safetensors") and self.kind() != "hub":
            raise ValueError("source: adapters load from .safetensors files only (never pickles)")
        if self.kind() == "hub" and not (self.weight_name and self.revision):
            raise ValueError("a Hub source needs weight_name (a .safetensors file) and a 40-hex revision")
        if self.weight_name is not None and not self.weight_name.endswith(".safetensors"):
            raise ValueError("weight_name: adapters load from .safetensors files only (never pickles)")
        return self


def check_deployment_options(options: dict[str, Any]) -> dict[str, Any]:
    """Serve's schema ignores misspelled nested keys (`autoscaling_config.max_replica`), so
    check every key level ourselves, then let Serve's own schema check the values."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema

    # serve.deployment() takes a few options the config schema does not list (and vice versa).
    top = set(DeploymentSchema.model_fields) | set(inspect.signature(serve.deployment).parameters)
    known = {
        "": top - {"name", "_func_or_class"},
        "ray_actor_options": set(RayActorOptionsSchema.model_fields),
        "autoscaling_config": set(AutoscalingConfig.model_fields),
    }
    for section, keys in known.items():
        given = options if not section else options.get(section) or {}
        unknown = sorted(set(given) - keys)
        if unknown:
            where = f"{section}." if section else ""
            raise ValueError(f"unknown Serve deployment option(s): {', '.join(where + k for k in unknown)}")
    try:
        DeploymentSchema.model_validate({"name": "check", **options})
        if options.get("autoscaling_config"):  # DeploymentSchema keeps it as a plain dict
            AutoscalingConfig.model_validate(options["autoscaling_config"])
    except ValidationError as exc:
        raise ValueError(f"invalid Serve deployment options: {explain(exc)}") from None
    return options


class ModelConfig(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Model id in requests.")
    description: str = Field("", description="One line for operators.")
    owned_by: str = Field("artserve", description="Shown in /v1/models.")
    source: str = Field(
        description="Hub repo id, local directory, gs://bucket/path, or tiny:NAME (built locally)."
    )
    revision: str | None = Field(None, description="Hub revision (commit) to pin.")
    family: Family = Field(description="Pipeline family.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weights.")
    max_prompt_chars: int = Field(4000, gt=0, description="Longest accepted prompt.")
    max_sequence_length: int | None = Field(
        None, gt=0, le=512, description="T5 prompt tokens (FLUX, SD3: default the tokenizer's, at most 512; generic); "
        "FLUX.2: its text encoder's (default 512)."
    )
    sizes: SizeRules
    default_size: str = Field(description='Used for "auto" and when no size is given.')
    default_output_format: Literal["png", "jpeg", "webp"] = "webp"
    supports_negative_prompt: bool = Field(description="Whether negative_prompt is honoured.")
    default_negative_prompt: str = Field("", description="Used when the request has none.")
    limits: Limits = Limits()
    quality: dict[Literal["standard", "hd", "low", "medium", "high", "auto"], QualityPreset]
    style: dict[Literal["vivid", "natural"], StylePreset]
    edits: EditSettings = Field(
        default_factory=EditSettings, description="Edits/variations; `generic` models cannot edit (enabled: false)."
    )
    generations: bool = Field(
        True, description="Whether POST /v1/images/generations serves this model (false: an edit-only model)."
    )
    batching: Batching = Batching()
    previews: PreviewSettings = Field(
        default_factory=PreviewSettings, description="Streamed partial images: their decoder (default full)."
    )
    engine: EngineOptions = EngineOptions()
    deployment: dict[str, Any] = Field(
        default_factory=dict, description="Ray Serve deployment options, over the defaults."
    )
    loras: dict[str, LoraSource] = Field(
        default_factory=dict,
        description="LoRA adapters by name, besides the files in loras_dir/<id>/ (docs/loras.md). Step engine only.",
    )
    max_loaded_loras: int = Field(
        8, gt=0, description="Adapters kept in memory per replica (least recently used out; one in use never)."
    )
    created: int = Field(0, description="Set from the file's mtime when loaded.")

    @model_validator(mode="before")
    @classmethod
    def _generic_does_not_edit(cls, data: Any) -> Any:
        # A generic pipeline is called as text-to-image only: no image input to give it.
        if isinstance(data, dict) and data.get("family") in TEXT_TO_IMAGE_ONLY and "edits" not in data:
            data = {**data, "edits": {"enabled": False}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        multiple = FAMILY_SIZE_MULTIPLE[self.family]
        for size in [*self.sizes.allowed, self.default_size]:
            dims = parse_size(size)
            if dims is None or dims[0] % multiple or dims[1] % multiple:
                raise ValueError(f"size {size!r}: {self.family} needs sides multiple of {multiple}")
        if self.sizes.multiple_of and self.sizes.multiple_of % multiple:
            raise ValueError(f"sizes.multiple_of must be a multiple of {multiple}")
        width, height = parse_size(self.default_size)  # type: ignore[misc]
        if not self.sizes.accepts(width, height):
            raise ValueError(f"default_size {self.default_size} is not an accepted size")
        missing = {"standard", "hd"} - set(self.quality)
        if missing:
            raise ValueError(f"quality presets missing: {sorted(missing)}")
        if self.max_sequence_length and self.family not in ("flux", "stable-diffusion-3", "generic", "flux2"):
            raise ValueError("max_sequence_length is for pipelines with a long-prompt encoder (flux, "
                             "stable-diffusion-3, generic, flux2)")
        if set(self.style) != {"vivid", "natural"}:
            raise ValueError("style presets must define exactly vivid and natural")
        if self.family in TEXT_TO_IMAGE_ONLY and self.edits.enabled:
            raise ValueError(f"edits: {self.family} pipelines are text-to-image only (edits.enabled: false)")
        if self.batching.policy == "call" and self.edits.enabled:
            raise ValueError("edits need the step engine: batching.policy call runs whole pipeline calls "
                             "(set edits.enabled: false, or batching.policy: cost or fixed)")
        self._check_edit_inputs()
        if self.loras and (self.family == "generic" or self.batching.policy == "call"):
            raise ValueError("loras: adapters need the step engine (a step family and batching.policy: cost or fixed)")
        for name in self.loras:
            if not valid_lora_name(name):
                raise ValueError(f"loras: {name!r} is not a valid adapter name (letters, digits, . _ -)")
        check_deployment_options(self.deployment)
        return self

    def _check_edit_inputs(self) -> None:
        if not self.generations and not self.edits.enabled:
            raise ValueError("generations: false and edits.enabled: false: the model would serve nothing")
        if self.reference_edits:
            if self.edits.inpainting:
                raise ValueError(f"edits.inpainting: {self.family} edits condition on reference images; masks "
                                 "(inpainting) are not supported for it (set edits.inpainting: false)")
        elif self.edits.max_input_images > 1:
            raise ValueError(f"edits.max_input_images: {self.family} edits from one image (image-to-image or "
                             "inpainting from the first); it must be 1")

    @property
    def reference_edits(self) -> bool:
        """Whether edits condition on every input image as a reference (REFERENCE_FAMILIES)."""
        return self.family in REFERENCE_FAMILIES

    @property
    def reference_shape(self) -> tuple[int, float] | None:
        """(shortest side, largest aspect ratio) every reference must have (REFERENCE_SHAPE)."""
        return REFERENCE_SHAPE.get(self.family) if self.reference_edits else None

    def quality_preset(self, quality: str) -> QualityPreset:
        return self.quality.get(quality) or self.quality[QUALITY_FALLBACK[quality]]  # type: ignore[index]


def valid_lora_name(name: str) -> bool:
    """An adapter name a request may use: never a path (no "/", no ".."), at most 64 characters."""
    return len(name) <= MAX_LORA_NAME_CHARS and re.match(LORA_NAME_PATTERN, name) is not None


def load_model_config(path: Path) -> ModelConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read model config: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a model config must be a YAML mapping")
    data.setdefault("created", int(path.stat().st_mtime))
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {explain(exc)}") from None


def explain(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in error["loc"]) or "model"
        what = "unknown key (misspelled?)" if error["type"] == "extra_forbidden" else error["msg"]
        parts.append(f"{where}: {what}")
    return "; ".join(parts)


ENV_OVERRIDES = {
    "storage": "ARTSERVE_STORAGE",
    "url_ttl_s": "ARTSERVE_URL_TTL_S",
    "public_url": "ARTSERVE_PUBLIC_URL",
    "signing_service_account": "ARTSERVE_SIGNING_SERVICE_ACCOUNT",
    "storage_retry_s": "ARTSERVE_STORAGE_RETRY_S",
    "max_json_body_bytes": "ARTSERVE_MAX_JSON_BODY_BYTES",
    "max_upload_body_bytes": "ARTSERVE_MAX_UPLOAD_BODY_BYTES",
    "idempotency_ttl_s": "ARTSERVE_IDEMPOTENCY_TTL_S",
    "idempotency_max_bytes": "ARTSERVE_IDEMPOTENCY_MAX_BYTES",
    "janitor_period_s": "ARTSERVE_JANITOR_PERIOD_S",
    "drain_dir": "ARTSERVE_DRAIN_DIR",
    "edit_url_hosts": "ARTSERVE_EDIT_URL_HOSTS",
    "loras_dir": "ARTSERVE_LORAS_DIR",
}


class AppConfig(Strict):
    """`args` of the serve config; environment variables override the matching fields."""

    models: list[str] = Field(min_length=1, description="Model ids (models_dir/ID.yaml) or YAML paths.")
    models_dir: str = Field("models", description="Directory of model YAML files.")
    storage: str = Field(
        str(Path.home() / ".cache" / "artserve" / "images"),
        description="Local directory, or gs://bucket/prefix. Env: ARTSERVE_STORAGE.",
    )
    url_ttl_s: int = Field(
        86400, gt=0, le=7 * 24 * 3600, description="Image link lifetime, at most 7 days. Env: ARTSERVE_URL_TTL_S."
    )
    public_url: str | None = Field(
        None, description="Base URL in local links; default: the request's. Env: ARTSERVE_PUBLIC_URL."
    )
    signing_service_account: str | None = Field(
        None, description="gs:// with no key file: who signs links. Env: ARTSERVE_SIGNING_SERVICE_ACCOUNT."
    )
    storage_retry_s: float = Field(
        20, gt=0, description="gs://: how long to retry a failing upload before a 503. Env: ARTSERVE_STORAGE_RETRY_S."
    )
    request_timeout_s: float = Field(600, gt=0, description="Ingress wait for one generation.")
    max_json_body_bytes: int = Field(
        1_000_000, gt=0, description="Largest JSON generations body; larger → 413. Env: ARTSERVE_MAX_JSON_BODY_BYTES."
    )
    max_upload_body_bytes: int | None = Field(
        None,
        gt=0,
        description="Largest edits/variations body. Default: the largest a served model can use (its input images "
        "and a mask of 50 MB each, as base64, + 1 MB). Env: ARTSERVE_MAX_UPLOAD_BODY_BYTES.",
    )
    idempotency_ttl_s: int = Field(
        86400, gt=0, description="How long an Idempotency-Key's response is replayed. Env: ARTSERVE_IDEMPOTENCY_TTL_S."
    )
    idempotency_max_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Memory bound of kept responses (b64_json ones are large); oldest dropped first. "
        "Env: ARTSERVE_IDEMPOTENCY_MAX_BYTES.",
    )
    janitor_period_s: float = Field(
        600, gt=0, description="Local storage: how often expired images are deleted. Env: ARTSERVE_JANITOR_PERIOD_S."
    )
    drain_dir: str | None = Field(
        None, description="Set by `python -m serve_app run`: its graceful stop (serve_app/api/drain.py). "
        "Env: ARTSERVE_DRAIN_DIR.",
    )
    edit_url_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs JSON edits may reference (exact names; none by default: the "
        "server would otherwise fetch any address for anyone). Env: ARTSERVE_EDIT_URL_HOSTS, comma-separated.",
    )
    loras_dir: str | None = Field(
        None,
        description="LoRA adapters as files: <loras_dir>/<model id>/<name>.safetensors, picked up without a restart. "
        "On several nodes it must be a directory every node sees (docs/loras.md). Env: ARTSERVE_LORAS_DIR.",
    )
    ingress: dict[str, Any] = Field(default_factory=dict, description="Ingress deployment options.")
    cpu_node_resource: str | None = Field(
        None,
        min_length=1,
        description="A custom Ray resource that only CPU node types offer (cluster.yaml, k8s/: the head and the "
        "cpu group): the ingress and the idempotency store ask for a sliver of it, so they never land on a GPU node "
        "and keep it from being released. None (single-node `serve run`): they go anywhere.",
    )

    @field_validator("edit_url_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, hosts: Any) -> Any:
        if isinstance(hosts, str):
            hosts = hosts.split(",")
        if isinstance(hosts, list):
            return [h.strip().lower() for h in hosts if isinstance(h, str) and h.strip()] + [
                h for h in hosts if not isinstance(h, str)]
        return hosts

    @field_validator("ingress")
    @classmethod
    def _known_ingress_keys(cls, options: dict[str, Any]) -> dict[str, Any]:
        return check_deployment_options(options)

    @classmethod
    def from_args(cls, args: dict[str, Any], env: dict[str, str] | None = None) -> AppConfig:
        env = os.environ if env is None else env
        merged = dict(args)
        for field, var in ENV_OVERRIDES.items():
            if env.get(var):
                merged[field] = env[var]
        try:
            config = cls.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(f"app config: {explain(exc)}") from None
        if config.uses_gcs():
            from serve_app.storage.gcs import parse_bucket_url  # google libraries: only when used

            try:
                parse_bucket_url(config.storage)
            except ValueError as exc:
                raise ConfigError(f"app config: {exc}") from None
            return config
        return config.model_copy(update={"storage": str(Path(config.storage).expanduser().resolve())})

    def uses_gcs(self) -> bool:
        return self.storage.startswith("gs://")

    def models_path(self) -> Path:
        path = Path(self.models_dir).expanduser()
        if not path.is_absolute() and not path.exists():
            path = PROJECT_ROOT / path
        return path.resolve()

    def load_models(self) -> dict[str, ModelConfig]:
        """`models` entries are ids (models_dir/ID.yaml) or paths to YAML files."""
        configs = {}
        for entry in self.models:
            path = Path(entry) if entry.endswith((".yaml", ".yml")) else self.models_path() / f"{entry}.yaml"
            if not path.is_absolute() and not path.exists():
                path = PROJECT_ROOT / path
            if not path.exists():
                raise ConfigError(f"model {entry!r}: no file {path}")
            config = load_model_config(path)
            if config.id != path.stem:
                raise ConfigError(f"{path}: id {config.id!r} does not match the file name")
            if config.id in configs:
                raise ConfigError(f"model {config.id!r} is listed twice")
            configs[config.id] = config
        return configs
