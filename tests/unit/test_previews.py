"""Preview decoders (serve_app/engine/previews.py), per tiny family in process: previews have the
requested size and finite pixels, cost fewer FLOPs than a full decode, and leave the final
image byte-identical; the published decoders are cheaper at the production architectures (on the
meta device); a decoder that cannot be built falls back to the full decode."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from serve_app.config import PreviewSettings, TinyAutoencoderSource
from serve_app.engine import previews
from tests.unit.test_runners import load as load_fresh

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"]
WIDTH, HEIGHT = 128, 192  # not square: a transposed preview would show


@functools.cache
def load(model_id: str):
    return load_fresh(model_id)


def spec(steps: int = 2, **changes):
    from serve_app.engine.runners.base import ImageSpec

    return dataclasses.replace(ImageSpec("a red fox", None, WIDTH, HEIGHT, steps, 4.0, 21), **changes)


def decoder(model_id: str, name: str):
    engine = load(model_id)[0]
    settings = PreviewSettings(decoder=name, tae=TinyAutoencoderSource(source="tiny"), latent_rgb="fit")
    return previews.build_decoder(settings, engine.model.family, engine.pipeline.vae, "cpu", model_id)


@pytest.fixture
def serve_log(caplog):
    """The replica's log lines ("ray.serve": importing Ray Serve stops them propagating to pytest's handler)."""
    import ray.serve  # noqa: F401 - configures the logger first

    logger = logging.getLogger("ray.serve")
    propagate, logger.propagate = logger.propagate, True
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        yield caplog
    logger.propagate = propagate


@contextlib.contextmanager
def decoding_with(runner, preview_decoder):
    """The runner's previews decoded with `preview_decoder` for the block (the runners are shared)."""
    runner.preview_decoder = preview_decoder
    try:
        yield runner
    finally:
        runner.preview_decoder = None


def run_with_previews(runner, image_spec, preview_decoder, previews_wanted: bool = True):
    """The image's bytes, a preview after every step decoded with `preview_decoder` (if wanted),
    and the FLOPs torch counts for the last preview."""
    shown, flops = [], None
    with decoding_with(runner, preview_decoder), torch.inference_mode():
        [state] = runner.prepare([image_spec])
        while not state.done:
            runner.step([state])
            if previews_wanted:
                shown.append(runner.preview(state))
        if previews_wanted:
            flops = previews.count_flops(lambda: runner.preview(state))
        [final] = runner.finish([state])
    return final.tobytes(), shown, flops


@pytest.mark.parametrize("model_id", FAMILIES)
def test_cheap_previews_have_the_size_cost_less_and_leave_the_final_image_alone(model_id):
    engine, runner = load(model_id)
    alone, _, _ = run_with_previews(runner, spec(), None, previews_wanted=False)
    counted = {}
    for name in ("full", "tae", "latent_rgb"):
        cheap = decoder(model_id, name)
        assert (cheap is None) == (name == "full")
        final, shown, counted[name] = run_with_previews(runner, spec(), cheap)
        assert final == alone, f"{name} previews changed the final image"
        assert [image.size for image in shown] == [(WIDTH, HEIGHT)] * spec().steps
        if cheap is not None:
            with torch.inference_mode():
                [state] = runner.prepare([spec()])
                pixels = cheap.decode(runner.unpacked(state.latents, state.spec), HEIGHT, WIDTH)
            assert pixels.shape == (1, 3, HEIGHT, WIDTH) and pixels.isfinite().all() and pixels.abs().max() <= 1
    print(f"{model_id} preview FLOPs: " + ", ".join(f"{k} {v / 1e6:.3f} M" for k, v in counted.items()))
    assert counted["tae"] < 0.3 * counted["full"] and counted["latent_rgb"] < 1e-3 * counted["full"]
    tae = decoder(model_id, "tae").tae
    vae = engine.pipeline.vae
    assert sum(p.numel() for p in tae.decoder.parameters()) < sum(p.numel() for p in vae.decoder.parameters())


def test_an_inpaint_preview_shows_the_input_where_the_mask_keeps():
    from PIL import Image, ImageDraw

    runner = load("tiny-sd")[1]
    image = Image.new("RGB", (WIDTH, HEIGHT), (200, 30, 60))
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, WIDTH // 2 - 1, HEIGHT), fill=255)
    inpaint = spec(image=image, mask=mask, strength=1.0)
    _, shown, _ = run_with_previews(runner, inpaint, decoder("tiny-sd", "latent_rgb"))
    kept = np.asarray(shown[0])[:, WIDTH // 2:]
    assert (kept == (200, 30, 60)).all()


def test_a_decoder_that_fails_on_the_latents_falls_back_to_the_full_decode(serve_log):
    """E.g. a new family whose latents need unpacking it does not declare: the request goes on."""
    runner = load("tiny-sd")[1]
    sixteen_channels = previews.LatentRGB(torch.zeros(16, 3), torch.zeros(3))  # tiny-sd's latents have 4
    with decoding_with(runner, sixteen_channels), torch.inference_mode():
        [state] = runner.prepare([spec()])
        runner.step([state])
        image = runner.preview(state)
        assert runner.preview_decoder is None  # the full decode from now on
    assert image.size == (WIDTH, HEIGHT) and "latent_rgb preview decoder failed" in serve_log.text


def test_the_fit_recovers_a_linear_decoder():
    """Least squares against a "VAE" that is exactly linear per latent pixel finds its map."""
    true_map = torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.4], [0.2, 0.2, 0.2], [-0.1, 0.0, 0.6]])
    bias = torch.tensor([0.05, -0.1, 0.2])

    def vae(latents):
        rgb = torch.einsum("bchw,cr->brhw", latents, true_map) + bias[:, None, None]
        return torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")

    fitted, r2 = previews.LatentRGB.fit(vae, channels=4)
    assert torch.allclose(fitted.factors, true_map, atol=1e-4) and torch.allclose(fitted.bias, bias, atol=1e-4)
    assert r2 > 0.9999


