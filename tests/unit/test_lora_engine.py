"""LoRA adapters in the step engine against diffusers' own LoRA path, per family: an image alone
with an adapter equals `pipe.load_lora_weights(...)` + `set_adapters(...)` + `pipe(...)` for the
same seed; two stacked adapters equal diffusers' stacked result; scale 0 is the base image; images
with different adapters (or none) share one denoiser call and each stays within one level of its
solo image; kohya/A1111 files load through diffusers' converters (SDXL, FLUX)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from serve_app.engine.loras.loading import AdapterReader, sha256_of
from serve_app.engine.loras.rows import LoraRows
from serve_app.engine.runners import STEP_RUNNERS
from serve_app.engine.runners.base import ImageSpec, run_together
from tests.loras import fresh_pipeline, save_adapters, tiny_model, to_kohya

SIZE, STEPS = 64, 3
GUIDANCE = {"tiny-sd": 7.5, "tiny-sdxl": 5.0, "tiny-sd3": 4.5, "tiny-flux": 3.5}
VISIBLE = 4  # levels an adapter must move the image by at least: the test fails if adapters were ignored


def levels(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


class Engine:
    """A tiny model's step runner with adapters read from files, as a replica would (minus the LRU)."""

    def __init__(self, model_id: str, files: dict[str, Path]):
        self.model_id = model_id
        self.pipe = fresh_pipeline(model_id)
        self.runner = STEP_RUNNERS[tiny_model(model_id).family](self.pipe, tiny_model(model_id), "cpu")
        self.reader = AdapterReader(self.pipe)
        self.adapters = {name: self.reader.read(path, name, sha256_of(path)) for name, path in files.items()}
        self.runner.loras = LoraRows(lambda key: next(a for a in self.adapters.values() if a.key == key))
        # The runner scales initial noise by the pipeline's own scheduler (init_noise_sigma), which a
        # pipeline call sets to the request's steps first (Euler: SDXL); set it the same way here.
        self.pipe.scheduler.set_timesteps(STEPS)

    def spec(self, *loras: tuple[str, float], seed: int = 1234, prompt: str = "a red fox") -> ImageSpec:
        return ImageSpec(prompt, None, SIZE, SIZE, STEPS, GUIDANCE[self.model_id], seed,
                         loras=tuple((self.adapters[name].key, scale) for name, scale in loras))

    def add(self, name: str, path: Path) -> None:
        self.adapters[name] = self.reader.read(path, name, sha256_of(path))

    def alone(self, spec: ImageSpec):
        return run_together(self.runner, [spec])[0]


