"""The step engine through the real `serve run` app and the OpenAI SDK: presets share
denoising steps, abandoned work stops, and `deterministic` gives the solo bytes under load."""

from __future__ import annotations

import base64
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.integration.conftest import API_KEY


def post(server, timeout: float = 300, **body) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/images/generations", json={"prompt": "a fox", **body},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=timeout)


def test_standard_and_hd_requests_share_denoising_steps(server):
    # 25 and 50 steps: the whole-call scheduler could never batch these; the step engine does.
    qualities = ["standard", "hd", "standard", "hd"]
    with ThreadPoolExecutor(len(qualities)) as pool:
        responses = list(pool.map(lambda q: post(server, model="tiny-sd", quality=q, response_format="b64_json"),
                                  qualities))
    assert [r.status_code for r in responses] == [200] * 4
    batch_sizes = [int(r.headers["x-artserve-batch-size"]) for r in responses]
    assert max(batch_sizes) > 1, batch_sizes
    assert max(batch_sizes) <= 4  # tiny-sd's cap


def idle_latency_s(server, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        assert post(server, model="tiny-sd", response_format="b64_json").status_code == 200
        times.append(time.monotonic() - started)
    return statistics.median(times)


def test_clients_that_disconnect_free_the_model_at_once(server):
    idle_s = idle_latency_s(server)

    def abandon(_):
        try:  # n=4 hd on tiny-sd: 32 images of 50 steps would take a minute or more
            post(server, timeout=1.0, model="tiny-sd", n=4, quality="hd", response_format="b64_json")
        except httpx.TimeoutException:
            return "gone"
        return "answered"

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(abandon, range(8))) == ["gone"] * 8
    started = time.monotonic()
    assert post(server, model="tiny-sd", response_format="b64_json").status_code == 200
    after_s = time.monotonic() - started
    print(f"idle {idle_s:.2f}s, after 8 abandoned n=4 hd requests {after_s:.2f}s ({after_s / idle_s:.1f}x)")
    assert after_s < 3 * idle_s + 1.0  # without cancellation: over 30x


def test_deterministic_requests_give_the_solo_bytes_under_load(server):
    body = {"model": "tiny-flux", "seed": 4242, "response_format": "b64_json", "output_format": "png",
            "deterministic": True}
    alone = post(server, **body).json()["data"][0]["b64_json"]
    with ThreadPoolExecutor(5) as pool:
        noise = [pool.submit(post, server, model="tiny-flux", seed=s, quality="hd", response_format="b64_json")
                 for s in range(4)]
        time.sleep(0.3)  # the others are running: the deterministic one must not share their steps
        loaded = post(server, **body)
        assert all(f.result().status_code == 200 for f in noise)
    assert loaded.status_code == 200
    assert loaded.headers["x-artserve-batch-size"] == "1"
    assert base64.b64decode(loaded.json()["data"][0]["b64_json"]) == base64.b64decode(alone)
