"""Input hardening through the real proxy and ingress: body limits (413, Content-Length
declared or not), hostile JSON (400), and the OpenAPI document served at /openapi.json."""

from __future__ import annotations

import json
import os
import time

import httpx

from tests.integration.conftest import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def url(server) -> str:
    return f"{server.base_url}/v1/images/generations"


def assert_envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert response.headers["x-should-retry"] == "false"
    return error


def test_oversized_json_is_413(server):
    body = json.dumps({"model": "tiny-sd", "prompt": "x" * 2_000_000}).encode()
    assert_envelope(httpx.post(url(server), content=body, headers=AUTH, timeout=60), 413)


def test_oversized_chunked_body_is_413(server):
    def chunks():
        yield b'{"model": "tiny-sd", "prompt": "'
        for _ in range(40):  # 2.6 MB, no Content-Length
            yield b"x" * 65536
        yield b'"}'

    response = httpx.post(url(server), content=chunks(), headers=AUTH, timeout=60)
    assert_envelope(response, 413)


def test_hostile_json_is_400(server):
    for body, param in [
        (b'{"model": {}, "prompt": "x"}', "model"),
        (b"[" * 100_000 + b"]" * 100_000, None),
        (b'{"model": "tiny-sd", "prompt": "\\udfff"}', "prompt"),
        (b'["model", "tiny-sd"]', None),
    ]:
        error = assert_envelope(httpx.post(url(server), content=body, headers=AUTH, timeout=60), 400)
        assert error["param"] == param


def test_openapi_document_is_served(server):
    document = httpx.get(f"{server.base_url}/openapi.json", timeout=30).json()
    operation = document["paths"]["/v1/images/generations"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ImageGenerateRequest")
    assert "ImagesResponse" in document["components"]["schemas"]


def test_janitor_runs_in_the_app(server):
    """The ingress sweeps the local store (every 2 s in the test app): an expired image and a
    stale .part file go, a fresh image stays."""
    day = server.storage / "2020" / "01" / "02"
    day.mkdir(parents=True, exist_ok=True)
    expired, stale = day / ("e" * 32 + ".png"), day / ("f" * 32 + ".part")
    fresh = server.storage / "2099" / "01" / "01" / ("a" * 32 + ".png")
    fresh.parent.mkdir(parents=True, exist_ok=True)
    for path in (expired, stale, fresh):
        path.write_bytes(b"x")
    old = time.time() - 3 * 86400
    for path in (expired, stale):
        os.utime(path, (old, old))
    deadline = time.monotonic() + 30  # Serve's first health check (10 s) starts the janitor
    while (expired.exists() or stale.exists()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not expired.exists() and not stale.exists()
    assert fresh.exists()
    fresh.unlink()
