"""Qwen2-VL's processor for Qwen-Image-Edit, without the video processor it never uses.

transformers 5 builds `Qwen2VLProcessor` with a video processor, and that one needs torchvision:
without it (a CPU torch here: PyPI's torchvision wheels are CUDA builds that cannot load against
it) the processor, and so `QwenImageEditPlusPipeline.from_pretrained`, fails. The edit pipeline
only ever gives it text and images, so this subclass takes the image processor and the tokenizer
alone: same tokens, same pixel values as the full processor with the same image processor.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from serve_app.config import ModelConfig

#: families whose pipelines take a Qwen2-VL `processor` component
PROCESSOR_FAMILIES = ("qwen-image-edit",)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` with an image processor and a tokenizer, and no video processor."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any):
        # What Qwen2VLProcessor.__init__ sets before handing its three parts to ProcessorMixin.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def pipeline_overrides(model: ModelConfig, source: str, hub: bool) -> dict[str, Any]:
    """Components to hand `DiffusionPipeline.from_pretrained` instead of loading them itself: the
    processor of a Qwen-Image-Edit pipeline, from its `processor/` folder (the Hub's layout)."""
    if model.family not in PROCESSOR_FAMILIES:
        return {}
    options: dict[str, Any] = {"subfolder": "processor"}
    if hub:
        options.update(revision=model.revision, token=os.environ.get("HF_TOKEN") or None,
                       cache_dir=os.environ.get("ARTSERVE_HF_CACHE") or None)
    return {"processor": ImageOnlyQwen2VLProcessor.from_pretrained(source, **options)}
