"""One adapter file → the LoRA layers it adds to this replica's pipeline, built off the step loop.

Diffusers does the format work, as `pipe.load_lora_weights` would: its pipeline's
`lora_state_dict` reads diffusers/PEFT files and converts kohya/A1111 ones, its
`load_lora_adapter` builds the denoiser's PEFT layers; the text encoders' come from PEFT with
diffusers' own key conversion. But everything is built in a *shadow*: a copy of each component's
module tree that shares the live weights. The live modules are never touched — the step loop may
be running a forward on them — and from the shadow we keep, per live layer, PEFT's lora_A and
lora_B modules and its scaling (alpha / rank). `rows.py` applies them per batch row.

What does not fit is refused here, with a reason for the client (no path) and the detail for
the log: a file that is not safetensors, DoRA/LoKr/LoHa, control LoRAs that change the base
weights, and tensors that match no layer of this model or have other shapes."""

from __future__ import annotations

import copy
import hashlib
import inspect
import itertools
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("ray.serve")

# Key fragments of adapter kinds this engine does not apply (it adds B(A(x)) per row, nothing else).
UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lokr_": "LoKr", "hada_": "LoHa",
               "oft_": "OFT", "lora_controlnet": "a control LoRA"}
HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
              "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")
TEXT_ENCODER_LAYERS = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")  # diffusers' rank keys
NOT_FITTING = "its tensors do not fit this model (an adapter for another model family, or of other shapes)"


class AdapterRefused(ValueError):
    """A file this model cannot use: `reason` is for the client (never a path), str() for the log."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """PEFT's two LoRA modules for one live layer, and its scaling (alpha / rank)."""

    down: nn.Module  # lora_A: in → rank (a Linear, or a Conv2d with the base layer's kernel)
    up: nn.Module  # lora_B: rank → out
    scaling: float

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """B(A(x)) in the adapter's dtype (PEFT keeps fp16/bf16 adapters in float32)."""
        return self.up(self.down(x.to(self.down.weight.dtype)))


