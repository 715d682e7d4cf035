"""The production catalog on a real GPU: each model YAML loads its real weights (Hub access;
HF_TOKEN for the gated FLUX.1-dev and SD3.5) with its engine options and makes one image at
its default size with its standard preset. Skipped without CUDA; each needs its GPU class
(H100 for FLUX and SD3.5 Large; an L4 or better for SDXL)."""

import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODELS = Path(__file__).resolve().parents[2] / "models"
CATALOG = ["flux-dev", "flux-schnell", "sdxl", "sdxl-turbo", "sd3.5-large"]


@pytest.mark.parametrize("model_id", CATALOG)
def test_real_model_makes_an_image(model_id):
    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine, PipelineInputs

    config = load_model_config(MODELS / f"{model_id}.yaml")
    engine = DiffusersEngine(config)
    preset = config.quality_preset("standard")
    width, height = map(int, config.default_size.split("x"))
    inputs = PipelineInputs(width, height, preset.num_inference_steps, preset.guidance_scale,
                            ["a lighthouse on a cliff at dusk"], [config.default_negative_prompt or None], [7])
    engine.generate(inputs)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    [image] = engine.generate(inputs)
    torch.cuda.synchronize()
    print(f"{model_id}: {time.perf_counter() - started:.2f} s/image on {torch.cuda.get_device_name()}, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    pixels = np.asarray(image)
    assert image.size == (width, height)
    assert pixels.std() > 10  # a picture, not a flat (NaN-decoded) frame
