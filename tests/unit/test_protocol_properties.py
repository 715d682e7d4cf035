"""Property tests (hypothesis) of the wire parsing, no Ray: whatever a client sends, parsing
ends in a request or a 400 that names a field of the body, never another exception."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.api.limits import decode_json_body
from serve_app.api.protocol import ImageGenerateRequest, parse_generate_request
from serve_app.errors import InvalidRequestError

FIELDS = sorted(ImageGenerateRequest.model_fields)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
valid = st.fixed_dictionaries(
    {"model": st.text(min_size=1, max_size=20), "prompt": st.text(min_size=1).filter(str.strip)},
    optional={
        "n": st.integers(1, 10),
        "size": st.sampled_from(["auto", "256x256", "1024x1024"]),
        "quality": st.sampled_from(["standard", "hd", "low", "medium", "high", "auto"]),
        "response_format": st.sampled_from(["url", "b64_json"]),
        "style": st.sampled_from(["vivid", "natural"]),
        "output_format": st.sampled_from(["png", "jpeg", "webp"]),
        "output_compression": st.integers(0, 100),
        "seed": st.integers(0, 2**63 - 1),
        "num_inference_steps": st.integers(1, 1000),
        "guidance_scale": st.floats(0, 100),
        "user": st.text(max_size=20),
        "stream": st.just(False),
    },
)


def parse_or_400(body):
    try:
        return parse_generate_request(body)
    except InvalidRequestError as exc:  # anything else fails the test
        error = exc.body()["error"]
        assert set(error) == {"message", "type", "param", "code"} and exc.status_code == 400
        # The field at fault: one the body sent, or a required one it left out.
        assert error["param"] is None or (isinstance(body, dict) and error["param"] in {*map(str, body), *FIELDS})
        return exc


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_is_a_request_or_a_400(body):
    parse_or_400(body)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=8))
def test_any_object_with_known_keys_is_a_request_or_a_400(body):
    parse_or_400(body)


@settings(max_examples=200, deadline=None)
@given(valid, st.dictionaries(st.text(min_size=1, max_size=6).filter(lambda k: k not in FIELDS), json_values,
                              max_size=3))
def test_valid_bodies_parse_and_keep_their_values_whatever_else_is_sent(body, unknown):
    request = parse_generate_request({**unknown, **body})
    for name, value in body.items():
        assert getattr(request, name) == value


@settings(max_examples=200, deadline=None)
@given(valid, st.sampled_from(["model", "prompt", "n", "size", "quality", "seed", "output_compression"]),
       st.sampled_from([{}, [], "two", 1.5, True, None, -1, 10**30, {"a": [1]}]))
def test_a_wrong_value_is_a_400_naming_its_field(body, field, value):
    body = {**body, field: value}
    result = parse_or_400(body)
    if isinstance(result, InvalidRequestError):
        assert result.param == field
    else:  # only values the field really takes get through
        assert (field, value) in {("model", "two"), ("prompt", "two"), ("size", "two"), ("seed", None),
                                  ("n", None), ("size", None), ("quality", None), ("output_compression", None)}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_decode_to_json_or_a_400(raw):
    try:
        decode_json_body(raw)
    except InvalidRequestError as exc:
        assert exc.status_code == 400 and exc.code == "invalid_json"
