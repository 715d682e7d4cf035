"""The production catalog's pipelines at full size, assembled from their published configs.

`architectures/<model id>/` mirrors the Hub layout of each catalog model (`model_index.json`,
`<component>/config.json`, `scheduler/scheduler_config.json`), transcribed from the pinned
revisions (sources: `architectures/README.md`). Speed and memory do not depend on the weights'
values, so a pipeline built here with random weights does exactly the work of the real one:

- on the `meta` device it costs no memory and a second, and its parameter counts can be checked
  against the published ones on any machine;
- on a GPU its random weights are created directly there, in the model's dtype (no download:
  the Hub is unreachable from our machines).

Tokenizers are built locally (as for the tiny models) with the real prompt lengths: CLIP 77,
T5 as in `tokenizer*/tokenizer_config.json`; the encoders keep their real vocabulary sizes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from serve_app.engine.qwen_vl import ImageOnlyQwen2VLProcessor
from serve_app.engine.tiny import _tokenizer
from serve_app.engine.tiny_qwen import qwen_tokenizer

ARCHITECTURES = Path(__file__).with_name("architectures")
CATALOG = ("flux-dev", "flux-schnell", "sdxl", "sdxl-turbo", "sd3.5-large", "sd-turbo", "flux2-dev", "flux2-klein-4b",
           "qwen-image", "qwen-image-edit", "z-image-turbo")
# Pipeline components that hold weights, in the order the tables print them.
WEIGHTED = ("transformer", "unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def component_specs(model_id: str) -> dict[str, tuple[str, str]]:
    """`{component: (library, class name)}` from the model's `model_index.json`."""
    index = _read(model_id, "model_index.json")
    return {name: tuple(spec) for name, spec in index.items()
            if not name.startswith("_") and isinstance(spec, list) and spec[0] is not None}


def _read(model_id: str, relative: str) -> dict:
    if model_id not in CATALOG:
        raise KeyError(f"no full-size architecture for {model_id!r}; known: {list(CATALOG)}")
    return json.loads((ARCHITECTURES / model_id / relative).read_text())


@contextlib.contextmanager
def _materialise(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Create tensors directly on `device` in `dtype`: no float32 copy on the CPU first."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_component(model_id: str, name: str, device: str = "meta", dtype: torch.dtype = torch.bfloat16):
    """One component of a catalog model, from its published config: random weights on `device`."""
    import diffusers
    import transformers

    library, class_name = component_specs(model_id)[name]
    if name.startswith("tokenizer"):
        config = _read(model_id, f"{name}/tokenizer_config.json")
        if "chat_template" in config:  # FLUX.2: the prompt inside a chat template (Mistral's, Qwen's)
            from serve_app.engine.tiny_flux2 import chat_tokenizer

            return chat_tokenizer(config["model_max_length"], config["chat_template"])
        if config["tokenizer_class"] == "Qwen2Tokenizer":  # Qwen-Image, Z-Image: byte-level BPE (tiny_qwen.py)
            return qwen_tokenizer(config["model_max_length"])
        # CLIP wraps a prompt in start/end tokens; T5 only appends </s>.
        return _tokenizer(config["model_max_length"], bos_eos=config["tokenizer_class"] == "CLIPTokenizer")
    if name == "processor":  # Qwen-Image-Edit's Qwen2-VL processor: the published image settings
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        settings = _read(model_id, "processor/preprocessor_config.json")
        options = {k: v for k, v in settings.items() if not k.endswith(("_type", "_class"))}
        return ImageOnlyQwen2VLProcessor(Qwen2VLImageProcessorPil(**options), qwen_tokenizer())
    if name == "scheduler":
        return getattr(diffusers, class_name).from_config(_read(model_id, "scheduler/scheduler_config.json"))
    config = _read(model_id, f"{name}/config.json")
    with _materialise(device, dtype):
        if library == "diffusers":
            module = getattr(diffusers, class_name).from_config(config)
        else:
            module = getattr(transformers, class_name)(transformers.AutoConfig.for_model(**config))
    # Floating buffers made in float32 on purpose (SD3's position-embedding table) take the
    # model's dtype too, as `from_pretrained(torch_dtype=...)` would give them.
    if any(b.is_floating_point() and b.dtype != dtype for b in module.buffers()):
        torch.nn.Module.to(module, dtype)  # torch's own `to`: diffusers' override warns about fp32 modules here
    return module.eval()


def build_pipeline(model_id: str, device: str = "meta", dtype: torch.dtype = torch.bfloat16):
    """The model's diffusers pipeline with random weights on `device` (`meta`: no memory at all)."""
    import diffusers

    index = _read(model_id, "model_index.json")
    components = {name: build_component(model_id, name, device, dtype) for name in component_specs(model_id)}
    # Pipeline arguments that are not components (e.g. SDXL's force_zeros_for_empty_prompt).
    options = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    # Components the index leaves empty ([null, null]: SD's safety checker) are passed as None, as
    # from_pretrained does.
    empty = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    pipeline = getattr(diffusers, index["_class_name"])(**components, **empty, **options)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def parameter_counts(pipeline) -> dict[str, int]:
    """Parameters per weighted component (tied weights counted once, as `parameters()` does)."""
    counts = {}
    for name in WEIGHTED:
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            counts[name] = sum(p.numel() for p in module.parameters())
    return counts


def weight_bytes(pipeline) -> dict[str, int]:
    """Bytes each weighted component occupies on its device at the dtype it was built in:
    parameters plus buffers (e.g. SD3's fixed position-embedding table). Activations come on top."""
    sizes = {}
    for name in WEIGHTED:
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            tensors = [*module.parameters(), *module.buffers()]
            sizes[name] = sum(t.numel() * t.element_size() for t in tensors)
    return sizes
