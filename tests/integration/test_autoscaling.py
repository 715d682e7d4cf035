"""Per-model autoscaling on the real local Ray cluster: sustained load on one model takes it
from 1 to 2 replicas while an idle model stays at 1, and it scales back once the load stops.
Replica counts are read from GET /v1/models/{id} (`running_replicas`, from serve.status())."""

from __future__ import annotations

import threading
import time

import httpx

from tests.integration.conftest import API_KEY

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def replicas(server, model: str) -> int:
    return httpx.get(f"{server.base_url}/v1/models/{model}", headers=HEADERS, timeout=10).json()["running_replicas"]


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(1)
    return False


def test_busy_model_scales_up_and_down_while_idle_model_stays(server):
    assert replicas(server, "tiny-flux-auto") == 1 and replicas(server, "tiny-sd-auto") == 1
    stop = threading.Event()

    def load():
        while not stop.is_set():
            httpx.post(f"{server.base_url}/v1/images/generations", headers=HEADERS, timeout=120,
                       json={"model": "tiny-flux-auto", "prompt": "busy", "num_inference_steps": 20,
                             "response_format": "b64_json"})

    threads = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        assert wait_for(lambda: replicas(server, "tiny-flux-auto") == 2, timeout_s=90), "no scale-up"
        assert replicas(server, "tiny-sd-auto") == 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert wait_for(lambda: replicas(server, "tiny-flux-auto") == 1, timeout_s=90), "no scale-down"
    assert replicas(server, "tiny-sd-auto") == 1
