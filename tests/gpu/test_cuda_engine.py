"""GPU path of the engine: half precision on CUDA. Skipped where there is no CUDA device."""

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-pixart"])
def test_float16_on_cuda_reproduces_per_seed(model_id):
    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine, PipelineInputs

    config = load_model_config(MODELS / f"{model_id}.yaml").model_copy(update={"dtype": "float16"})
    engine = DiffusersEngine(config)
    assert engine.device == "cuda" and engine.pipeline.dtype == torch.float16
    inputs = PipelineInputs(512, 512, 4, 3.5, ["a fox", "a fox"], [None, None], [1, 2])
    first, second = engine.generate(inputs), engine.generate(inputs)
    assert [im.size for im in first] == [(512, 512)] * 2
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))


def test_gpu_loading_options_apply_and_generate():
    """The options a CPU skips: CPU offload, the attention backend and (with torchao) int8."""
    from serve_app.config import EngineOptions, load_model_config
    from serve_app.engine.pipeline import DiffusersEngine, PipelineInputs

    options = EngineOptions(cpu_offload="model", attention_backend="native", fuse_qkv=True, vae_tiling=True,
                            quantization="int8")
    config = load_model_config(MODELS / "tiny-sdxl.yaml").model_copy(update={"dtype": "float16", "engine": options})
    engine = DiffusersEngine(config)
    assert {"cpu_offload", "attention_backend=native", "fuse_qkv", "vae_tiling"} <= set(engine.applied)
    [image] = engine.generate(PipelineInputs(512, 512, 4, 5.0, ["a fox"], [None], [1]))
    assert image.size == (512, 512)


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_step_engine_matches_the_pipeline_in_float16_on_cuda(model_id):
    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine, PipelineInputs
    from serve_app.engine.runners import ImageSpec, make_runner
    from serve_app.engine.runners.base import run_together

    engine = DiffusersEngine(load_model_config(MODELS / f"{model_id}.yaml").model_copy(update={"dtype": "float16"}))
    [reference] = engine.generate(PipelineInputs(512, 512, 4, 4.5, ["a fox"], [None], [3]))
    spec = ImageSpec("a fox", None, 512, 512, 4, 4.5, 3)
    runner = make_runner(engine)
    [alone] = run_together(runner, [spec])
    [shared, _] = run_together(runner, [spec, ImageSpec("a bird", None, 512, 512, 6, 2.0, 9)])
    difference = [int(np.abs(np.asarray(a, np.int16) - np.asarray(reference, np.int16)).max()) for a in (alone, shared)]
    print(f"{model_id} fp16 on CUDA: alone vs pipeline {difference[0]}, shared vs pipeline {difference[1]}")
    assert difference[0] <= 1
    assert difference[1] <= 2  # half precision, batched kernels: allow one more level than on CPU
