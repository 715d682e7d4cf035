from pathlib import Path

import pytest

from serve_app.api.presets import resolve_job
from serve_app.api.protocol import parse_generate_request
from serve_app.config import load_model_config
from serve_app.errors import InvalidRequestError

MODELS = Path(__file__).resolve().parents[2] / "models"
SD = load_model_config(MODELS / "tiny-sd.yaml")
FLUX = load_model_config(MODELS / "tiny-flux.yaml")


def job(model=SD, **fields):
    request = parse_generate_request({"model": model.id, "prompt": "a fox", **fields})
    return resolve_job(request, model, request_id="r1", base_url="http://h/")


def test_defaults():
    j = job()
    assert (j.width, j.height) == (256, 256)
    assert j.num_inference_steps == SD.quality["standard"].num_inference_steps
    assert j.output_format == "webp" and j.response_format == "url" and j.output_compression == 100
    assert j.prompt == SD.style["vivid"].prompt_template.replace("{prompt}", "a fox")
    assert len(j.seeds) == 1


@pytest.mark.parametrize("size", ["256x256", "1792x1024", "1024x1792", "640x384", "auto"])
def test_accepted_sizes(size):
    j = job(size=size)
    assert f"{j.width}x{j.height}" == (SD.default_size if size == "auto" else size)


@pytest.mark.parametrize("size", ["300x300", "1024", "1024x1024x2", "0x0", "128x128", "2048x2048", "1024X1024", ""])
def test_rejected_sizes_name_the_accepted_ones(size):
    with pytest.raises(InvalidRequestError) as info:
        job(size=size)
    assert info.value.param == "size" and "1792x1024" in info.value.message


def test_quality_and_style_change_the_generation():
    standard, hd = job(quality="standard"), job(quality="hd")
    assert hd.num_inference_steps > standard.num_inference_steps
    vivid, natural = job(style="vivid"), job(style="natural")
    assert vivid.prompt != natural.prompt and "a fox" in natural.prompt
    assert natural.guidance_scale < vivid.guidance_scale


def test_extensions_override_presets_within_bounds():
    j = job(num_inference_steps=7, guidance_scale=2.5, seed=41, n=3, negative_prompt="blur")
    assert (j.num_inference_steps, j.guidance_scale, j.seeds, j.negative_prompt) == (7, 2.5, (41, 42, 43), "blur")
    for field, value in [("num_inference_steps", 101), ("guidance_scale", 20.5)]:
        with pytest.raises(InvalidRequestError) as info:
            job(**{field: value})
        assert info.value.param == field


def test_prompt_template_is_not_a_format_string():
    assert "{0} {x}" in job(prompt="{0} {x}").prompt


def test_model_limits():
    with pytest.raises(InvalidRequestError) as info:
        job(prompt="x" * (SD.max_prompt_chars + 1))
    assert info.value.param == "prompt"
    with pytest.raises(InvalidRequestError) as info:
        job(FLUX, negative_prompt="blur")
    assert info.value.param == "negative_prompt"
    with pytest.raises(InvalidRequestError) as info:
        job(background="transparent")
    assert info.value.param == "background"
    with pytest.raises(InvalidRequestError) as info:
        job(seed=2**63 - 2, n=3)
    assert info.value.param == "seed"


def test_random_seeds_when_none_given():
    assert len({job().seeds[0] for _ in range(5)}) > 1
