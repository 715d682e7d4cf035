"""The OpenAI Images API end to end: the real `serve run` app, real tiny diffusers
pipelines on CPU, the official OpenAI Python SDK as the client."""

from __future__ import annotations

import base64
import io
import time
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from serve_app.storage.local import ROUTE_PREFIX, LocalImageStore
from tests.integration.conftest import EXTRA_FAMILIES, QWEN_MODELS, SIGNING_KEY
from tests.openai_schema import validate

MODELS = ["tiny-sd", "tiny-flux"]
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def decode(item, response_format: str) -> bytes:
    if response_format == "b64_json":
        assert item.url is None
        return base64.b64decode(item.b64_json)
    assert item.b64_json is None
    fetched = httpx.get(item.url, timeout=30)  # a plain GET: no API key, no headers
    assert fetched.status_code == 200
    return fetched.content


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_n_images_of_the_requested_size_and_format(client, model, response_format):
    result = client.images.generate(
        model=model, prompt="a lighthouse at dusk", n=3, size="512x256" if model == "tiny-sd" else "256x512",
        response_format=response_format, extra_body={"output_format": "png", "seed": 100},
    )
    assert abs(result.created - time.time()) < 300
    assert len(result.data) == 3
    assert [item.seed for item in result.data] == [100, 101, 102]
    images = []
    for item in result.data:
        image = Image.open(io.BytesIO(decode(item, response_format)))
        assert image.format == "PNG"
        assert image.size == ((512, 256) if model == "tiny-sd" else (256, 512))
        assert item.revised_prompt.startswith("a lighthouse at dusk")
        images.append(image.tobytes())
    assert len(set(images)) == 3
    body = result.model_dump(exclude_none=True)
    validate(body, "ImagesResponse")
    # Echoes stay inside OpenAI's enums: no size outside the schema's list, quality as low/medium/high.
    assert "size" not in body
    assert (body["output_format"], body["quality"], body["background"]) == ("png", "medium", "opaque")
    assert body["usage"]["output_tokens"] == 3 * (512 // 16) * (256 // 16)
    assert body["usage"]["input_tokens"] == body["usage"]["input_tokens_details"]["text_tokens"] > 0


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_output_formats_and_the_webp_default(client, output_format):
    extra = {"output_format": output_format, "output_compression": 80} if output_format == "jpeg" else {}
    result = client.images.generate(model="tiny-flux", prompt="a fox", response_format="b64_json", extra_body=extra)
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == PIL_FORMATS[output_format] and image.size == (256, 256)


def test_reference_example_shape(client):
    """The example from the reference docs, with our model id and base URL."""
    response = client.images.generate(model="tiny-flux", prompt="A minimalist logo for a tech startup, flat design, "
                                      "blue tones", n=1, size="1024x1024", quality="hd",
                                      extra_body={"num_inference_steps": 2})
    body = response.model_dump(exclude_none=True)
    validate(body, "ImagesResponse")
    assert (body["size"], body["quality"]) == ("1024x1024", "high")
    fetched = httpx.get(response.data[0].url, timeout=30)
    assert fetched.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(fetched.content)).size == (1024, 1024)


@pytest.mark.parametrize("model", MODELS)
def test_same_seed_same_bytes(client, model):
    kwargs = dict(model=model, prompt="a red bicycle", response_format="b64_json", extra_body={"seed": 1234})
    first, second = client.images.generate(**kwargs), client.images.generate(**kwargs)
    assert first.data[0].b64_json == second.data[0].b64_json
    other = client.images.generate(**{**kwargs, "extra_body": {"seed": 1235}})
    assert other.data[0].b64_json != first.data[0].b64_json


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).convert("RGB"))


def test_quality_style_and_extensions_change_the_generation(client):
    def gen(**kwargs):
        extra = {"seed": 9, **kwargs.pop("extra_body", {})}
        return client.images.generate(model="tiny-sd", prompt="a cat", response_format="b64_json",
                                      extra_body=extra, **kwargs)

    base = gen(quality="standard", style="vivid")
    assert not np.array_equal(pixels(base), pixels(gen(quality="hd", style="vivid")))
    natural = gen(quality="standard", style="natural")
    assert natural.data[0].revised_prompt != base.data[0].revised_prompt
    assert not np.array_equal(pixels(base), pixels(natural))
    negative = gen(quality="standard", style="vivid", extra_body={"negative_prompt": "fur"})
    assert not np.array_equal(pixels(base), pixels(negative))
    steps = gen(quality="standard", style="vivid", extra_body={"num_inference_steps": 3, "guidance_scale": 2.0})
    assert not np.array_equal(pixels(base), pixels(steps))


