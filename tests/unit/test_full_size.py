"""The production catalog at full size, on the meta device: every component built from the
published configs in serve_app/engine/architectures/ has exactly the published parameter count,
and the README's memory figures are what those counts weigh at each model's dtype.

Where each published figure comes from: serve_app/engine/architectures/README.md."""

import re
from pathlib import Path

import pytest
import torch

from serve_app.config import load_model_config
from serve_app.engine import full_size
from serve_app.engine.pipeline import DTYPES

ROOT = Path(__file__).resolve().parents[2]

T5_XXL_ENCODER = 4_762_310_656
CLIP_L = 123_060_480  # CLIPTextModel (SDXL, FLUX)
CLIP_L_PROJECTED = 123_650_304  # CLIPTextModelWithProjection (SD3): + the 768 x 768 projection
CLIP_G = 694_659_840  # OpenCLIP bigG as CLIPTextModelWithProjection
SDXL_UNET = 2_567_463_684
SDXL_VAE = 83_653_863
SD2_UNET = 865_910_724  # SD 2.x's UNet, which SD-Turbo distils
SD2_TEXT_ENCODER = 340_387_840  # OpenCLIP ViT-H/14's text tower as CLIPTextModel
FLOW_VAE = 83_819_683  # FLUX.1 and SD3: 16 latent channels, no quant convs
# keras-hub's SD3.5-large preset counts CLIP-L + CLIP-G + MMDiT + VAE, and the MMDiT's stored
# 192 x 192 position-embedding table (a fixed buffer, not a parameter); the same accounting
# gives its SD3-medium figure exactly from diffusers' 2,028,328,000-parameter SD3-medium MMDiT.
SD35_LARGE_KERAS_PRESET = 9_048_410_595
SD35_POS_EMBED_TABLE = 192 * 192 * 2432
SD35_LARGE_MMDIT = SD35_LARGE_KERAS_PRESET - CLIP_L_PROJECTED - CLIP_G - FLOW_VAE - SD35_POS_EMBED_TABLE

# FLUX.2, at the pinned revisions: the public anatomy of FLUX.2-dev @ 26afe3a7 lists "denoiser /
# conditioner / VAE: 32,223,281,152 / 24,011,361,280 / 84,046,372" (the VAE figure counts its
# 257 batch-norm statistics: 84,046,115 parameters); [klein] 4B's transformer "3,875,544,576";
# its text encoder is Qwen3-4B (4,022,468,096, the Hub's safetensors total).
FLUX2_DEV_TRANSFORMER, MISTRAL3_24B, FLUX2_VAE = 32_223_281_152, 24_011_361_280, 84_046_372 - 257
KLEIN_4B_TRANSFORMER, QWEN3_4B = 3_875_544_576, 4_022_468_096

# Qwen-Image / Qwen-Image-Edit-2509 (same architecture): the 20B MMDiT, Qwen2.5-VL-7B-Instruct (with its
# vision tower and untied LM head, as the pipelines load it) and the causal 3D VAE; Z-Image-Turbo: its 6B DiT,
# Qwen3-4B (tied embeddings) and the FLUX.1 VAE. Sources: architectures/README.md.
QWEN_IMAGE_MMDIT = 20_430_401_088
QWEN25_VL_7B = 8_292_166_656
QWEN_IMAGE_VAE = 126_892_531
QWEN_IMAGE = {"transformer": QWEN_IMAGE_MMDIT, "text_encoder": QWEN25_VL_7B, "vae": QWEN_IMAGE_VAE}
PUBLISHED = {
    "flux-dev": {"transformer": 11_901_408_320, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL_ENCODER,
                 "vae": FLOW_VAE},
    # schnell has no guidance embedder: 10,229,760 parameters fewer than dev.
    "flux-schnell": {"transformer": 11_891_178_560, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL_ENCODER,
                     "vae": FLOW_VAE},
    "sdxl": {"unet": SDXL_UNET, "text_encoder": CLIP_L, "text_encoder_2": CLIP_G, "vae": SDXL_VAE},
    "sdxl-turbo": {"unet": SDXL_UNET, "text_encoder": CLIP_L, "text_encoder_2": CLIP_G, "vae": SDXL_VAE},
    "sd3.5-large": {"transformer": SD35_LARGE_MMDIT, "text_encoder": CLIP_L_PROJECTED, "text_encoder_2": CLIP_G,
                    "text_encoder_3": T5_XXL_ENCODER, "vae": FLOW_VAE},
    "flux2-dev": {"transformer": FLUX2_DEV_TRANSFORMER, "text_encoder": MISTRAL3_24B, "vae": FLUX2_VAE},
    "flux2-klein-4b": {"transformer": KLEIN_4B_TRANSFORMER, "text_encoder": QWEN3_4B, "vae": FLUX2_VAE},
    "qwen-image": QWEN_IMAGE,
    "qwen-image-edit": QWEN_IMAGE,
    "z-image-turbo": {"transformer": 6_154_908_736, "text_encoder": QWEN3_4B, "vae": FLOW_VAE},
    "sd-turbo": {"unet": SD2_UNET, "text_encoder": SD2_TEXT_ENCODER, "vae": SDXL_VAE},  # SD's VAE = SDXL's shape
}
PIPELINE_CLASS = {"flux": "FluxPipeline", "stable-diffusion-xl": "StableDiffusionXLPipeline",
                  "stable-diffusion-3": "StableDiffusion3Pipeline", "flux2-dev": "Flux2Pipeline",
                  "flux2-klein-4b": "Flux2KleinPipeline", "qwen-image": "QwenImagePipeline",
                  "qwen-image-edit": "QwenImageEditPlusPipeline", "generic": "ZImagePipeline",
                  "stable-diffusion": "StableDiffusionPipeline"}


