"""FLUX.2 on the step engine against diffusers' own pipelines (CPU, fp32): [dev]
(`Flux2Pipeline`, guidance embedded), [klein] distilled and [klein] base (`Flux2KleinPipeline`,
true CFG). A request alone gives the pipeline's image for the same inputs and seed with 0, 1 and
2 reference images; sharing the batch with requests of other steps, guidance, prompts and
references, joining later, stays within one level. Plus the batch key, one transformer call per
step, previews, and the ingress's reference rule being exactly the pipeline's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.config import load_model_config
from serve_app.engine.runners.base import ImageSpec, run_together
from serve_app.engine.runners.flux2 import Flux2Runner
from serve_app.engine.tiny_flux2 import build_tiny_flux2, build_tiny_flux2_klein

MODEL = load_model_config(Path(__file__).resolve().parents[2] / "models" / "tiny-flux2.yaml")
SIZE, STEPS, GUIDANCE = 128, 3, 3.5


def noise(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


# Two references of different shapes (200x150 is cropped to 192x144 by the pipeline), and two
# others that the pipeline brings to the same sizes: requests with either pair share a batch.
REFS = (noise(200, 150, 1), noise(96, 160, 2))
OTHER_REFS = (noise(195, 155, 3), noise(100, 170, 4))


def level_difference(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture(scope="module")
def runners():
    threads = torch.get_num_threads()
    torch.set_num_threads(MODEL.engine.num_threads)  # as the replica runs it (tiny-flux2.yaml says why)
    built = {"dev": build_tiny_flux2(), "klein": build_tiny_flux2_klein(distilled=True),
             "klein-base": build_tiny_flux2_klein(distilled=False)}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    yield {name: Flux2Runner(pipe, MODEL, "cpu") for name, pipe in built.items()}
    torch.set_num_threads(threads)


def spec(references=(), seed: int = 1234, steps: int = STEPS, guidance: float = GUIDANCE,
         prompt: str = "a red fox in the snow") -> ImageSpec:
    return ImageSpec(prompt, None, SIZE, SIZE, steps, guidance, seed, images=tuple(references))


def pipeline_image(runner: Flux2Runner, image: ImageSpec) -> Image.Image:
    with torch.inference_mode():
        return runner.pipe(prompt=image.prompt, image=list(image.images) or None, height=image.height,
                           width=image.width, num_inference_steps=image.steps, guidance_scale=image.guidance,
                           generator=torch.Generator().manual_seed(image.seed),
                           max_sequence_length=MODEL.max_sequence_length).images[0]


@pytest.mark.parametrize(("variant", "references"), [
    ("dev", 0), ("dev", 1), ("dev", 2), ("klein", 1), ("klein-base", 0), ("klein-base", 2)])
def test_alone_equals_the_pipeline(runners, variant, references):
    runner, image = runners[variant], spec(REFS[:references])
    [ours] = run_together(runner, [image])
    levels = level_difference(ours, pipeline_image(runner, image))
    print(f"FLUX.2 {variant}, {references} reference(s), alone vs diffusers: {levels} level(s)")
    assert levels <= 1


@pytest.mark.parametrize("variant", ["dev", "klein-base"])
def test_sharing_a_batch_stays_within_one_level(runners, variant):
    """Two requests with other steps, guidance, prompt, seed and reference pixels, the second
    joining at the first's third step boundary; each against itself alone."""
    runner = runners[variant]
    first = spec(REFS, steps=STEPS + 2)
    second = spec(OTHER_REFS, seed=7, steps=STEPS, guidance=GUIDANCE + 1.5, prompt="a castle on a hill")
    assert runner.batch_key(first) == runner.batch_key(second)
    shared = run_together(runner, [first, second], join_at=[0, 2])
    alone = [run_together(runner, [image])[0] for image in (first, second)]
    levels = [level_difference(a, b) for a, b in zip(shared, alone, strict=True)]
    print(f"FLUX.2 {variant}, shared batch vs alone: {levels} level(s)")
    assert max(levels) <= 1


