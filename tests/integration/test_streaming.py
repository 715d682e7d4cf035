"""Streamed generations through the real app: the OpenAI Python and Node SDKs, the exact SSE
framing, schema-valid events, and a client that leaves the stream freeing the model."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.integration.conftest import API_KEY
from tests.openai_schema import validate

NODE_DIR = Path(__file__).resolve().parents[1] / "node"
SCHEMAS = {"image_generation.partial_image": "ImageGenPartialImageEvent",
           "image_generation.completed": "ImageGenCompletedEvent"}


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux"])
def test_python_sdk_streams_partials_then_the_image_of_the_unstreamed_request(client, model):
    extra = {"seed": 77, "num_inference_steps": 8}
    stream = client.images.generate(model=model, prompt="a red fox", stream=True, partial_images=2,
                                    output_format="webp", size="256x384", extra_body=extra)
    events = [event.model_dump(exclude_none=True) for event in stream]
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e["partial_image_index"] for e in events[:2]] == [0, 1]
    for event in events:
        validate(event, SCHEMAS[event["type"]])
        image = decode(event["b64_json"])
        assert (image.format, image.size) == ("WEBP", (256, 384))
        assert event["size"] == "auto" and event["quality"] == "medium" and event["output_format"] == "webp"
    assert events[-1]["usage"]["output_tokens"] == (256 // 16) * (384 // 16)
    assert events[-1]["usage"]["input_tokens"] > 0
    plain = client.images.generate(model=model, prompt="a red fox", response_format="b64_json", output_format="webp",
                                   size="256x384", extra_body=extra)
    assert base64.b64decode(plain.data[0].b64_json) == base64.b64decode(events[-1]["b64_json"])
    assert decode(events[0]["b64_json"]).tobytes() != decode(events[-1]["b64_json"]).tobytes()


def test_no_partial_images_means_only_the_completed_event(client):
    stream = client.images.generate(model="tiny-flux", prompt="a fox", stream=True, partial_images=0,
                                    extra_body={"num_inference_steps": 3})
    assert [event.type for event in stream] == ["image_generation.completed"]


def test_raw_http_framing_and_errors_before_the_stream(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Accept": "application/json"}  # as the SDKs send it
    body = {"model": "tiny-flux", "prompt": "a fox", "stream": True, "partial_images": 1, "num_inference_steps": 4,
            "seed": 5}
    with httpx.stream("POST", f"{server.base_url}/v1/images/generations", json=body, headers=headers,
                      timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-artserve-seed"] == "5"  # the events themselves carry no seed
        text = response.read().decode()
    messages = [m for m in text.split("\n\n") if m and not m.startswith(":")]
    assert len(messages) == 2
    for message in messages:
        event_line, data_line = message.split("\n")
        event = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {event['type']}"
    # Validation problems are ordinary JSON errors, before any event.
    bad = httpx.post(f"{server.base_url}/v1/images/generations", headers=headers, timeout=30,
                     json={**body, "partial_images": 4})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "partial_images"
    several = httpx.post(f"{server.base_url}/v1/images/generations", headers=headers, timeout=30, json={**body, "n": 2})
    assert several.status_code == 400 and several.json()["error"]["param"] == "n"


def test_leaving_the_stream_after_the_first_partial_frees_the_model(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    quick = {"model": "tiny-sd", "prompt": "a fox", "response_format": "b64_json"}

    def timed() -> float:
        started = time.monotonic()
        assert httpx.post(f"{server.base_url}/v1/images/generations", json=quick, headers=headers,
                          timeout=120).status_code == 200
        return time.monotonic() - started

    idle_s = min(timed() for _ in range(2))
    long = {"model": "tiny-sd", "prompt": "gone", "stream": True, "partial_images": 3, "num_inference_steps": 400}
    for _ in range(3):
        with httpx.stream("POST", f"{server.base_url}/v1/images/generations", json=long, headers=headers,
                          timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("event: image_generation.partial_image"):
                    break  # leave after the first preview: 300 steps would remain
    after_s = timed()
    print(f"idle {idle_s:.2f}s, after 3 abandoned 400-step streams {after_s:.2f}s")
    assert after_s < 3 * idle_s + 1.0


def test_node_sdk_streams(server):
    node = shutil.which("node")
    assert node and (NODE_DIR / "node_modules" / "openai").exists(), "run scripts/dev setup (npm install)"
    env = {**os.environ, "ARTAPI_KEY": API_KEY, "ARTSERVE_BASE_URL": f"{server.base_url}/v1",
           "ARTSERVE_MODEL": "tiny-flux"}
    out = subprocess.run([node, str(NODE_DIR / "stream.mjs")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    for event in events:
        validate(event, SCHEMAS[event["type"]])
        assert decode(event["b64_json"]).format == "PNG"