def model_config(model_id):
    return load_model_config(ROOT / "models" / f"{model_id}.yaml")


@pytest.fixture(scope="module")
def pipelines():
    return {m: full_size.build_pipeline(m, "meta", DTYPES[model_config(m).dtype]) for m in full_size.CATALOG}


def test_the_catalog_is_the_models_directory():
    production = {p.stem for p in (ROOT / "models").glob("*.yaml") if not p.stem.startswith("tiny-")}
    assert set(full_size.CATALOG) == production == set(PUBLISHED)
    assert {p.name for p in full_size.ARCHITECTURES.iterdir() if p.is_dir()} == production


@pytest.mark.parametrize("model_id", full_size.CATALOG)
def test_parameter_counts_equal_the_published_ones(pipelines, model_id):
    assert full_size.parameter_counts(pipelines[model_id]) == PUBLISHED[model_id]


def test_sd35_large_mmdit_figure():
    assert SD35_LARGE_MMDIT == 8_056_627_520  # the "8B" of the model card; 8.15 B stored with the table


@pytest.mark.parametrize("model_id", full_size.CATALOG)
def test_pipeline_class_dtype_and_meta_device(pipelines, model_id):
    config, pipeline = model_config(model_id), pipelines[model_id]
    assert type(pipeline).__name__ == PIPELINE_CLASS.get(model_id, PIPELINE_CLASS.get(config.family))
    for name in PUBLISHED[model_id]:
        tensors = list(getattr(pipeline, name).parameters())
        assert all(t.is_meta for t in tensors)  # nothing allocated
        assert {t.dtype for t in tensors} == {DTYPES[config.dtype]}


@pytest.mark.parametrize("model_id", full_size.CATALOG)
def test_tokenizers_have_the_real_prompt_lengths_and_encoders_the_real_vocabularies(pipelines, model_id):
    config, pipeline = model_config(model_id), pipelines[model_id]
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipeline, name, None)
        if tokenizer is None:
            continue
        encoder = getattr(pipeline, name.replace("tokenizer", "text_encoder"))
        vocab = encoder.config.get_text_config().vocab_size
        if config.family == "flux2":  # FLUX.2: a chat template around the prompt, 512 tokens read
            assert tokenizer.model_max_length == config.max_sequence_length == 512 and tokenizer.chat_template
            assert vocab == {"mistral3": 131072, "qwen3": 151936}[encoder.config.model_type]
        elif encoder.config.model_type in ("qwen2_5_vl", "qwen3"):  # a chat template; the pipeline caps the prompt
            assert type(tokenizer).__name__ == "Qwen2Tokenizer" and tokenizer.model_max_length == 131072
            assert vocab == {"qwen2_5_vl": 152064, "qwen3": 151936}[encoder.config.model_type]
            assert max(tokenizer("a lighthouse at dusk").input_ids) < vocab
            continue
        elif encoder.config.model_type == "t5":  # the T5 length this model is served with
            assert tokenizer.model_max_length == config.max_sequence_length
            assert vocab == 32128
        else:
            assert tokenizer.model_max_length == 77
            assert vocab == 49408
        ids = tokenizer(["a lighthouse at dusk"], padding="max_length", max_length=tokenizer.model_max_length).input_ids
        assert len(ids[0]) == tokenizer.model_max_length and max(ids[0]) < vocab


