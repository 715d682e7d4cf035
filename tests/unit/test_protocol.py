"""Every field of POST /v1/images/generations: good values pass, bad ones are a 400
(InvalidRequestError) naming the field."""

import pytest

from serve_app.api.protocol import parse_generate_request
from serve_app.errors import InvalidRequestError

BASE = {"model": "tiny-sd", "prompt": "a lighthouse"}

GOOD = [
    ("n", 1), ("n", 10), ("n", None),
    ("size", "1024x1024"), ("size", "auto"), ("size", None),
    *[("quality", q) for q in ["standard", "hd", "low", "medium", "high", "auto", None]],
    ("response_format", "url"), ("response_format", "b64_json"),
    ("style", "vivid"), ("style", "natural"),
    ("output_format", "png"), ("output_format", "jpeg"), ("output_format", "webp"),
    ("output_compression", 0), ("output_compression", 100),
    ("user", "user-1234"),
    *[("background", b) for b in ["auto", "opaque", "transparent"]],
    ("moderation", "low"), ("moderation", "auto"),
    ("stream", False), ("stream", True),
    ("partial_images", 0), ("partial_images", 3),
    ("deterministic", True), ("deterministic", False),
    ("seed", 0), ("seed", 2**63 - 1),
    ("negative_prompt", "blurry"), ("negative_prompt", ""),
    ("num_inference_steps", 1), ("num_inference_steps", 50),
    ("guidance_scale", 0), ("guidance_scale", 7.5), ("guidance_scale", 3),
]

BAD = [
    ("model", ""), ("model", 3), ("model", None),
    ("prompt", ""), ("prompt", "   \n"), ("prompt", 42), ("prompt", ["a"]), ("prompt", None),
    ("n", 0), ("n", 11), ("n", -1), ("n", "two"), ("n", "2"), ("n", 2.0), ("n", True),
    ("size", 1024), ("size", ["1024x1024"]),
    ("quality", "ultra"), ("quality", "HD"), ("quality", 1),
    ("response_format", "png"), ("response_format", True),
    ("style", "cinematic"),
    ("output_format", "gif"), ("output_format", "JPEG"),
    ("output_compression", -1), ("output_compression", 101), ("output_compression", "90"),
    ("user", 7),
    ("background", "green"),
    ("moderation", "off"),
    ("stream", "yes"), ("stream", 1),
    ("partial_images", 4), ("partial_images", -1), ("partial_images", "2"),
    ("deterministic", "yes"),
    ("seed", -1), ("seed", 2**63), ("seed", 1.5), ("seed", "42"),
    ("negative_prompt", 0),
    ("num_inference_steps", 0), ("num_inference_steps", "20"), ("num_inference_steps", 2.5),
    ("guidance_scale", -0.1), ("guidance_scale", "7"), ("guidance_scale", float("inf")),
    ("guidance_scale", False),
]


@pytest.mark.parametrize(("field", "value"), GOOD)
def test_good_values_are_accepted(field, value):
    request = parse_generate_request({**BASE, field: value})
    assert getattr(request, field) == value


@pytest.mark.parametrize(("field", "value"), BAD)
def test_bad_values_are_a_400_naming_the_field(field, value):
    with pytest.raises(InvalidRequestError) as info:
        parse_generate_request({**BASE, field: value})
    assert info.value.status_code == 400
    assert info.value.param == field
    assert field in info.value.message


@pytest.mark.parametrize("missing", ["model", "prompt"])
def test_missing_required_field(missing):
    body = dict(BASE)
    del body[missing]
    with pytest.raises(InvalidRequestError) as info:
        parse_generate_request(body)
    assert (info.value.param, info.value.code) == (missing, "missing_required_parameter")


@pytest.mark.parametrize("body", [[], "text", 3, None])
def test_body_must_be_an_object(body):
    with pytest.raises(InvalidRequestError) as info:
        parse_generate_request(body)
    assert info.value.param is None


def test_unknown_fields_are_ignored():
    request = parse_generate_request({**BASE, "partial_images": 2, "not_a_field": {"x": 1}})
    assert request.prompt == "a lighthouse"
