"""Tiny FLUX.2 pipelines built locally (no download): [dev] (`Flux2Pipeline`: a Mistral-3
text encoder with a Pixtral vision tower, guidance embedded in the transformer) and [klein]
(`Flux2KleinPipeline`: a Qwen-3 text encoder; distilled, or base with true CFG).

Their text encoders are as deep as the real ones' prompt layers need — [dev] stacks the hidden
states of layers 10, 20 and 30, [klein] of 9, 18 and 27 — but a few dozen values wide, and
their tokenizers are `tiny.py`'s synthetic word-level ones with the chat template each pipeline
formats its prompt with (Mistral's `[SYSTEM_PROMPT]…[INST]…[/INST]`, Qwen's `<|im_start|>…`).
The VAE has four levels and 2x2 latent patching, as FLUX.2's: with the transformer's packing,
sides are multiples of 16 and a 1024² image is 4096 tokens, as in production.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

TEXT_WIDTH = 32  # each stacked hidden state; the transformer reads three of them side by side
# What `apply_chat_template` renders, close to each model's own template for text-only prompts.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set text = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT] {{ text }} [/SYSTEM_PROMPT]"
    "{% else %}[INST] {{ text }} [/INST]{% endif %}{% endfor %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant "
    "{% if enable_thinking is defined and enable_thinking is false %}<think> </think> {% endif %}{% endif %}"
)
# Each style's template and the special tokens it writes.
CHAT_STYLES = {
    "mistral": (MISTRAL_TEMPLATE, ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]"]),
    "qwen": (QWEN_TEMPLATE, ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]),
}


def chat_tokenizer(max_length: int, style: str) -> PreTrainedTokenizerFast:
    """The synthetic word-level tokenizer with a chat template (CHAT_STYLES); its special
    tokens stay whole. Also the full-size pipelines' tokenizer (full_size.py)."""
    from serve_app.engine.tiny import _tokenizer  # tiny.py imports this module (TINY_BUILDERS)

    template, specials = CHAT_STYLES[style]
    tokenizer = _tokenizer(max_length, bos_eos=False)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    return tokenizer


def _transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels, 2x2-patched by the VAE
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=3 * TEXT_WIDTH,
        timestep_guidance_channels=32,
        axes_dims_rope=(8, 8, 8, 8),  # (T, H, W, L): sums to attention_head_dim
        guidance_embeds=guidance_embeds,
    )
    # At the default initialisation the blocks' gates (from the timestep modulation) are so small
    # that the output is nearly a linear map of the noisy latents alone: prompt and references
    # would barely show. Larger modulation weights and sharper attention let them through.
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "modulation" in name:
                parameter.mul_(20.0)
            elif ".norm_q." in name or ".norm_k." in name or "norm_added_" in name:
                parameter.fill_(3.0)
    return transformer


def _vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=256,
    )
    # Latents are normalised by the VAE's batch-norm statistics: make them non-trivial, so a
    # runner that forgot them would not match the pipeline.
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.num_features))
    vae.bn.running_var.copy_(1.0 + 0.5 * torch.rand(vae.bn.num_features))
    return vae


def build_tiny_flux2():
    """FLUX.2 [dev]'s shape: a guidance-distilled transformer over a Mistral-3 text encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    tokenizer = chat_tokenizer(512, "mistral")
    text = {"vocab_size": len(tokenizer), "hidden_size": TEXT_WIDTH, "intermediate_size": 37, "num_hidden_layers": 30,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 1024,
            "rope_theta": 1e9, "sliding_window": None, "pad_token_id": 2, "bos_token_id": 0, "eos_token_id": 1}
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 37,
              "image_size": 30, "patch_size": 6, "head_dim": 4}
    config = Mistral3Config(text_config={"model_type": "mistral", **text},
                            vision_config={"model_type": "pixtral", **vision},
                            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), tie_word_embeddings=False)
    return Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=_vae(), text_encoder=Mistral3ForConditionalGeneration(config), tokenizer=tokenizer,
        transformer=_transformer(guidance_embeds=True),
    )


def build_tiny_flux2_klein(distilled: bool = True):
    """FLUX.2 [klein]'s shape: no guidance embedding, a Qwen-3 text encoder; `distilled` False is
    the base model, which runs true CFG against an empty prompt at guidance > 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    tokenizer = chat_tokenizer(512, "qwen")
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=28,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=2)
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=_vae(), text_encoder=Qwen3ForCausalLM(config), tokenizer=tokenizer,
        transformer=_transformer(guidance_embeds=False), is_distilled=distilled,
    )
