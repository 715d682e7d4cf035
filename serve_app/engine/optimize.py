"""The loading options of a model YAML's `engine:` section, applied to a loaded pipeline.

`plan()` decides, from the options and the hardware alone, what to apply and why anything
is skipped (pure: tested on CPU for any GPU); `apply()` does it. Nothing is silently
dropped: every skipped option is logged with its reason."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from serve_app.config import EngineOptions

logger = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and later have fp8 tensor cores
CPU_ATTENTION_BACKENDS = {"native"}  # the others are CUDA kernels


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    capability: tuple[int, int] | None = None
    torchao: bool = False

    @classmethod
    def detect(cls) -> Hardware:
        cuda = torch.cuda.is_available()
        return cls(
            cuda=cuda,
            capability=torch.cuda.get_device_capability() if cuda else None,
            torchao=importlib.util.find_spec("torchao") is not None,
        )


@dataclass(frozen=True)
class Step:
    option: str
    skipped: str | None = None  # why not, or None when applied


def plan(options: EngineOptions, hardware: Hardware) -> list[Step]:
    """Each option that is set, in the order it is applied, with a reason if it cannot be."""
    steps = []
    if options.cpu_offload:
        steps.append(Step("cpu_offload", None if hardware.cuda else "needs CUDA: there is no GPU memory to save"))
    if options.quantization:
        reason = None
        if not hardware.torchao:
            reason = "torchao is not installed (pip install 'artserve[gpu]')"
        elif not hardware.cuda:
            reason = "needs CUDA"
        elif options.quantization == "fp8" and (hardware.capability or (0, 0)) < FP8_MIN_CAPABILITY:
            reason = f"fp8 needs compute capability {FP8_MIN_CAPABILITY}, this GPU has {hardware.capability}"
        steps.append(Step(f"quantization={options.quantization}", reason))
    if options.quantize_text_encoders:
        steps.append(Step("quantize_text_encoders", "needs `quantization`" if not options.quantization else
                          next(s.skipped for s in steps if s.option.startswith("quantization="))))
    if options.fuse_qkv:
        steps.append(Step("fuse_qkv"))
    if options.channels_last:
        steps.append(Step("channels_last"))
    if options.attention_backend:
        cpu_ok = options.attention_backend in CPU_ATTENTION_BACKENDS
        steps.append(Step(f"attention_backend={options.attention_backend}",
                          None if hardware.cuda or cpu_ok else "a CUDA kernel; no GPU here"))
    if options.vae_tiling:
        steps.append(Step("vae_tiling"))
    if options.vae_slicing:
        steps.append(Step("vae_slicing"))
    if options.compile:
        steps.append(Step(f"compile({options.compile_mode})",
                          None if hardware.cuda else "CUDA only: on CPU the compile time outweighs the gain"))
    return steps


def denoiser(pipeline) -> torch.nn.Module:
    return getattr(pipeline, "transformer", None) or pipeline.unet


def text_encoders(pipeline) -> list[torch.nn.Module]:
    return [m for m in (getattr(pipeline, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
            if isinstance(m, torch.nn.Module)]


def quantizer(quantization: str):
    """torchao's in-place weight quantization of a module, for `quantization`."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig, quantize_

    config = Float8DynamicActivationFloat8WeightConfig() if quantization == "fp8" else Int8WeightOnlyConfig()
    return lambda module: quantize_(module, config)


def apply(pipeline, options: EngineOptions, steps: list[Step], device: str, model_id: str) -> list[str]:
    """Place the pipeline on `device` and apply the planned steps; return what was applied."""
    applied = []
    active = {s.option.split("=")[0] for s in steps if not s.skipped}
    net = denoiser(pipeline)
    quantized = ([net] if "quantization" in active else []) + (
        text_encoders(pipeline) if "quantize_text_encoders" in active else [])
    if "cpu_offload" in active and options.cpu_offload == "sequential":
        pipeline.enable_sequential_cpu_offload()
    elif "cpu_offload" in active:
        pipeline.enable_model_cpu_offload()
    # One module at a time onto the GPU, quantized there before the next comes: FLUX.2 [dev]'s
    # bf16 weights (112.6 GB) would not fit on an 80 GB GPU all at once. (Offloaded: on the CPU.)
    for module in quantized:
        if "cpu_offload" not in active:
            module.to(device)
        quantizer(options.quantization)(module)  # type: ignore[arg-type]
    if "cpu_offload" not in active:
        pipeline.to(device)
    for step in steps:
        if step.skipped:
            logger.warning("model %s: %s skipped: %s", model_id, step.option, step.skipped)
            continue
        name = step.option.split("=")[0].split("(")[0]
        if name in ("cpu_offload", "quantization", "quantize_text_encoders"):
            pass  # placed and quantized above
        elif name == "fuse_qkv":
            if not hasattr(net, "fuse_qkv_projections"):
                logger.warning("model %s: fuse_qkv skipped: %s has no fused projections",
                               model_id, type(net).__name__)
                continue
            net.fuse_qkv_projections()
        elif name == "channels_last":
            pipeline.vae.to(memory_format=torch.channels_last)
            if net is getattr(pipeline, "unet", None):
                net.to(memory_format=torch.channels_last)
        elif name == "attention_backend":
            net.set_attention_backend(options.attention_backend)
        elif name == "vae_tiling":
            pipeline.vae.enable_tiling()
        elif name == "vae_slicing":
            pipeline.vae.enable_slicing()
        elif name == "compile":
            net.compile(mode=options.compile_mode)
        applied.append(step.option)
    if applied:
        logger.info("model %s: applied %s", model_id, ", ".join(applied))
    return applied
