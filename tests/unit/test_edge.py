"""The ingress's edge without Ray: the real `create_api` and `ImageIngress.generate` in
process (httpx's ASGI transport), up to the point where a model replica would be called.
Body limits, hostile JSON, the error envelope and its retry headers, the OpenAPI document."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serve_app.api.auth import ApiKeys
from serve_app.api.drain import DrainState
from serve_app.api.ingress import ImageIngress, create_api
from serve_app.api.limits import MAX_JSON_DEPTH, BodyLimitMiddleware
from serve_app.config import AppConfig

LIMIT = 10_000


class Metrics:
    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def response(self, model: str, status: int) -> None:
        self.seen.append((model, status))


@pytest.fixture
def ingress(tmp_path):
    config = AppConfig.from_args(
        {"models": ["tiny-sd"], "storage": str(tmp_path), "max_json_body_bytes": LIMIT}, env={}
    )
    ingress = ImageIngress.func_or_class.__new__(ImageIngress.func_or_class)
    ingress.config, ingress.models, ingress.handles = config, config.load_models(), {}
    ingress.keys, ingress.metrics, ingress.idempotency = ApiKeys(["sk-1"]), Metrics(), None
    ingress.drain = DrainState(None)
    return ingress


def post(ingress, content: bytes, headers: dict | None = None, path: str = "/v1/images/generations"):
    async def go():
        transport = httpx.ASGITransport(app=create_api(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(path, content=content,
                                     headers={"authorization": "Bearer sk-1", **(headers or {})})

    return asyncio.run(go())


def assert_envelope(response, status: int, should_retry: str = "false") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert response.headers["x-should-retry"] == should_retry
    return error


@pytest.mark.parametrize(("body", "param"), [
    ({"model": {}, "prompt": "x"}, "model"),  # was a 500: a dict is unhashable in the model lookup
    ({"model": [], "prompt": "x"}, "model"),
    ({"model": "tiny-sd", "prompt": {"a": 1}}, "prompt"),
    ({"model": "tiny-sd", "prompt": "x", "n": "two"}, "n"),
    ({"model": "tiny-sd", "prompt": "x", "size": ["256x256"]}, "size"),
    ({"model": "tiny-sd", "prompt": "x", "n": True}, "n"),
])
def test_mistyped_fields_are_400_naming_the_field(ingress, body, param):
    error = assert_envelope(post(ingress, json.dumps(body).encode()), 400)
    assert error["param"] == param
    assert ingress.metrics.seen == [("-" if not isinstance(body["model"], str) else "tiny-sd", 400)]


@pytest.mark.parametrize("body", [b"[]", b"1", b'"x"', b"null", b"{", b"\xff\xfe", b"", b'{"a": NaN'])
def test_non_objects_and_malformed_json_are_400(ingress, body):
    assert_envelope(post(ingress, body), 400)


def test_deep_nesting_is_400_not_a_recursion_error(ingress):
    deep = b"[" * 100_000 + b"]" * 100_000  # json.loads raises RecursionError on this
    assert len(deep) > LIMIT  # with the production 1 MB limit
    ingress.config = ingress.config.model_copy(update={"max_json_body_bytes": 1_000_000})
    assert_envelope(post(ingress, deep), 400)
    nested = json.dumps({"model": "tiny-sd", "prompt": "x", "user": json.loads("[" * 40 + "]" * 40)}).encode()
    error = assert_envelope(post(ingress, nested), 400)
    assert error["param"] == "user" and str(MAX_JSON_DEPTH) in error["message"]


def test_lone_surrogates_are_400(ingress):
    error = assert_envelope(post(ingress, b'{"model": "tiny-sd", "prompt": "\\ud800"}'), 400)
    assert error["param"] == "prompt"


def test_declared_oversized_body_is_413_before_reading(ingress):
    response = post(ingress, b"{" + b" " * LIMIT + b"}")
    error = assert_envelope(response, 413)
    assert str(LIMIT) in error["message"] and error["type"] == "invalid_request_error"


def test_chunked_body_is_cut_off_at_the_limit():
    """No Content-Length: the middleware counts chunks and stops reading past the limit."""
    pulled: list[int] = []

    async def app(scope, receive, send):  # reads like Starlette's request.body()
        while True:
            message = await receive()
            pulled.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    chunks = [b"x" * 4096] * 100  # 400 KB offered, the limit is 10 KB
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": chunks.pop(), "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    middleware = BodyLimitMiddleware(app, limit_for=lambda path: LIMIT)
    asyncio.run(middleware({"type": "http", "path": "/v1/images/generations", "headers": []}, receive, send))
    assert sent[0]["status"] == 413
    assert json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"
    assert sum(pulled) <= LIMIT and len(chunks) == 100 - 3  # the 3rd chunk passed the limit: stop


def test_bad_idempotency_key_is_400(ingress):
    body = json.dumps({"model": "tiny-sd", "prompt": "x"}).encode()
    assert_envelope(post(ingress, body, {"idempotency-key": "x" * 300}), 400)


def test_unknown_model_404_and_unauthorized_401_say_do_not_retry(ingress):
    body = json.dumps({"model": "nope", "prompt": "x"}).encode()
    assert assert_envelope(post(ingress, body), 404)["param"] == "model"
    assert_envelope(post(ingress, body, {"authorization": "Bearer wrong"}), 401)


def test_openapi_document_has_the_request_and_response_models(ingress):
    async def go():
        transport = httpx.ASGITransport(app=create_api(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/openapi.json")

    document = asyncio.run(go()).json()
    operation = document["paths"]["/v1/images/generations"]["post"]
    body_schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema == {"$ref": "#/components/schemas/ImageGenerateRequest"}
    schemas = document["components"]["schemas"]
    assert {"model", "prompt"} <= set(schemas["ImageGenerateRequest"]["required"])
    assert schemas["ImageGenerateRequest"]["properties"]["n"]["anyOf"][0]["maximum"] == 10
    assert "422" not in json.dumps(document["paths"])
    assert {"400", "409", "413", "429", "503"} <= set(operation["responses"])
    import schemathesis  # the document must load as OpenAPI for fuzzers

    assert schemathesis.openapi.from_dict(document) is not None


def test_edit_routes_refuse_bodies_no_served_model_can_use(ingress):
    """The default edits/variations limit follows the served models: one input image and a
    mask of 50 MB each, base64 in JSON, + 1 MB of fields (134 MB), not 16 images' worth."""
    from serve_app.api import uploads

    limit = uploads.edit_body_limit(1)
    assert limit == 2 * 50 * 1024 * 1024 * 4 // 3 + 1024 * 1024
    for path in ("/v1/images/edits", "/v1/images/variations"):
        response = post(ingress, b"", headers={"content-length": str(limit + 1)}, path=path)
        assert str(limit) in assert_envelope(response, 413)["message"]
