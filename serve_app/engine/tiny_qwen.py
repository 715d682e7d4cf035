"""Tiny Qwen-Image pipelines, built locally like engine/tiny.py's: generation (`QwenImagePipeline`)
and Edit Plus (`QwenImageEditPlusPipeline`, 1-3 input images).

Each has the production structure at toy width: a Qwen2.5-VL text encoder (with its vision tower,
which reads Edit Plus's input images), a byte-level BPE tokenizer of the `Qwen2Tokenizer` class,
a Qwen2-VL processor (image processor + that tokenizer), the MMDiT transformer over 2x2 patches,
and the causal 3D VAE with the real 8x scale and its latents mean/std.

The tokenizer is trained here, in milliseconds, on the pipelines' own prompt templates, so that
each template's system prefix is exactly as many tokens as with the real Qwen tokenizer (34 for
generation, 64 for Edit Plus): the pipelines drop that many hidden states, and a tokenizer that
split the prefix otherwise would drop part of the user's prompt, or keep part of the template.
Any other text falls back to byte tokens, so every prompt maps to distinct ids (no <unk>).
"""

from __future__ import annotations

import json

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

# Qwen2's chat and vision markers (added tokens of the real tokenizer).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
TEXT_WIDTH = 32  # the text encoder's hidden size = the transformer's joint_attention_dim
LATENT_CHANNELS = 4


def _templates() -> list[str]:
    """The prompt templates the two pipelines format every prompt into (set in their __init__)."""
    from diffusers import QwenImageEditPlusPipeline, QwenImagePipeline

    blank = dict.fromkeys(("scheduler", "vae", "text_encoder", "tokenizer", "transformer"))
    return [QwenImagePipeline(**blank).prompt_template_encode,
            QwenImageEditPlusPipeline(**blank, processor=None).prompt_template_encode]


def qwen_tokenizer(max_length: int = 1024 + 64):
    """A `Qwen2Tokenizer` (byte-level BPE, Qwen2's pre-tokenizer) with a small vocabulary learned from
    the pipelines' templates."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    trainer_side = Tokenizer(models.BPE())
    trainer_side.normalizer = normalizers.NFC()
    trainer_side.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer_side.add_special_tokens(list(SPECIAL_TOKENS))
    corpus = [template.format("Picture 1: a photo") for template in _templates()] * 8
    trainer_side.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    ))
    learned = json.loads(trainer_side.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=learned["vocab"], merges=[tuple(m) for m in learned["merges"]],
                               model_max_length=max_length)
    tokenizer.add_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    return tokenizer


def _text_encoder(tokenizer):
    """Qwen2.5-VL at toy width: 2 text layers (multimodal RoPE) and a 2-layer vision tower that
    projects image patches into the text stream (Edit Plus's condition images)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": TEXT_WIDTH, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": len(tokenizer), "max_position_embeddings": 4096,
            # head dim 16: the multimodal RoPE sections (time, height, width) cover its 8 frequencies
            "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0, "bos_token_id": None, "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": TEXT_WIDTH, "fullatt_block_indexes": [1]},
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _components() -> dict:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tokenizer = qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_WIDTH,
        axes_dims_rope=(4, 6, 6),  # frame, height, width: sums to the head dim
    )
    # The joint attention normalises queries and keys (RMSNorm): at random init every key scores
    # alike and the prompt's few tokens barely steer the image (1-2 levels). A gain of 3 on the
    # text keys lets a prompt change the tiny model's image by ~10 levels, so tests can see it.
    for block in transformer.transformer_blocks:
        block.attn.norm_added_k.weight.data.fill_(3.0)
    # Four levels (three of them downsampling) -> the real 8x; latents normalised by a per-channel
    # mean/std as the real VAE's are. Narrow: this VAE's 3D convolutions are slow on a CPU.
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 1.2, 2.5],
    )
    # Qwen-Image's published scheduler: the shift follows the image's token count, exponentially.
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler, "text_encoder": _text_encoder(tokenizer),
            "tokenizer": tokenizer}


def build_tiny_qwen_image():
    from diffusers import QwenImagePipeline

    torch.manual_seed(0)
    return QwenImagePipeline(**_components())


def build_tiny_qwen_image_edit():
    """Edit Plus: the same shapes, other random weights, and the processor that turns each input
    image into vision tokens for the text encoder."""
    from diffusers import QwenImageEditPlusPipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from serve_app.engine.qwen_vl import ImageOnlyQwen2VLProcessor

    torch.manual_seed(1)
    components = _components()
    # The published processor's pixel bounds; patches of 14 px, merged 2x2 into one token each.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
    processor = ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=components["tokenizer"])
    return QwenImageEditPlusPipeline(**components, processor=processor)