def test_models_list_and_retrieve(client):
    ids = [m.id for m in client.models.list() if ":" not in m.id]  # "<model>:<adapter>": test_loras.py
    assert ids == [*MODELS, "tiny-sd-small", "tiny-broken", "tiny-flux-auto", "tiny-sd-auto", "tiny-sd-kill",
                   *EXTRA_FAMILIES, *QWEN_MODELS, "tiny-sd-lora"]
    model = client.models.retrieve("tiny-flux")
    assert (model.id, model.object) == ("tiny-flux", "model")
    raw = httpx.get(f"{client.base_url}models", headers={"Authorization": f"Bearer {client.api_key}"}).json()
    validate(raw, "ListModelsResponse")
    assert "1792x1024" in raw["data"][0]["sizes"]
    cards = {card["id"]: card for card in raw["data"]}
    assert cards["tiny-sd"]["running_replicas"] == 1 and cards["tiny-sd"]["status"] == "HEALTHY"
    assert cards["tiny-broken"]["running_replicas"] == 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="flux-pro", prompt="x")
    error = info.value.body
    assert (error["code"], error["param"]) == ("model_not_found", "model")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "300x300"}, "size"),
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"extra_body": {"n": "two"}}, "n"),
        ({"extra_body": {"seed": "abc"}}, "seed"),
        ({"extra_body": {"guidance_scale": 99}}, "guidance_scale"),
        ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps"),
        ({"quality": "ultra"}, "quality"),
        ({"response_format": "gif"}, "response_format"),
        ({"extra_body": {"output_format": "bmp"}}, "output_format"),
        ({"extra_body": {"background": "transparent"}}, "background"),
    ],
)
def test_bad_requests_are_400_naming_the_param(client, kwargs, param):
    args = {"model": "tiny-sd", "prompt": "a cat", **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(**args)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param
    assert info.value.body["type"] == "invalid_request_error"


def test_wrong_or_missing_api_key(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="sk-wrong").images.generate(model="tiny-sd", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="sk-wrong").models.list()
    response = httpx.post(f"{server.base_url}/v1/images/generations", json={"model": "tiny-sd", "prompt": "x"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert server.client(api_key="second-key").models.retrieve("tiny-sd").id == "tiny-sd"


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [
        ("POST", "/v1/images/generations", b"{not json", 400),
        ("POST", "/v1/images/generations", b"[1, 2]", 400),
        ("POST", "/v1/images/generations", b"\xff\xfe", 400),
        ("GET", "/v1/no-such-route", None, 404),
        ("DELETE", "/v1/models", None, 405),
        ("GET", ROUTE_PREFIX + "2026/01/01/" + "0" * 32 + ".png", None, 403),
    ],
)
def test_every_error_has_the_openai_envelope(server, method, path, content, status):
    response = httpx.request(method, server.base_url + path, content=content,
                             headers={"Authorization": "Bearer sk-test-artserve"})
    assert response.status_code == status
    body = response.json()
    validate(body, "ErrorResponse")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and "/serve_app/" not in response.text
    assert response.headers.get("x-request-id")


def test_x_request_id_is_echoed(server):
    response = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": "Bearer sk-test-artserve",
                                                                  "x-request-id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"


def test_tampered_and_expired_links_are_403(client, server, monkeypatch):
    url = client.images.generate(model="tiny-flux", prompt="x").data[0].url
    assert httpx.get(url).status_code == 200
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    key = parts.path.removeprefix(ROUTE_PREFIX)
    expires, signature = query["expires"][0], query["signature"][0]
    assert abs(int(expires) - time.time() - 86400) < 300
    base = f"{server.base_url}{ROUTE_PREFIX}"
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    for bad in [
        f"{base}{key}?expires={expires}&signature={flipped}",
        f"{base}{key}?expires={int(expires) + 1}&signature={signature}",
        f"{base}{key}",
        f"{base}..%2F..%2F.url-signing-key?expires={expires}&signature={signature}",
    ]:
        response = httpx.get(bad)
        assert response.status_code == 403, bad
        assert response.json()["error"]["type"] == "invalid_request_error"
    # A link signed with the server's own key, but already expired.
    monkeypatch.setenv("ARTSERVE_URL_SIGNING_KEY", SIGNING_KEY)
    store = LocalImageStore(str(server.storage), url_ttl_s=86400)
    assert httpx.get(store.signed_url(key, server.base_url)).status_code == 200  # the key is the server's
    expired = store.signed_url(key, server.base_url, now_s=time.time() - 86401)
    assert httpx.get(expired).status_code == 403


def test_a_response_larger_than_grpcs_default_message_bound(client):
    """Replicas talk gRPC (serve_app/ray_env.py), whose default bound is 4 MiB a message: two
    large PNGs as base64 are one response of several times that, from the model replica to the
    ingress and on to the proxy."""
    result = client.images.generate(model="tiny-sd", prompt="static on an old television", n=2, size="1792x1024",
                                    response_format="b64_json", extra_body={"num_inference_steps": 1,
                                                                           "output_format": "png"})
    assert sum(len(d.b64_json) for d in result.data) > 4 * 2**20
    for data in result.data:
        assert Image.open(io.BytesIO(base64.b64decode(data.b64_json))).size == (1792, 1024)
