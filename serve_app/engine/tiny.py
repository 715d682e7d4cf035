"""Tiny, randomly initialised diffusers pipelines built locally (no download).

They follow the shape of diffusers' own `get_dummy_components()` test fixtures, with a
four-level VAE so latents have the real 8x scale and an image size costs what it costs in
production. Built once with fixed seeds, saved with `save_pretrained`, then loaded with
`DiffusionPipeline.from_pretrained` like any other model directory.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from serve_app.engine import tiny_qwen
from serve_app.engine.tiny_flux2 import build_tiny_flux2

logger = logging.getLogger(__name__)

VOCAB_SIZE = 1000
_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<pad>", "<unk>"]


def _tokenizer(max_length: int, bos_eos: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a synthetic vocabulary: letters, digits and common words
    map to ids, everything else to <unk>. Good enough to turn any prompt into ids."""
    words = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    words += [f"w{i}" for i in range(VOCAB_SIZE - len(_SPECIALS) - len(words))]
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    if bos_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A <|endoftext|>",
            special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 1)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def _clip_config(projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def _vae(latent_channels: int, **kwargs):
    from diffusers import AutoencoderKL

    # Four levels -> 2**3 = 8x spatial down-scaling, as in every production SD/FLUX VAE.
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=256,
        **kwargs,
    )


def _unet(**kwargs):
    """A two-level UNet (the SD/SDXL shape); `kwargs`: conditioning and attention settings."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **kwargs,
    )


def _flow_vae(scaling_factor: float):
    """The flow-matching families' VAE (SD3, FLUX): no quant convs, a shift and a scale."""
    return _vae(latent_channels=4, use_quant_conv=False, use_post_quant_conv=False,
                shift_factor=0.0609, scaling_factor=scaling_factor)


def build_tiny_sd():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    unet = _unet(
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=_vae(latent_channels=4),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=_tokenizer(77, bos_eos=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _t5(d_model: int = 32) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(d_model=d_model, d_ff=37, d_kv=8, num_heads=4, num_layers=2, vocab_size=VOCAB_SIZE,
                 pad_token_id=2, eos_token_id=1, decoder_start_token_id=2)
    )


def build_tiny_sdxl():
    """SDXL's shape: two CLIP encoders (the second with a projection, for the pooled
    embedding), a UNet conditioned on both plus size/crop "time ids"."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(0)
    time_embed_dim = 8
    unet = _unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + 32,  # 6 time ids + pooled text
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=_vae(latent_channels=4, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=_tokenizer(77, bos_eos=True),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()),
        tokenizer_2=_tokenizer(77, bos_eos=True),
    )


def build_tiny_sd3():
    """SD3's shape: an MMDiT with 2x2 patches over CLIP-L + CLIP-G (pooled) + T5 embeddings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,  # as in SD3/3.5: with the 8x VAE, sides are multiples of 16
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # T5's width; the CLIP states (32 + 32) are padded to it
        pooled_projection_dim=64,  # both CLIP projections, concatenated
        pos_embed_max_size=128,  # up to 2048 px sides
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(_clip_config()),
        tokenizer=_tokenizer(77, bos_eos=True),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()),
        tokenizer_2=_tokenizer(77, bos_eos=True),
        text_encoder_3=_t5(64),
        tokenizer_3=_tokenizer(128, bos_eos=False),
    )


def build_tiny_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 12, 16],  # sums to attention_head_dim
        guidance_embeds=True,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(scaling_factor=1.5035),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=_tokenizer(77, bos_eos=True),
        text_encoder_2=_t5(),
        tokenizer_2=_tokenizer(128, bos_eos=False),
        transformer=transformer,
    )


def build_tiny_pixart():
    """A pipeline of none of the named families (PixArt-Sigma: a DiT over T5 embeddings), to
    prove that any diffusers text-to-image pipeline directory is servable as `family: generic`."""
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=4,
        caption_channels=32, in_channels=4, cross_attention_dim=32, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return PixArtSigmaPipeline(
        tokenizer=_tokenizer(128, bos_eos=False), text_encoder=_t5(), vae=_vae(latent_channels=4),
        transformer=transformer, scheduler=DDIMScheduler(),
    )


TINY_BUILDERS: dict[str, Callable] = {
    "tiny-sd": build_tiny_sd, "tiny-sdxl": build_tiny_sdxl, "tiny-sd3": build_tiny_sd3, "tiny-flux": build_tiny_flux,
    "tiny-pixart": build_tiny_pixart,
    "tiny-flux2": build_tiny_flux2,
    "tiny-qwen-image": tiny_qwen.build_tiny_qwen_image, "tiny-qwen-image-edit": tiny_qwen.build_tiny_qwen_image_edit,
}
# Bump when a builder changes, so caches built by older code are not reused.
TINY_VERSION = "v3"


def default_cache_dir() -> Path:
    root = os.environ.get("ARTSERVE_CACHE_DIR") or Path.home() / ".cache" / "artserve"
    return Path(root) / "tiny" / TINY_VERSION


def ensure_tiny_model(name: str, cache_dir: Path | None = None) -> Path:
    """Build the named tiny pipeline into the cache once and return its directory.

    Written to a temporary directory and renamed into place, so replicas starting at the
    same time never see a half-written model."""
    if name not in TINY_BUILDERS:
        raise KeyError(f"unknown tiny model {name!r}; known: {sorted(TINY_BUILDERS)}")
    target = (cache_dir or default_cache_dir()) / name
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building tiny model %s into %s", name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        TINY_BUILDERS[name]().save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