class Reference:
    """Diffusers' images: its own load_lora_weights and set_adapters, then pipe(...)."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.pipe = fresh_pipeline(model_id)
        self.kwargs = {}
        if tiny_model(model_id).family in ("flux", "stable-diffusion-3"):
            self.kwargs["max_sequence_length"] = STEP_RUNNERS[tiny_model(model_id).family](
                self.pipe, tiny_model(model_id), "cpu").max_sequence_length

    def load(self, files: dict[str, Path]) -> Reference:
        for name, path in files.items():
            self.pipe.load_lora_weights(str(path), adapter_name=name)
        return self

    def image(self, *run: tuple[str, float], seed: int = 1234):
        self.pipe.set_adapters([n for n, _ in run], [s for _, s in run])
        return self.pipe(prompt="a red fox", width=SIZE, height=SIZE, num_inference_steps=STEPS,
                         guidance_scale=GUIDANCE[self.model_id], generator=torch.Generator().manual_seed(seed),
                         **self.kwargs).images[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, dict[str, Path]]:
    folder = tmp_path_factory.mktemp("loras")
    return {m: save_adapters(m, folder / m, {"a": 1, "b": 2}, strength=3.0) for m in GUIDANCE}


@pytest.fixture(scope="module")
def engines(files) -> dict[str, Engine]:
    """One engine per family, shared by the tests of this module (built on first use)."""
    class Lazy(dict):
        def __missing__(self, model_id: str) -> Engine:
            self[model_id] = Engine(model_id, files[model_id])
            return self[model_id]

    return Lazy()


@pytest.mark.parametrize("model_id", list(GUIDANCE))
def test_an_adapter_alone_and_stacked_match_diffusers(model_id, files, engines):
    engine = engines[model_id]
    base = engine.alone(engine.spec())
    with_a = engine.alone(engine.spec(("a", 0.8)))
    stacked = engine.alone(engine.spec(("a", 0.8), ("b", -0.6)))
    at_zero = engine.alone(engine.spec(("a", 0.0)))
    ref = Reference(model_id).load(files[model_id])
    ref_base, ref_a, ref_stacked = ref.image(("a", 0.0)), ref.image(("a", 0.8)), ref.image(("a", 0.8), ("b", -0.6))
    print(f"{model_id}: adapter a moves the image {levels(base, with_a)} levels; vs diffusers: base "
          f"{levels(base, ref_base)}, a {levels(with_a, ref_a)}, a+b {levels(stacked, ref_stacked)} levels")
    assert levels(base, with_a) >= VISIBLE and levels(with_a, stacked) >= VISIBLE  # adapters are not ignored
    assert levels(with_a, ref_a) <= 1
    assert levels(stacked, ref_stacked) <= 1
    assert levels(at_zero, base) == 0 and levels(base, ref_base) <= 1
    # Both parts count: the text-encoder part alone changes the prompt's encoding, hence the image.
    assert engine.adapters["a"].components[0] in ("unet", "transformer") and len(engine.adapters["a"].components) > 1


@pytest.mark.parametrize("model_id", ["tiny-sd", "tiny-flux"])  # CFG rows [uncond x B, cond x B], and none
def test_different_adapters_share_one_denoiser_call(model_id, engines):
    engine = engines[model_id]
    specs = [engine.spec(("a", 0.8), seed=1), engine.spec(("b", 1.2), seed=2), engine.spec(seed=3),
             engine.spec(("a", 0.5), ("b", -0.7), seed=4)]
    solo = [engine.alone(s) for s in specs]
    denoiser = engine.pipe.unet if model_id == "tiny-sd" else engine.pipe.transformer
    rows: list[int] = []
    handle = denoiser.register_forward_pre_hook(lambda _, args, kwargs: rows.append(
        (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    try:
        shared = run_together(engine.runner, specs, join_at=[0, 1, 2, 1])
    finally:
        handle.remove()
    differences = [levels(a, b) for a, b in zip(solo, shared, strict=True)]
    cfg = 2 if model_id == "tiny-sd" else 1
    print(f"{model_id}: shared vs solo {differences} levels; rows per denoiser call {rows}")
    assert max(differences) <= 1
    assert max(rows) == 4 * cfg  # all four (a, b, none, a+b) in one call


def test_kohya_sdxl_file_loads_through_diffusers_converter(files, engines, tmp_path):
    kohya = to_kohya(files["tiny-sdxl"]["a"], tmp_path / "a-kohya.safetensors")
    engine = engines["tiny-sdxl"]
    engine.add("kohya", kohya)
    native, converted = engine.alone(engine.spec(("a", 0.9))), engine.alone(engine.spec(("kohya", 0.9)))
    ref = Reference("tiny-sdxl").load({"kohya": kohya}).image(("kohya", 0.9))
    print(f"sdxl kohya: vs diffusers-format file {levels(native, converted)}, vs diffusers {levels(converted, ref)}")
    assert len(engine.adapters["kohya"].layers) == len(engine.adapters["a"].layers)
    assert levels(native, converted) <= 1 and levels(converted, ref) <= 1


def kohya_flux_file(path: Path, seed: int = 3) -> Path:
    """A kohya/sd-scripts FLUX LoRA in BFL block names (fused qkv, single blocks' linear1/linear2)."""
    from safetensors.torch import save_file

    inner, mlp, rank = 64, 256, 4  # tiny-flux: 2 heads x 32, MLP ratio 4
    shapes = {"double_blocks_0_img_attn_qkv": (inner, 3 * inner), "double_blocks_0_img_attn_proj": (inner, inner),
              "double_blocks_1_txt_mlp_0": (inner, mlp), "single_blocks_0_linear2": (inner + mlp, inner)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in shapes.items():
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.3
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.3
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def test_kohya_flux_file_loads_through_diffusers_converter(engines, tmp_path):
    kohya = kohya_flux_file(tmp_path / "flux-kohya.safetensors")
    engine = engines["tiny-flux"]
    engine.add("k", kohya)
    base, with_k = engine.alone(engine.spec()), engine.alone(engine.spec(("k", 1.0)))
    ref = Reference("tiny-flux").load({"k": kohya}).image(("k", 1.0))
    print(f"flux kohya: moves the image {levels(base, with_k)} levels, vs diffusers {levels(with_k, ref)}")
    assert levels(base, with_k) >= VISIBLE
    assert levels(with_k, ref) <= 1
