"""From a model's result to what the client reads: the OpenAI `ImagesResponse`, and the
Server-Sent Events of a streamed generation or edit. Pure (no Ray, no torch).

SSE framing is OpenAI's: `event: <type>\\ndata: <one-line JSON with the same "type">\\n\\n`;
keep-alives are comment lines; a failure after the stream started is an `error` event with
the usual envelope, and the stream closes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from serve_app.api.protocol import (
    ECHO_QUALITY,
    SCHEMA_SIZES,
    AppliedLoraData,
    ImageData,
    ImagesResponse,
    ImageStreamEvent,
    Usage,
)
from serve_app.errors import ArtServeError
from serve_app.job import GenerationJob, GenerationResult, PartialImage

KEEPALIVE = b": ping\n\n"


def echo_size(job: GenerationJob) -> str | None:
    size = f"{job.width}x{job.height}"
    return size if size in SCHEMA_SIZES else None


def usage(job: GenerationJob, result: GenerationResult) -> Usage:
    return Usage.of(result.input_tokens, len(result.images), job.width, job.height, image_tokens=job.image_tokens)


def applied_loras(result: GenerationResult) -> list[AppliedLoraData] | None:
    """Which adapters made the images (an extension field: OpenAI's schemas allow extra properties)."""
    return [AppliedLoraData(name=a.name, scale=a.scale, sha256=a.sha256) for a in result.loras] or None


def images_response(job: GenerationJob, quality: str | None, result: GenerationResult) -> dict[str, Any]:
    """The JSON body of a non-streamed response. `quality` is the request's (None: default)."""
    loras = applied_loras(result)
    return ImagesResponse(
        created=int(time.time()),
        data=[ImageData(url=r.url, b64_json=r.b64_json, revised_prompt=job.prompt, seed=r.seed, loras=loras)
              for r in result.images],
        size=echo_size(job),  # type: ignore[arg-type]
        quality=ECHO_QUALITY[quality or "standard"],
        output_format=job.output_format,  # type: ignore[arg-type]
        usage=usage(job, result),
    ).model_dump(exclude_none=True)


def stream_event(job: GenerationJob, quality: str | None, part: PartialImage | GenerationResult) -> dict[str, Any]:
    prefix = job.event_prefix  # image_generation, or image_edit
    common = {"created_at": int(time.time()), "size": echo_size(job) or "auto",
              "quality": ECHO_QUALITY[quality or "standard"], "output_format": job.output_format}
    if isinstance(part, PartialImage):
        event = ImageStreamEvent(type=f"{prefix}.partial_image", b64_json=part.b64_json,
                                 partial_image_index=part.index, **common)
    else:
        [image] = part.images
        event = ImageStreamEvent(type=f"{prefix}.completed", b64_json=image.b64_json or "",
                                 usage=usage(job, part), loras=applied_loras(part), **common)
    return event.model_dump(exclude_none=True)


def sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def sse_error(error: ArtServeError) -> bytes:
    return sse({"type": "error", **error.body()})


async def relay(parts: AsyncIterator[PartialImage | GenerationResult], job: GenerationJob, quality: str | None,
                to_error: Callable[[BaseException], ArtServeError], *,
                keepalive_s: float = 15.0) -> AsyncIterator[bytes]:
    """SSE bytes for a replica's stream: partial events, the completed event, then the end.
    A comment line every `keepalive_s` of silence keeps proxies from closing the connection."""
    iterator = aiter(parts)
    pending: asyncio.Future | None = None
    try:
        while True:
            pending = pending or asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
            if not done:
                yield KEEPALIVE
                continue
            try:
                part = pending.result()
            except StopAsyncIteration:
                return
            except Exception as exc:
                yield sse_error(to_error(exc))
                return
            pending = None
            yield sse(stream_event(job, quality, part))
    finally:
        if pending is not None:
            pending.cancel()