def test_tiny_tae_is_the_same_every_time_and_moves_no_one_elses_random_numbers():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = previews.tiny_tae(4)
    assert torch.equal(torch.rand(3), expected)
    second = previews.tiny_tae(4)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_local_tae_directory_loads_and_a_wrong_one_falls_back_to_the_full_decode(tmp_path, serve_log):
    vae = load("tiny-flux")[0].pipeline.vae
    previews.tiny_tae(4).save_pretrained(tmp_path / "tae4")
    previews.tiny_tae(16).save_pretrained(tmp_path / "tae16")
    local = PreviewSettings(decoder="tae", tae=TinyAutoencoderSource(source=str(tmp_path / "tae4")))
    assert isinstance(previews.build_decoder(local, "flux", vae, "cpu", "m"), previews.TinyAutoencoder)
    wrong = local.model_copy(update={"tae": TinyAutoencoderSource(source=str(tmp_path / "tae16"))})
    assert previews.build_decoder(wrong, "flux", vae, "cpu", "m") is None
    offline = local.model_copy(update={"tae": TinyAutoencoderSource(source="madebyollin/taef1", revision="0" * 40)})
    assert previews.build_decoder(offline, "flux", vae, "cpu", "m") is None  # HF_HUB_OFFLINE, not cached
    # FLUX's published factors map 16 channels; the tiny FLUX VAE has 4. A family without factors (a new
    # runner family) or a pipeline without a VAE falls back the same way.
    assert previews.build_decoder(PreviewSettings(decoder="latent_rgb"), "flux", vae, "cpu", "m") is None
    assert previews.build_decoder(PreviewSettings(decoder="latent_rgb"), "qwen-image", vae, "cpu", "m") is None
    assert previews.build_decoder(PreviewSettings(decoder="latent_rgb"), "qwen-image", None, "cpu", "m") is None
    assert "16 latent channels; the model has 4" in serve_log.text
    assert serve_log.text.count("previews use the full VAE decode") == 5


@pytest.mark.parametrize("model_id", ["flux-dev", "sdxl", "sd3.5-large", "sd-turbo"])
def test_published_decoders_are_cheaper_at_the_production_architecture(model_id):
    """On the meta device (no weights, no time): the published latent->RGB factors fit the VAE's
    channels, and AutoencoderTiny's published layout costs ~5 % of the VAE decode's FLOPs."""
    from diffusers import AutoencoderTiny

    from serve_app.engine import full_size

    vae = full_size.build_component(model_id, "vae", "meta", torch.float32)
    channels = vae.config.latent_channels
    family = yaml.safe_load((ROOT / "models" / f"{model_id}.yaml").read_text())["family"]
    rgb = previews.build_decoder(PreviewSettings(decoder="latent_rgb"), family, vae, "meta", model_id)
    assert isinstance(rgb, previews.LatentRGB) and rgb.channels == channels
    with torch.device("meta"):
        tae = previews.TinyAutoencoder(AutoencoderTiny(latent_channels=channels))
    latents = torch.zeros(1, channels, 64, 64, device="meta")
    with torch.inference_mode():
        full = previews.count_flops(lambda: previews.vae_pixels(vae)(latents))
        small = previews.count_flops(lambda: tae.decode(latents, 512, 512))
        linear = previews.count_flops(lambda: rgb.decode(latents, 512, 512))
    print(f"{model_id} at 512²: VAE {full / 1e12:.2f} TFLOPs, TAE {small / full:.3f}x, latent_rgb {linear / full:.1e}x")
    assert small < 0.1 * full and linear < 1e-4 * full


def test_every_model_names_its_preview_decoder_and_pins_hub_weights():
    for path in sorted(ROOT.glob("models/*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data["family"] == "generic":
            continue  # whole pipeline calls: no previews
        block = data["previews"]
        if data["family"] not in previews.LATENT_RGB:  # no cheap decoder for the family yet: it must say so
            assert block == {"decoder": "full"}, path.name
            continue
        tiny = data["source"].startswith("tiny:")
        assert block["decoder"] == ("latent_rgb" if tiny else "tae"), path.name
        source = block["tae"]["source"]
        if tiny:
            assert source == "tiny" and block["latent_rgb"] == "fit", path.name
        else:
            assert source.startswith("madebyollin/tae"), path.name
            assert re.fullmatch(r"[0-9a-f]{40}", str(block["tae"].get("revision"))), path.name
