"""Idempotency-Key end to end (SPEC "Retry safety") against the real app, which runs two
ingress replicas here: a repeat gets the first response with no new generation (no new image
file in the local store), concurrent duplicates make one generation, a different body under
the key is a 409, keys are per API key, and entries survive an ingress replica's restart."""

from __future__ import annotations

import os
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.conftest import API_KEY
from tests.integration.replicas import replica_pids, wait_for_new_pid

BODY = {"model": "tiny-sd", "prompt": "a red kite", "n": 2, "num_inference_steps": 2, "size": "256x256"}


def images_on_disk(server) -> int:
    return sum(1 for p in server.storage.rglob("*") if p.suffix in (".png", ".webp", ".jpeg"))


def post(server, key: str | None, body: dict = BODY, api_key: str = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {api_key}"}
    if key:
        headers["Idempotency-Key"] = key
    return httpx.post(f"{server.base_url}/v1/images/generations", json=body, headers=headers, timeout=120)


@pytest.fixture
def key() -> str:
    return f"test-{uuid.uuid4()}"


def test_repeat_returns_the_first_response_without_generating(server, key):
    first = post(server, key)
    assert first.status_code == 200, first.text
    files = images_on_disk(server)
    repeats: list[httpx.Response] = []
    while len(repeats) < 20 and len({r.headers["x-artserve-replica"] for r in [first, *repeats]}) < 2:
        repeats.append(post(server, key))
    assert all(r.status_code == 200 for r in repeats)
    assert all(r.json() == first.json() for r in repeats)  # same created, same links, same seeds
    assert all(r.headers["x-artserve-idempotent-replay"] == "true" for r in repeats)
    assert images_on_disk(server) == files  # no new image: no new pipeline run
    # The repeats landed on both ingress replicas, which share the store.
    assert len({r.headers["x-artserve-replica"] for r in [first, *repeats]}) == 2
    for item in first.json()["data"]:
        assert httpx.get(item["url"], timeout=30).status_code == 200


def test_concurrent_duplicates_generate_once(server, key):
    files = images_on_disk(server)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: post(server, key), range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.json() == responses[0].json() for r in responses)
    assert images_on_disk(server) == files + BODY["n"]
    assert sum(r.headers.get("x-artserve-idempotent-replay") != "true" for r in responses) == 1


def test_different_body_under_a_used_key_is_409(server, key):
    assert post(server, key).status_code == 200
    conflict = post(server, key, {**BODY, "prompt": "a blue kite"})
    assert conflict.status_code == 409
    assert conflict.headers["x-should-retry"] == "false"
    error = conflict.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_keys_are_scoped_per_api_key_and_absent_key_always_generates(server, key):
    mine = post(server, key).json()
    theirs = post(server, key, api_key="second-key")
    assert theirs.status_code == 200 and theirs.json()["data"] != mine["data"]
    plain = [post(server, None).json()["data"] for _ in range(2)]
    assert plain[0] != plain[1]


def test_entries_survive_an_ingress_replica_restart(server, key):
    first = post(server, key, {**BODY, "response_format": "b64_json", "n": 1})
    assert first.status_code == 200
    old = set(replica_pids(server.pid, "ImageIngress"))
    assert len(old) == 2
    victim = old.pop()
    os.kill(victim, signal.SIGKILL)
    wait_for_new_pid(server.pid, "ImageIngress", {victim, *old})
    seen = set()
    for _ in range(40):  # until the restarted replica has answered a repeat, too
        repeat = post(server, key, {**BODY, "response_format": "b64_json", "n": 1})
        if repeat.status_code == 200:
            assert repeat.json() == first.json()
            seen.add(repeat.headers["x-artserve-replica"])
        if len(seen) == 2:
            break
    assert len(seen) == 2