@dataclass(eq=False)
class Adapter:
    key: str  # unique per file content: "<name>@<sha256 prefix>"
    name: str
    sha256: str
    layers: dict[nn.Module, LoraLayer]  # live module → what it adds
    components: tuple[str, ...]  # the pipeline components it touches (unet, text_encoder, ...)

    @property
    def nbytes(self) -> int:
        tensors = itertools.chain.from_iterable(
            itertools.chain(layer.down.parameters(), layer.up.parameters()) for layer in self.layers.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def sha256_of(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def shadow_of(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer with `module` and has no
    hooks, so PEFT may wrap its layers while the live tree goes on running (and the live tree's
    hook tables, which the loop thread may change, are never read)."""
    memo: dict[int, Any] = {}
    for sub in module.modules():
        for name in HOOK_DICTS:
            table = sub.__dict__.get(name)
            if table is not None:
                memo[id(table)] = OrderedDict()
        for tensor in itertools.chain(sub._parameters.values(), sub._buffers.values()):
            if tensor is not None:
                memo[id(tensor)] = tensor
    return copy.deepcopy(module, memo)


class AdapterReader:
    """Builds `Adapter`s for one pipeline. Not thread-safe: the manager runs one load at a time."""

    def __init__(self, pipeline: Any):
        self.pipe = pipeline
        self.components = [name for name in getattr(type(pipeline), "_lora_loadable_modules", [])
                           if isinstance(getattr(pipeline, name, None), nn.Module)]

    def read(self, path: Path, name: str, sha256: str) -> Adapter:
        self._check_kind(path)
        state_dict, alphas, metadata = self._state_dict(path)
        parts = {c: {k: v for k, v in state_dict.items() if k.startswith(f"{c}.")} for c in self.components}
        stray = set(state_dict) - set().union(*parts.values())
        if stray or not state_dict:
            raise AdapterRefused(NOT_FITTING, f"{len(stray)} tensors for components this pipeline does not have "
                                 f"(it has {self.components}), e.g. {sorted(stray)[:3]}")
        key = f"{name}@{sha256[:16]}"
        layers: dict[nn.Module, LoraLayer] = {}
        for component, part in parts.items():
            if not part:
                continue
            live = getattr(self.pipe, component)
            shadow = shadow_of(live)
            try:
                if hasattr(shadow, "load_lora_adapter"):  # a diffusers denoiser
                    shadow.load_lora_adapter(part, prefix=component, network_alphas=alphas, metadata=metadata,
                                             adapter_name=key, low_cpu_mem_usage=False)
                else:  # a transformers text encoder
                    self._load_text_encoder(shadow, part, alphas, metadata, component, key)
            except AdapterRefused:
                raise
            except Exception as exc:  # PEFT/diffusers: a target module not found, a size mismatch, ...
                raise AdapterRefused(NOT_FITTING, f"{component}: {type(exc).__name__}: {exc}") from None
            found = harvest(shadow, live, key)
            used = sum(2 + (layer.up.bias is not None) for layer in found.values())  # A, B, B's bias
            if used != len(part):
                raise AdapterRefused(NOT_FITTING, f"{component}: {len(part) - used} of its {len(part)} tensors "
                                     "match no layer")
            layers.update(found)
        return Adapter(key, name, sha256, layers, tuple(c for c, part in parts.items() if part))

    def _check_kind(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                keys = list(file.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise AdapterRefused("it is not a readable safetensors file (corrupt or truncated)", str(exc)) from None
        for fragment, kind in UNSUPPORTED.items():
            if any(fragment in k for k in keys):
                raise AdapterRefused(f"it is {kind}, and only plain LoRA adapters are supported",
                                     f"keys with {fragment!r}")

    def _state_dict(self, path: Path) -> tuple[dict[str, torch.Tensor], dict | None, dict | None]:
        """The pipeline's own reading and conversion (kohya/A1111 included), as load_lora_weights does it."""
        reader = type(self.pipe).lora_state_dict
        kwargs: dict[str, Any] = {"return_lora_metadata": True, "use_safetensors": True}
        accepted = inspect.signature(reader).parameters
        if "return_alphas" in accepted:
            kwargs["return_alphas"] = True
        if "unet" in self.components and type(self.pipe).__name__.startswith("StableDiffusionXL"):
            kwargs["unet_config"] = self.pipe.unet.config  # SDXL maps kohya's SGM block names with it
        try:
            out = reader(str(path), **kwargs)
        except Exception as exc:
            raise AdapterRefused(NOT_FITTING, f"{type(exc).__name__}: {exc}") from None
        state_dict, alphas, metadata = out if len(out) == 3 else (out[0], None, out[1])
        norms = [k for k in state_dict if "lora" not in k]
        if norms:  # FLUX control LoRAs replace norm weights of the base model itself
            raise AdapterRefused("it replaces weights of the base model (a control LoRA), which per-request "
                                 "adapters cannot do", f"e.g. {norms[:3]}")
        return state_dict, alphas or None, metadata

    @staticmethod
    def _load_text_encoder(shadow: nn.Module, part: dict[str, torch.Tensor], alphas: dict | None,
                           metadata: dict | None, component: str, key: str) -> None:
        """Diffusers' `_load_lora_into_text_encoder`, with PEFT called directly: the same keys, ranks
        and config, without transformers' loader (which needs a newer PEFT and may move weights)."""
        from diffusers.utils.peft_utils import _create_lora_config
        from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        prefix = f"{component}."
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
            {k.removeprefix(prefix): v for k, v in part.items()}))
        if not hasattr(shadow, "text_model"):  # recent transformers flatten CLIPTextModel
            part = {k.removeprefix("text_model."): v for k, v in part.items()}
        rank = {f"{n}.lora_B.weight": part[f"{n}.lora_B.weight"].shape[1] for n, _ in shadow.named_modules()
                if n.endswith(TEXT_ENCODER_LAYERS) and f"{n}.lora_B.weight" in part}
        if alphas:
            alphas = {k.removeprefix(prefix): v for k, v in alphas.items() if k.split(".")[0] == component}
        if metadata:
            metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)}
        config = _create_lora_config(part, alphas or None, metadata or None, rank, is_unet=False)
        inject_adapter_in_model(config, shadow, key)
        result = set_peft_model_state_dict(shadow, part, key)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
        if unexpected:
            raise AdapterRefused(NOT_FITTING, f"{component}: unexpected keys {unexpected[:3]}")


FUSED_AWAY = {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}  # what fuse_qkv replaces


def harvest(shadow: nn.Module, live: nn.Module, key: str) -> dict[nn.Module, LoraLayer]:
    """The LoRA modules PEFT put into the shadow for adapter `key`, keyed by the live layer each
    belongs to (same path, same weight tensor)."""
    from peft.tuners.lora import layer as lora
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: dict[nn.Module, LoraLayer] = {}
    for path, module in shadow.named_modules():
        if not isinstance(module, BaseTunerLayer) or key not in getattr(module, "lora_A", {}):
            continue
        if module.use_dora.get(key) or key in getattr(module, "lora_variant", {}):
            raise AdapterRefused("it uses a LoRA variant (DoRA, ...), and only plain LoRA adapters are supported",
                                 path)
        if not isinstance(module, lora.Linear | lora.Conv2d):
            raise AdapterRefused(NOT_FITTING, f"{path}: a {type(module).__name__} layer (only Linear and Conv2d)")
        target = live.get_submodule(path)
        owner, _, leaf = path.rpartition(".")
        if leaf in FUSED_AWAY and getattr(live.get_submodule(owner), "fused_projections", False):
            # Fused attention (engine.fuse_qkv) calls to_qkv and never these layers: the adapter would
            # be listed as applied while part of it never runs.
            raise AdapterRefused("the model runs fused attention projections (engine.fuse_qkv: true), which "
                                 "bypass the layers it adapts; serve it with engine.fuse_qkv: false", path)
        if getattr(target, "weight", None) is not module.base_layer.weight:
            raise AdapterRefused(NOT_FITTING, f"{path}: not the live layer")  # a model PEFT restructured
        down, up = module.lora_A[key], module.lora_B[key]
        for part in (down, up):
            part.eval().requires_grad_(False)
        found[target] = LoraLayer(down, up, float(module.scaling[key]))
    return found