def test_sd_turbo_is_sd21_shaped_with_trailing_euler(pipelines):
    """SD-Turbo is SD 2.1 distilled: its UNet attends to the 1024-wide OpenCLIP states; its
    scheduler must start at the last timestep (trailing) for one step to work."""
    pipeline = pipelines["sd-turbo"]
    assert pipeline.unet.config.cross_attention_dim == pipeline.text_encoder.config.hidden_size == 1024
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipeline.scheduler.config.timestep_spacing == "trailing"
    pipeline.scheduler.set_timesteps(1)
    assert int(pipeline.scheduler.timesteps[0]) == 999


def test_schedulers_follow_the_published_configs(pipelines):
    assert pipelines["flux-dev"].scheduler.config.use_dynamic_shifting
    assert not pipelines["flux-schnell"].scheduler.config.use_dynamic_shifting
    assert type(pipelines["sdxl"].scheduler).__name__ == "EulerDiscreteScheduler"
    assert type(pipelines["sdxl-turbo"].scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    assert pipelines["sdxl-turbo"].scheduler.config.timestep_spacing == "trailing"
    assert pipelines["sd3.5-large"].scheduler.config.shift == 3.0
    # FLUX.2: FLUX.1-dev's scheduler config; the pipelines pass their own empirical mu.
    assert all(pipelines[m].scheduler.config.use_dynamic_shifting for m in ("flux2-dev", "flux2-klein-4b"))
    assert pipelines["flux2-klein-4b"].config.is_distilled
    for qwen in ("qwen-image", "qwen-image-edit"):  # the shift follows the token count, exponentially
        config = pipelines[qwen].scheduler.config
        assert config.use_dynamic_shifting and config.time_shift_type == "exponential"
        assert (config.shift_terminal, config.max_image_seq_len) == (0.02, 8192)
    assert pipelines["z-image-turbo"].scheduler.config.shift == 3.0


def test_qwen_image_edit_step_takes_three_references_at_1024_on_meta(pipelines):
    """4096 tokens for the image and 4096 for each 1024x1024 reference, beside the prompt's (with its
    vision tokens), through one guided step of the 20B MMDiT: every shape fits."""
    transformer, meta = pipelines["qwen-image-edit"].transformer, torch.device("meta")
    shapes = [[(1, 64, 64)] * 4] * 2  # the image, then three references; positive and negative rows
    with torch.inference_mode():
        [out] = transformer(hidden_states=torch.zeros(2, 4 * 4096, 64, device=meta, dtype=torch.bfloat16),
                            timestep=torch.full((2,), 0.5, device=meta, dtype=torch.bfloat16),
                            encoder_hidden_states=torch.zeros(2, 900, 3584, device=meta, dtype=torch.bfloat16),
                            encoder_hidden_states_mask=torch.ones(2, 900, device=meta, dtype=torch.bool),
                            img_shapes=shapes, return_dict=False)
    assert out.shape == (2, 4 * 4096, 64) and out.is_meta  # the first 4096 are stepped


@pytest.mark.parametrize("model_id", full_size.CATALOG)
def test_readme_memory_figures_are_the_computed_ones(pipelines, model_id):
    sizes = full_size.weight_bytes(pipelines[model_id])
    denoiser = "transformer" if "transformer" in sizes else "unet"
    # The README's model table, and any docs/ page that prints the same row (a family's own page).
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    rows = [line for doc in docs for line in doc.read_text().splitlines()
            if line.startswith(f"| `{model_id}` |") and line.count("|") >= 7]  # tables with a memory column
    assert rows, f"no memory row for {model_id}"
    dtype = model_config(model_id).dtype
    for row in rows:
        memory_cell = row.split("|")[5]
        assert f"{sum(sizes.values()) / 1e9:.1f} GB weights" in memory_cell
        assert f"{dtype}: {sizes[denoiser] / 1e9:.1f} GB {denoiser}" in memory_cell
        assert re.search(r"\d+ \N{MULTIPLICATION SIGN} (H100|L4)|CPU", memory_cell)


def test_flux_dev_pipeline_runs_a_step_at_full_size_on_meta(pipelines):
    """Every shape fits at 1024²: CLIP + T5 (512 tokens) into the transformer, 4096 image tokens."""
    with torch.inference_mode():
        latents = pipelines["flux-dev"](prompt=["a fox"], width=1024, height=1024, num_inference_steps=1,
                                        max_sequence_length=512, output_type="latent").images
    assert latents.shape == (1, 4096, 64) and latents.is_meta  # 64² tokens of 2x2 x 16 channels


def test_sdxl_pipeline_runs_a_step_at_full_size_on_meta(pipelines, monkeypatch):
    """Both CLIPs (and CLIP-G's pooled projection) into the UNet, with classifier-free guidance."""
    pipeline = pipelines["sdxl"]
    set_timesteps = pipeline.scheduler.set_timesteps
    # The scheduler copies its sigmas to the CPU, which a meta tensor cannot do: keep them there.
    monkeypatch.setattr(pipeline.scheduler, "set_timesteps",
                        lambda *args, device=None, **kwargs: set_timesteps(*args, device="cpu", **kwargs))
    with torch.inference_mode():
        latents = pipeline(prompt=["a fox"], negative_prompt=["blurry"], width=1024, height=1024,
                           num_inference_steps=1, output_type="latent").images
    assert latents.shape == (1, 4, 128, 128) and latents.is_meta


def test_sd35_large_transformer_step_fits_its_encoders_on_meta(pipelines):
    """CLIP-L + CLIP-G + T5 (256 tokens) embeddings into one guided MMDiT step at 1024²."""
    pipeline, meta = pipelines["sd3.5-large"], torch.device("meta")
    with torch.inference_mode():
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            prompt=["a fox"], prompt_2=None, prompt_3=None, device=meta, max_sequence_length=256)
        assert embeds.shape == (1, 77 + 256, 4096) and pooled.shape == (1, 768 + 1280)
        latents = torch.zeros(2, 16, 128, 128, device=meta, dtype=torch.bfloat16)
        [out] = pipeline.transformer(hidden_states=latents, timestep=torch.full((2,), 500.0, device=meta),
                                     encoder_hidden_states=torch.cat([negative, embeds]),
                                     pooled_projections=torch.cat([negative_pooled, pooled]), return_dict=False)
    assert out.shape == latents.shape


