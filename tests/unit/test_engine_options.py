"""Loading options: what is applied on which hardware (pure), and applying the ones a CPU
can do to a real tiny pipeline without changing what it draws."""

from pathlib import Path

import numpy as np
import pytest

from serve_app.config import EngineOptions, load_model_config
from serve_app.engine.optimize import Hardware, Step, plan

MODELS = Path(__file__).resolve().parents[2] / "models"
EVERYTHING = EngineOptions(
    compile=True, channels_last=True, fuse_qkv=True, attention_backend="flash", vae_tiling=True, vae_slicing=True,
    cpu_offload="model", quantization="fp8",
)
CPU = Hardware(cuda=False)
L4 = Hardware(cuda=True, capability=(8, 9), torchao=True)
A100 = Hardware(cuda=True, capability=(8, 0), torchao=True)


def skipped(steps: list[Step]) -> dict[str, str]:
    return {s.option: s.skipped for s in steps if s.skipped}


def test_nothing_set_means_nothing_to_do():
    assert plan(EngineOptions(), L4) == []


def test_a_gpu_with_fp8_applies_everything_in_order():
    steps = plan(EVERYTHING, L4)
    assert [s.option for s in steps] == [
        "cpu_offload", "quantization=fp8", "fuse_qkv", "channels_last", "attention_backend=flash",
        "vae_tiling", "vae_slicing", "compile(max-autotune-no-cudagraphs)",
    ]
    assert skipped(steps) == {}


def test_fp8_needs_ada_or_hopper_and_int8_does_not():
    assert "compute capability" in skipped(plan(EVERYTHING, A100))["quantization=fp8"]
    assert skipped(plan(EngineOptions(quantization="int8"), A100)) == {}


def test_without_torchao_quantization_is_skipped_with_the_fix():
    reason = skipped(plan(EngineOptions(quantization="int8"), Hardware(cuda=True, capability=(9, 0))))
    assert "pip install 'artserve[gpu]'" in reason["quantization=int8"]


def test_on_cpu_the_gpu_only_options_are_skipped_with_reasons():
    reasons = skipped(plan(EVERYTHING, CPU))
    assert set(reasons) == {"cpu_offload", "quantization=fp8", "attention_backend=flash",
                            "compile(max-autotune-no-cudagraphs)"}
    assert all(reasons.values())
    assert skipped(plan(EngineOptions(attention_backend="native"), CPU)) == {}


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux"])
def test_cpu_options_are_applied_and_keep_the_image(model_id, caplog):
    from serve_app.engine.pipeline import DiffusersEngine, PipelineInputs

    base = load_model_config(MODELS / f"{model_id}.yaml")
    tuned = base.model_copy(update={"engine": EngineOptions(
        num_threads=2, fuse_qkv=True, channels_last=True, attention_backend="native", vae_tiling=True,
        vae_slicing=True, compile=True)})
    inputs = PipelineInputs(256, 256, 3, 5.0, ["a red fox"] * 2, [None, None], [1, 2])
    plain = [np.asarray(i, dtype=int) for i in DiffusersEngine(base).generate(inputs)]
    engine = DiffusersEngine(tuned)
    assert engine.applied == ["fuse_qkv", "channels_last", "attention_backend=native", "vae_tiling", "vae_slicing"]
    assert "compile(max-autotune-no-cudagraphs) skipped: CUDA only" in caplog.text
    for a, b in zip(plain, engine.generate(inputs), strict=True):
        assert np.abs(a - np.asarray(b, dtype=int)).max() <= 2  # fused matmuls round differently


def test_text_encoders_are_quantized_only_with_quantization_and_where_it_can_run():
    both = EngineOptions(quantization="fp8", quantize_text_encoders=True)
    assert [s.option for s in plan(both, L4)] == ["quantization=fp8", "quantize_text_encoders"]
    assert skipped(plan(both, L4)) == {}
    assert "compute capability" in skipped(plan(both, A100))["quantize_text_encoders"]
    assert "needs `quantization`" in skipped(plan(EngineOptions(quantize_text_encoders=True), L4))[
        "quantize_text_encoders"]


def test_quantized_modules_reach_the_gpu_one_at_a_time(monkeypatch):
    """FLUX.2 [dev] in bf16 (112.6 GB) does not fit an 80 GB GPU: each quantized module is moved
    and quantized before the next one moves, and only then the rest of the pipeline."""
    import torch

    from serve_app.engine import optimize

    events = []

    class Module(torch.nn.Linear):
        def __init__(self, name):
            super().__init__(2, 2)
            self.label = name

        def to(self, *args, **kwargs):
            events.append(("to", self.label))
            return self

    class Pipeline:
        transformer, text_encoder, vae = Module("transformer"), Module("text_encoder"), Module("vae")

        def to(self, device):
            events.append(("to", "pipeline"))

    monkeypatch.setattr(optimize, "quantizer", lambda kind: lambda module: events.append(("quantize", module.label)))
    options = EngineOptions(quantization="fp8", quantize_text_encoders=True)
    optimize.apply(Pipeline(), options, plan(options, L4), "cuda", "m")
    assert events == [("to", "transformer"), ("quantize", "transformer"), ("to", "text_encoder"),
                      ("quantize", "text_encoder"), ("to", "pipeline")]
    events.clear()
    optimize.apply(Pipeline(), EngineOptions(quantization="int8"), plan(EngineOptions(quantization="int8"), L4),
                   "cuda", "m")
    assert events == [("to", "transformer"), ("quantize", "transformer"), ("to", "pipeline")]