def test_batch_key_is_size_cfg_and_the_references_layout(runners):
    dev, base = runners["dev"], runners["klein-base"]
    key = dev.batch_key(spec(REFS))
    assert key == dev.batch_key(spec(OTHER_REFS, guidance=1.0, steps=9))  # same processed sizes
    assert key[-1] == ((192, 144), (96, 160))
    assert key != dev.batch_key(spec(REFS[::-1]))  # the order is the layout
    assert key != dev.batch_key(spec(REFS[:1])) != dev.batch_key(spec())
    assert dev.batch_key(spec(guidance=1.0)) == dev.batch_key(spec(guidance=5.0))  # [dev] embeds guidance
    assert base.batch_key(spec(guidance=1.0)) != base.batch_key(spec(guidance=5.0))  # [klein] base: CFG on/off
    assert not runners["klein"].uses_cfg(spec(guidance=5.0))  # distilled: never CFG


def test_the_key_gives_each_references_tokens_as_the_pipeline_makes_them(runners):
    runner = runners["dev"]
    large = noise(1500, 1000, 5)  # 1.5 MP: shrunk to 1 MP, then to multiples of 16
    [(width, height)] = runner.batch_key(spec([large]))[-1]
    assert (width, height) == (1248, 832) and runner.reference_pixels(large).shape[-2:] == (height, width)
    with torch.inference_mode():
        [state] = runner.prepare([spec(REFS)])
    sizes = runner.batch_key(spec(REFS))[-1]
    assert state.cond["references"].shape[1] == sum((w // 16) * (h // 16) for w, h in sizes)
    time_ids = state.cond["reference_ids"][0, :, 0].tolist()  # which reference each token is: 10, 20, ...
    tokens = [(w // 16) * (h // 16) for w, h in sizes]
    assert time_ids == [10] * tokens[0] + [20] * tokens[1]


def test_one_transformer_call_per_step_over_the_batch(runners, monkeypatch):
    for variant, rows in (("dev", 1), ("klein-base", 2)):  # CFG: an uncond and a cond row per image
        runner, calls = runners[variant], []
        forward = runner.pipe.transformer.forward

        def counting(*args, _forward=forward, _calls=calls, **kwargs):
            _calls.append((kwargs["hidden_states"].shape[0], kwargs["timestep"].tolist()))
            return _forward(*args, **kwargs)

        monkeypatch.setattr(runner.pipe.transformer, "forward", counting)
        with torch.inference_mode():
            states = runner.prepare([spec(REFS, seed=s, steps=2 + s) for s in range(3)])
            runner.step(states[:1])  # the first image runs ahead: the next call mixes timesteps
            runner.step(states)
        assert [batch for batch, _ in calls] == [rows, 3 * rows]
        assert len(set(calls[-1][1])) == 2 and [s.index for s in states] == [2, 1, 1]


def test_the_second_reference_changes_the_image_and_previews_show_the_estimate(runners):
    runner = runners["dev"]
    one, other = (run_together(runner, [spec((REFS[0], second))])[0] for second in (REFS[1], OTHER_REFS[1]))
    assert level_difference(one, other) > 10
    with torch.inference_mode():
        [state] = runner.prepare([spec(REFS)])
        runner.step([state])
        preview = runner.preview(state)
    assert preview.size == (SIZE, SIZE) and state.x0 is not None and state.x0.shape == state.latents.shape


def test_strength_does_not_apply(runners):
    with pytest.raises(ValueError, match="strength"), torch.inference_mode():
        runners["dev"].prepare([ImageSpec("x", None, SIZE, SIZE, 2, 1.0, 0, images=REFS[:1], strength=0.5)])


@pytest.mark.parametrize("size", [(64, 64), (63, 200), (200, 63), (64, 512), (64, 513), (1024, 128), (1025, 128)])
def test_the_ingress_refuses_exactly_the_references_the_pipeline_refuses(runners, size):
    from serve_app.api.uploads import Upload, check_shape
    from serve_app.errors import InvalidRequestError

    def refused(check) -> bool:
        try:
            check()
        except (ValueError, InvalidRequestError):
            return True
        return False

    pipeline = refused(lambda: runners["dev"].pipe.image_processor.check_image_input(Image.new("RGB", size)))
    ingress = refused(lambda: check_shape(Upload("image[0]", b""), size, *MODEL.reference_shape))
    assert pipeline == ingress