def test_flux2_dev_transformer_step_with_references_at_full_size_on_meta(pipelines):
    """The prompt (512 tokens of 3 x 5120 stacked Mistral states) and 1024² image tokens, plus
    4096 tokens for each of four 1024² references, through one step of the 32B transformer."""
    pipeline, meta, references = pipelines["flux2-dev"], torch.device("meta"), 4
    with torch.inference_mode():
        text = torch.zeros(2, 512, 15360, device=meta, dtype=torch.bfloat16)
        tokens = 4096 * (1 + references)
        hidden = torch.zeros(2, tokens, 128, device=meta, dtype=torch.bfloat16)
        ids = torch.zeros(1, tokens, 4, dtype=torch.long, device=meta)
        [out] = pipeline.transformer(hidden_states=hidden, encoder_hidden_states=text,
                                     timestep=torch.ones(2, device=meta), guidance=torch.full((2,), 4.0, device=meta),
                                     img_ids=ids,
                                     txt_ids=torch.zeros(1, 512, 4, dtype=torch.long, device=meta), return_dict=False)
    assert out.shape == (2, tokens, 128) and out.is_meta


def test_random_weights_materialise_in_the_models_dtype():
    """The GPU path, on the CPU with a small component: real random weights in the model's dtype."""
    vae = full_size.build_component("flux-dev", "vae", "cpu", torch.bfloat16)
    weights = vae.decoder.conv_in.weight
    assert weights.device.type == "cpu" and weights.dtype == torch.bfloat16 and weights.float().std() > 0
    with torch.inference_mode():
        image = vae.decode(torch.randn(1, 16, 4, 4, dtype=torch.bfloat16)).sample
    assert image.shape == (1, 3, 32, 32) and image.float().isfinite().all()


def test_unknown_model_is_refused():
    with pytest.raises(KeyError, match="tiny-sd"):
        full_size.build_pipeline("tiny-sd")
