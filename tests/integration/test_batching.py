"""Batching and overload through the real app: concurrent requests share pipeline calls,
sizes never mix, n is split across calls in order, and a full queue is a 429."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from tests.integration.conftest import API_KEY


def post(server, **body) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/images/generations", json={"prompt": "a fox", **body},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)


def size_of(item: dict) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size


def test_concurrent_requests_share_steps_and_keep_their_sizes(server):
    sizes = ["256x256", "320x256"] * 4
    with ThreadPoolExecutor(len(sizes)) as pool:
        responses = list(pool.map(lambda s: post(server, model="tiny-sd", size=s, response_format="b64_json",
                                                 num_inference_steps=15), sizes))
    assert all(r.status_code == 200 for r in responses)
    for size, response in zip(sizes, responses, strict=True):
        assert size_of(response.json()["data"][0]) == tuple(map(int, size.split("x")))
    batch_sizes = [int(r.headers["x-artserve-batch-size"]) for r in responses]
    assert max(batch_sizes) > 1, batch_sizes
    assert max(batch_sizes) <= 4  # tiny-sd's max_batch_size


def test_n_split_across_calls_matches_a_serial_run(server):
    # n=6 > the cap of 4: two images wait and join later; results in order with per-image seeds.
    together = post(server, model="tiny-flux", n=6, seed=500, response_format="b64_json").json()["data"]
    assert [item["seed"] for item in together] == list(range(500, 506))
    for item in (together[0], together[5]):
        alone = post(server, model="tiny-flux", n=1, seed=item["seed"], response_format="b64_json").json()["data"]
        a = Image.open(io.BytesIO(base64.b64decode(alone[0]["b64_json"]))).convert("RGB").tobytes()
        b = Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).convert("RGB").tobytes()
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 2  # batched vs single CPU math


def test_full_queue_is_a_rate_limit_error_with_retry_after(server):
    client = server.client()

    def call(_):
        try:
            client.images.generate(model="tiny-sd-small", prompt="a fox", response_format="b64_json",
                                   extra_body={"num_inference_steps": 30})
            return 200, None
        except openai.RateLimitError as exc:
            return 429, exc

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(call, range(6)))
    statuses = [status for status, _ in outcomes]
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for status, exc in outcomes:
        if status == 429:
            assert exc.response.headers["retry-after"] == "3"
            assert exc.body["type"] == "rate_limit_error"


def test_a_model_that_failed_to_start_is_503_not_a_hang(server):
    start = time.monotonic()
    with pytest.raises(openai.InternalServerError) as info:
        server.client().images.generate(model="tiny-broken", prompt="a fox")
    assert time.monotonic() - start < 10
    assert info.value.status_code == 503
    assert info.value.body["type"] == "service_unavailable_error"
    assert info.value.response.headers["retry-after"] == "10"
    assert "no-such-pipeline" not in info.value.response.text  # no server paths in the body


def test_clients_that_disconnect_do_not_break_the_model(server):
    # Serve cancels a request whose client went away; its waiting images are dropped and the
    # scheduler goes on serving everyone else.
    def impatient(_):
        try:
            httpx.post(f"{server.base_url}/v1/images/generations", timeout=0.3,
                       headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": "tiny-sd", "prompt": "gone", "n": 3, "num_inference_steps": 30})
        except httpx.TimeoutException:
            return "gone"
        return "answered"

    with ThreadPoolExecutor(4) as pool:
        assert "gone" in list(pool.map(impatient, range(4)))
    response = post(server, model="tiny-sd", n=2, response_format="b64_json", num_inference_steps=5)
    assert response.status_code == 200 and len(response.json()["data"]) == 2
