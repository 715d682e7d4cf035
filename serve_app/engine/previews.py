"""Preview decoders: what a streamed partial image is decoded with (`previews:` in the model
YAML). A full VAE decode per preview costs about a denoising step or more (SDXL, the few-step
models); image UIs decode previews cheaply instead, and so do we:

- `tae`: a tiny autoencoder (diffusers' `AutoencoderTiny`, Ollin Boer Bohan's TAESD family:
  `madebyollin/taesd`, `taesdxl`, `taesd3`, `taef1`) — about 5 % of the VAE's FLOPs at any size;
  for the tiny models a random one with the published block layout, built at replica start
  from a fixed seed (no cached files to version, nothing downloaded);
- `latent_rgb`: a linear map from the latent channels to RGB at latent resolution, upsampled to
  the requested size — a few thousand FLOPs per pixel less than anything else; the published
  per-family factors, or for the tiny models a least-squares fit against the model's own VAE at
  replica start.

Both take the latents the denoiser works on ("diffusion space": scaled, shifted, FLUX's
unpacked), as ComfyUI's previewers and diffusers pipelines with an `AutoencoderTiny` as their
VAE do, and return pixels in [-1, 1] at the requested size. A decoder that cannot be built
(unknown family, wrong channel count, weights unavailable) leaves `full`, with the reason in
the replica's log: a preview is a courtesy, the final image is always the full decode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from serve_app.config import PreviewSettings, TinyAutoencoderSource

logger = logging.getLogger("ray.serve")

# Per family: (factors, one row of R, G, B weights per latent channel; bias) as ComfyUI ships them
# (Comfy-Org/ComfyUI, comfy/latent_formats.py @ 9a9a69fd745de98e89b0f1a629cd3bc43d513a42: classes SD15
# (also SD 2.x: same VAE), SDXL, SD3, Flux), applied there to x0 in diffusion space, output in [-1, 1].
LATENT_RGB: dict[str, tuple[list[list[float]], list[float]]] = {
    "stable-diffusion": ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
                          [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0]),
    "stable-diffusion-xl": ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
                             [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
    "stable-diffusion-3": ([[-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458],
                            [0.0856, 0.0339, 0.0902], [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309],
                            [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358], [-0.0194, 0.0020, 0.0669],
                            [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
                            [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293],
                            [-0.1448, -0.1463, -0.1189]], [0.2394, 0.2135, 0.1925]),
    "flux": ([[-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433],
              [-0.0174, 0.0160, 0.0617], [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115],
              [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259], [-0.0245, 0.0250, 0.1180],
              [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
              [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499],
              [-0.1262, -0.0982, -0.0778]], [-0.0329, -0.0718, -0.0851]),
}
FIT_SEED = 0
TINY_TAE_SEED = 0
TINY_TAE_CHANNELS = 4  # the published layout (4 stages, 3/3/3/1 decoder blocks) at the tiny VAE's scale


class LatentRGB:
    """rgb = latents · factors + bias per latent pixel, then bilinear upsampling."""

    name = "latent_rgb"

    def __init__(self, factors: torch.Tensor, bias: torch.Tensor):
        self.factors, self.bias = factors, bias  # (channels, 3), (3,)

    @property
    def channels(self) -> int:
        return self.factors.shape[0]

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        factors = self.factors.to(latents.device, latents.dtype)
        bias = self.bias.to(latents.device, latents.dtype)[:, None, None]
        rgb = torch.einsum("bchw,cr->brhw", latents, factors) + bias
        return F.interpolate(rgb, size=(height, width), mode="bilinear", align_corners=False).clamp(-1, 1)

    @classmethod
    def fit(cls, vae_decode: Callable[[torch.Tensor], torch.Tensor], channels: int, latent_side: int = 32,
            samples: int = 4) -> tuple[LatentRGB, float]:
        """Least squares from latent pixels to the VAE's output averaged over each latent
        pixel's patch, on seeded N(0, 1) latents (diffusion space has about unit variance:
        what the VAE's scaling factor is for). Returns the map and its R² on those samples."""
        generator = torch.Generator().manual_seed(FIT_SEED)
        latents = torch.randn(samples, channels, latent_side, latent_side, generator=generator)
        with torch.inference_mode():
            pixels = vae_decode(latents).float().cpu()
        target = F.adaptive_avg_pool2d(pixels, (latent_side, latent_side)).permute(0, 2, 3, 1).reshape(-1, 3)
        inputs = latents.permute(0, 2, 3, 1).reshape(-1, channels)
        design = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1).double()
        solution = torch.linalg.lstsq(design, target.double()).solution.float()
        residual = target - design.float() @ solution
        r2 = 1 - float(residual.pow(2).sum() / (target - target.mean(0)).pow(2).sum())
        return cls(solution[:channels], solution[channels]), r2


