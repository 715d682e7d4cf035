"""LoRA adapters for the tiny models, built here as a trainer would leave them: PEFT layers with
random (but seeded, non-trivial) weights on a copy of the model, saved with the pipeline's own
`save_lora_weights` (diffusers/PEFT format, with the adapter config as metadata). Also: the same
weights renamed to the kohya/A1111 layout, and diffusers' reference image for an adapter.

Used by the unit and integration tests and by benchmarks/loras.py."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from serve_app.config import ModelConfig, load_model_config

MODELS = Path(__file__).resolve().parents[1] / "models"
DENOISER_TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0", "conv1"],  # conv1: a Conv2d LoRA too
                    "transformer": ["to_q", "to_k", "to_v", "to_out.0"]}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@functools.cache
def tiny_model(model_id: str) -> ModelConfig:
    return load_model_config(MODELS / f"{model_id}.yaml")


def fresh_pipeline(model_id: str):
    from serve_app.engine.weights import load_pipeline

    pipe = load_pipeline(tiny_model(model_id), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_adapters(model_id: str, folder: Path, seeds: dict[str, int], *, rank: int = 4, strength: float = 1.0,
                  text_encoder: bool = True, targets: list[str] | None = None) -> dict[str, Path]:
    """Random LoRAs for the model, one per name (seeded), written to `folder/<name>.safetensors`.
    `strength` scales the up-projections: how far an adapter moves the image."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = fresh_pipeline(model_id)
    denoiser = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    encoders = [n for n in type(pipe)._lora_loadable_modules if n.startswith("text_encoder")] if text_encoder else []
    paths = {}
    for name, seed in seeds.items():
        torch.manual_seed(seed)
        layers, metadata = {}, {}
        for component in [denoiser, *encoders]:
            module = getattr(pipe, component)
            config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=(targets or DENOISER_TARGETS[denoiser]) if component == denoiser
                                else TEXT_TARGETS)
            inject_adapter_in_model(config, module, name)
            state = get_peft_model_state_dict(module, adapter_name=name)
            layers[f"{component}_lora_layers"] = _scaled(state, strength)
            metadata[f"{component}_lora_adapter_metadata"] = config.to_dict()
        folder.mkdir(parents=True, exist_ok=True)
        type(pipe).save_lora_weights(str(folder), weight_name=f"{name}.safetensors", safe_serialization=True,
                                     **layers, **metadata)
        paths[name] = folder / f"{name}.safetensors"
    return paths


def _scaled(state_dict: dict[str, torch.Tensor], strength: float) -> dict[str, torch.Tensor]:
    # PEFT's non-default init makes B as large as A; a tenth keeps the image in range.
    return {k: v * (0.1 * strength) if "lora_B" in k else v for k, v in state_dict.items()}


def to_kohya(source: Path, target: Path, denoiser: str = "unet") -> Path:
    """The same adapter in the kohya/A1111 layout (`lora_unet_down_blocks_0_..._to_q.lora_down.weight`,
    `.lora_up.weight`, `.alpha`), as sd-scripts writes it; alpha = rank, so the scaling is 1."""
    from safetensors.torch import load_file, save_file

    prefixes = {"unet": "lora_unet", "transformer": "lora_unet", "text_encoder": "lora_te1",
                "text_encoder_2": "lora_te2"}
    tensors = {}
    for key, value in load_file(str(source)).items():
        component, _, rest = key.partition(".")
        module, _, which = rest.rpartition(".lora_")  # "...to_q", "A.weight"
        if component.startswith("text_encoder"):
            module = module.removeprefix("text_model.")
            module = f"text_model.{module}" if not module.startswith("text_model") else module
        name = f"{prefixes[component]}_{module.replace('.', '_')}"
        tensors[f"{name}.lora_{'down' if which.startswith('A') else 'up'}.weight"] = value.contiguous()
        if which.startswith("B"):
            tensors[f"{name}.alpha"] = torch.tensor(float(value.shape[1]))
    save_file(tensors, str(target))
    return target
