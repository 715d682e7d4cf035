"""Responses and stream events as OpenAI publishes them: echo fields inside the schema's
enums, `usage`, SSE framing, keep-alives and a mid-stream error."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from serve_app.api.responses import KEEPALIVE, images_response, relay, sse, stream_event
from serve_app.errors import ServiceUnavailableError
from serve_app.job import GenerationJob, GenerationResult, ImageResult, PartialImage
from tests.openai_schema import validate


def job(width=256, height=256, n=1, response_format="b64_json") -> GenerationJob:
    return GenerationJob(request_id="r", prompt="a fox", negative_prompt=None, width=width, height=height,
                         num_inference_steps=4, guidance_scale=3.5, seeds=tuple(range(n)), output_format="png",
                         output_compression=100, response_format=response_format, base_url="http://x/")


def result(n=1, tokens=9) -> GenerationResult:
    return GenerationResult([ImageResult(seed=i, batch_size=1, b64_json="aGk=") for i in range(n)], tokens)


@pytest.mark.parametrize("quality,echo", [(None, "medium"), ("standard", "medium"), ("hd", "high"), ("low", "low"),
                                          ("auto", "medium"), ("high", "high")])
def test_quality_is_echoed_in_openai_vocabulary(quality, echo):
    body = images_response(job(), quality, result())
    validate(body, "ImagesResponse")
    assert body["quality"] == echo


def test_size_is_echoed_only_when_it_is_a_schema_value():
    assert "size" not in images_response(job(256, 256), None, result())
    body = images_response(job(1024, 1536), None, result())
    validate(body, "ImagesResponse")
    assert body["size"] == "1024x1536"


def test_usage_counts_prompt_tokens_and_latent_tokens():
    body = images_response(job(1024, 1024, n=2), None, result(n=2, tokens=12))
    assert body["usage"] == {"input_tokens": 12, "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
                             "output_tokens": 2 * 4096, "total_tokens": 12 + 8192}


def test_stream_events_validate_and_are_framed_like_openai():
    partial = stream_event(job(), "hd", PartialImage(1, "aGk="))
    completed = stream_event(job(), "hd", result())
    validate(partial, "ImageGenPartialImageEvent")
    validate(completed, "ImageGenCompletedEvent")
    assert partial["size"] == "auto" and partial["partial_image_index"] == 1
    edit = stream_event(replace(job(), event_prefix="image_edit", image_tokens=256), None, result())
    validate(edit, "ImageEditCompletedEvent")
    assert edit["type"] == "image_edit.completed" and edit["usage"]["input_tokens_details"]["image_tokens"] == 256
    assert edit["usage"]["input_tokens"] == 9 + 256
    framed = sse(partial).decode()
    assert framed.startswith("event: image_generation.partial_image\ndata: {") and framed.endswith("}\n\n")
    assert json.loads(framed.split("data: ", 1)[1]) == partial
    assert "\n" not in framed.split("data: ", 1)[1].rstrip("\n")


def collect(parts, keepalive_s=15.0) -> list[bytes]:
    async def run():
        return [chunk async for chunk in relay(parts, job(), None, lambda exc: ServiceUnavailableError("down"),
                                               keepalive_s=keepalive_s)]

    return asyncio.run(run())


def test_relay_sends_keepalives_while_waiting_then_the_events():
    async def parts():
        await asyncio.sleep(0.25)
        yield PartialImage(0, "aGk=")
        yield result()

    chunks = collect(parts(), keepalive_s=0.1)
    assert chunks[0] == KEEPALIVE and chunks.count(KEEPALIVE) >= 1
    events = [c for c in chunks if c != KEEPALIVE]
    assert [e.split(b"\n")[0] for e in events] == [b"event: image_generation.partial_image",
                                                   b"event: image_generation.completed"]


def test_a_failure_after_the_start_is_an_error_event_then_the_end():
    async def parts():
        yield PartialImage(0, "aGk=")
        raise RuntimeError("replica lost")

    chunks = collect(parts())
    assert chunks[-1].startswith(b"event: error\ndata: ")
    error = json.loads(chunks[-1].split(b"data: ", 1)[1])
    assert error == {"type": "error", "error": {"message": "down", "type": "service_unavailable_error",
                                                "param": None, "code": "service_unavailable"}}
