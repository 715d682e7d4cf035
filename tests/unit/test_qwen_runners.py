"""The Qwen-Image family's runners against diffusers' own pipelines (CPU, fp32, tiny models): a
request alone gives `QwenImagePipeline` / `QwenImageEditPlusPipeline`'s image for the same inputs
and seed, with and without true CFG, with one and two input images; sharing the batch with other
requests (other prompts, steps, guidance and input images, joining later) stays within one level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.config import load_model_config

MODELS = Path(__file__).resolve().parents[2] / "models"
SIZE = 128  # 64 image tokens: the tiny VAE's 3D convolutions are what costs here
RED, BLUE, GREEN = ((250, 10, 10), (10, 10, 250), (10, 250, 10))


def level_difference(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def load(model_id: str):
    from serve_app.engine.pipeline import DiffusersEngine
    from serve_app.engine.runners import make_runner

    engine = DiffusersEngine(load_model_config(MODELS / f"{model_id}.yaml"))
    return engine.pipeline, make_runner(engine)


@pytest.fixture(scope="module")
def generation():
    return load("tiny-qwen-image")


@pytest.fixture(scope="module")
def edit():
    return load("tiny-qwen-image-edit")


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def spec(prompt: str, negative: str | None, steps: int, guidance: float, seed: int, images: tuple = ()):
    from serve_app.engine.runners.base import ImageSpec

    return ImageSpec(prompt, negative, SIZE, SIZE, steps, guidance, seed, images=images)


def pipeline_image(pipe, request, **extra) -> Image.Image:
    with torch.inference_mode():
        return pipe(prompt=request.prompt, negative_prompt=request.negative_prompt, true_cfg_scale=request.guidance,
                    height=request.height, width=request.width, num_inference_steps=request.steps,
                    generator=torch.Generator().manual_seed(request.seed), **extra).images[0]


@pytest.mark.parametrize("negative", [None, "blurry, low quality, watermark"])
def test_generation_alone_equals_the_pipeline_and_shared_stays_within_one_level(generation, negative):
    from serve_app.engine.runners.base import run_together

    pipe, runner = generation
    request = spec("a red fox in the snow", negative, 3, 4.0, 1234)
    [alone] = run_together(runner, [request])
    others = [spec("a blue bird over a long and winding river at dawn", negative, 5, 6.5, 7),
              spec("a castle", negative, 2, 3.0, 99)]
    shared = run_together(runner, [others[0], request, others[1]], join_at=[0, 2, 1])[1]
    solo, batched = level_difference(pipeline_image(pipe, request), alone), level_difference(alone, shared)
    print(f"qwen-image negative {negative!r}: alone vs pipeline {solo} levels, shared vs alone {batched}")
    assert solo <= 1 and batched <= 1


@pytest.mark.parametrize("count,negative", [(1, None), (2, " ")])
def test_edit_plus_alone_equals_the_pipeline_and_shared_stays_within_one_level(edit, monkeypatch, count, negative):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    from serve_app.engine.qwen_vl import ImageOnlyQwen2VLProcessor
    from serve_app.engine.runners.base import run_together

    pipe, runner = edit
    assert isinstance(pipe.processor, ImageOnlyQwen2VLProcessor)  # loaded without torchvision
    # One reference area (edits.reference_pixels in a YAML) for both: 128x128's, 64 tokens an image.
    monkeypatch.setattr(runner, "reference_pixels", SIZE * SIZE)
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", SIZE * SIZE)
    images = (noise_image(300, 200, 0), noise_image(256, 256, 1))[:count]
    request = spec("make the fox blue", negative, 3, 4.0, 1234, images)
    [alone] = run_together(runner, [request])
    # Others of the same batch key: inputs of the same sizes but other content, other settings.
    others = [spec("turn it into a watercolor painting of a harbor", negative, 4, 6.0, 7,
                   tuple(noise_image(*image.size, 10 + i) for i, image in enumerate(images))),
              spec("a castle", negative, 2, 2.5, 99, images)]
    assert {runner.batch_key(s) for s in [request, *others]} == {runner.batch_key(request)}
    shared = run_together(runner, [others[0], request, others[1]], join_at=[0, 2, 1])[1]
    reference = pipeline_image(pipe, request, image=list(images))
    solo, batched = level_difference(reference, alone), level_difference(alone, shared)
    print(f"qwen-image-edit {count} image(s), negative {negative!r}: alone vs pipeline {solo} levels, "
          f"shared vs alone {batched}")
    assert solo <= 1 and batched <= 1


def test_each_input_image_and_the_prompt_change_the_edit(edit):
    from serve_app.engine.runners.base import run_together

    _, runner = edit
    red, blue, green = (Image.new("RGB", (SIZE, SIZE), color) for color in (RED, BLUE, GREEN))
    base, second, first, prompt = run_together(runner, [  # one batch: the same key
        spec("make it blue", None, 2, 1.0, 5, (red, blue)), spec("make it blue", None, 2, 1.0, 5, (red, green)),
        spec("make it blue", None, 2, 1.0, 5, (green, blue)), spec("a cat on a sofa", None, 2, 1.0, 5, (red, blue)),
    ])
    [alone] = run_together(runner, [spec("make it blue", None, 2, 1.0, 5, (red,))])
    assert level_difference(base, second) > 5 and level_difference(base, first) > 5
    assert level_difference(base, prompt) > 3 and level_difference(base, alone) > 5


def test_one_transformer_call_per_step_for_every_row_of_the_batch(generation, monkeypatch):
    pipe, runner = generation
    calls = []
    forward = pipe.transformer.forward

    def counting(**kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs["encoder_hidden_states_mask"]))
        return forward(**kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", counting)
    states = runner.prepare([spec("a", " ", 2, 4.0, 1), spec("a much longer prompt about a lighthouse", " ", 2, 2.0, 2),
                             spec("a fox", "blurry", 2, 5.0, 3)])
    with torch.inference_mode():
        runner.step(states)
    [(rows, mask)] = calls  # three images with true CFG: one call of 3 positive + 3 negative rows
    assert rows == 6 and mask is not None and mask.shape[0] == 6
    assert [int(m.sum()) for m in mask] == [s.cond[k].shape[1] for k in ("prompt", "negative") for s in states]
    assert all(s.index == 1 for s in states)


def test_batch_keys_are_size_cfg_and_the_references_latent_sizes(generation, edit):
    _, gen_runner = generation
    _, edit_runner = edit
    assert gen_runner.batch_key(spec("a", " ", 4, 4.0, 1)) == (SIZE, SIZE, True)
    assert gen_runner.batch_key(spec("a", None, 4, 4.0, 1)) == gen_runner.batch_key(spec("b", " ", 9, 1.0, 2))
    wide, square = noise_image(400, 200, 0), noise_image(300, 300, 1)
    key = edit_runner.batch_key(spec("a", " ", 4, 4.0, 1, (wide, square)))
    assert key == (SIZE, SIZE, True, ((352, 192), (256, 256)))  # 256x256's area at each aspect, multiples of 32
    assert key == edit_runner.batch_key(spec("b", " ", 8, 6.0, 2, (noise_image(800, 400, 2), noise_image(64, 64, 3))))
    assert key != edit_runner.batch_key(spec("a", " ", 4, 4.0, 1, (square, wide)))  # order is the RoPE layout


def test_edit_plus_default_reference_area_is_the_pipelines(edit):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus

    from serve_app.engine.runners.qwen import QwenImageEditRunner

    pipe, runner = edit
    model = runner.model.model_copy(update={"edits": runner.model.edits.model_copy(update={"reference_pixels": None})})
    default = QwenImageEditRunner(pipe, model, "cpu")
    assert default.reference_pixels == edit_plus.VAE_IMAGE_SIZE == 1024 * 1024
    assert default.reference_size(noise_image(1600, 900, 0)) == edit_plus.calculate_dimensions(1024 * 1024, 16 / 9)
    assert default.condition_pixels == edit_plus.CONDITION_IMAGE_SIZE == 384 * 384


@pytest.mark.parametrize("pipeline_class", ["QwenImagePipeline", "QwenImageEditPlusPipeline"])
def test_tiny_tokenizer_splits_each_template_prefix_like_qwens(generation, edit, pipeline_class):
    """The pipelines drop their template's first `prompt_template_encode_start_idx` hidden states
    (34 / 64 with the real tokenizer): the tiny tokenizer's prefix has exactly that many tokens,
    so the prompt's own tokens are all kept and no template token is."""
    pipe = {"QwenImagePipeline": generation[0], "QwenImageEditPlusPipeline": edit[0]}[pipeline_class]
    assert type(pipe).__name__ == pipeline_class and type(pipe.tokenizer).__name__ == "Qwen2Tokenizer"
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx
    with_prompt = pipe.tokenizer(pipe.prompt_template_encode.format("a fox")).input_ids
    assert pipe.tokenizer.decode(with_prompt[pipe.prompt_template_encode_start_idx:]).startswith("a fox<|im_end|>")