class TinyAutoencoder:
    """An `AutoencoderTiny`'s decoder, handed latents as diffusers pipelines hand any VAE
    (/ scaling_factor + shift_factor: 1 and 0 in the published TAESD configs)."""

    name = "tae"

    def __init__(self, tae: Any):
        self.tae = tae

    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        config = self.tae.config
        latents = latents.to(self.tae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        pixels = self.tae.decode(latents, return_dict=False)[0]
        if pixels.shape[-2:] != (height, width):
            pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)
        return pixels.clamp(-1, 1)


def tiny_tae(latent_channels: int) -> Any:
    """A random `AutoencoderTiny` for a tiny model, the same every time (its own RNG state:
    nothing else's random numbers move)."""
    from diffusers import AutoencoderTiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_TAE_SEED)
        channels = (TINY_TAE_CHANNELS,) * 4
        return AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=channels,
                               decoder_block_out_channels=channels).eval()


def load_tae(source: TinyAutoencoderSource, latent_channels: int, dtype: torch.dtype, device: str) -> Any:
    from diffusers import AutoencoderTiny

    if source.source == "tiny":
        tae = tiny_tae(latent_channels)
    else:
        hub = not os.path.isabs(source.source) and not source.source.startswith(".")
        tae = AutoencoderTiny.from_pretrained(
            source.source, revision=source.revision if hub else None, torch_dtype=dtype,
            token=os.environ.get("HF_TOKEN") or None, cache_dir=os.environ.get("ARTSERVE_HF_CACHE") or None,
        )
    if tae.config.latent_channels != latent_channels:
        raise ValueError(f"it decodes {tae.config.latent_channels} latent channels; the model has {latent_channels}")
    # torch's own `to`: diffusers' override warns about keeping modules in float32, of which a TAE has none.
    return torch.nn.Module.to(tae, device=device, dtype=dtype).eval()


def vae_pixels(vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Diffusion-space latents -> the VAE's pixels in [-1, 1], as the runners' decoders undo
    the scaling (SDXL-style latents mean/std, else / scaling factor + shift factor)."""
    config = vae.config

    def decode(latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(vae.device, vae.dtype)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            latents = (latents * torch.tensor(std).view(shape).to(latents) / config.scaling_factor
                       + torch.tensor(mean).view(shape).to(latents))
        else:
            latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        return vae.decode(latents, return_dict=False)[0]

    return decode


def build_decoder(settings: PreviewSettings, family: str, vae: Any, device: str, model_id: str):
    """The model's preview decoder, or None for `full` (the runner's own VAE decode)."""
    if settings.decoder == "full":
        return None
    try:
        channels = vae.config.latent_channels
        if settings.decoder == "tae":
            assert settings.tae is not None  # the config requires it
            decoder: Any = TinyAutoencoder(load_tae(settings.tae, channels, vae.dtype, device))
        elif settings.latent_rgb == "fit":
            decoder, r2 = LatentRGB.fit(vae_pixels(vae), channels)
            logger.info("model %s: latent->RGB preview map fitted to its VAE (R² %.2f)", model_id, r2)
        else:
            if family not in LATENT_RGB:
                raise ValueError(f"no published latent->RGB factors for the {family} family")
            factors, bias = LATENT_RGB[family]
            decoder = LatentRGB(torch.tensor(factors), torch.tensor(bias))
            if decoder.channels != channels:
                raise ValueError(f"the {family} factors map {decoder.channels} latent channels; "
                                 f"the model has {channels}")
    except Exception as exc:  # previews fall back to the full decode; the model serves on
        logger.warning("model %s: %s previews unavailable (%s: %s); previews use the full VAE decode",
                       model_id, settings.decoder, type(exc).__name__, exc)
        return None
    logger.info("model %s: previews decoded with %s", model_id, decoder.name)
    return decoder


def count_flops(run: Callable[[], Any]) -> int:
    """Floating-point operations torch counts for `run()` (convolutions, matmuls): what a
    decoder costs on any hardware, where a time on this shared CPU would not say."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()
