"""`Idempotency-Key` (SPEC "Retry safety"): a request repeated with the same key and API key
gets the first response again, without new GPU work.

The entries live in `IdempotencyStore`, one small Serve deployment (one replica, no CPU)
next to the models, not in an ingress: every ingress replica sees the same entries, and an
ingress replica that restarts finds them again. Entries are bounded: each expires after
`idempotency_ttl_s` (24 h), and the kept responses together stay under
`idempotency_max_bytes` (oldest dropped first; a single response larger than the bound, a
big `b64_json` one, is handed to the requests waiting for it and then not kept).

What a key means: sha256(API key, Idempotency-Key) — the API key itself is never stored.
The body is kept only as a sha256 fingerprint, to tell a true repeat from a reused key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from serve_app.errors import IdempotencyConflictError, InvalidRequestError, ServiceUnavailableError

logger = logging.getLogger("ray.serve")
HEADER = "idempotency-key"
MAX_KEY_CHARS = 255

# What `claim` answers.
RUN = "run"  # you are the first (or the first's ingress died): generate, then complete/release
DONE = "done"  # here is the first response
CONFLICT = "conflict"  # the key was used with another body
BUSY = "busy"  # the first is still running after the wait bound


def scoped_key(authorization: str | None, idempotency_key: str) -> str:
    """The store's key: per API key, without keeping the API key."""
    material = f"artserve-idempotency\n{authorization or ''}\n{idempotency_key}"
    return hashlib.sha256(material.encode()).hexdigest()


def check_key(value: str) -> str:
    if not value or len(value) > MAX_KEY_CHARS or not value.isascii() or not value.isprintable():
        raise InvalidRequestError(
            f"The Idempotency-Key header must be 1-{MAX_KEY_CHARS} printable ASCII characters.",
            code="invalid_idempotency_key",
        )
    return value


def fingerprint(body: Any) -> str:
    """Same JSON value → same fingerprint, whatever the key order or spacing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


Response = tuple[dict[str, Any], dict[str, str]]  # JSON body, headers


async def run_once(store: Any, key: str, body_fingerprint: str, wait_s: float,
                   run: Callable[[], Awaitable[Response]]) -> Response:
    """SPEC "Retry safety", ingress side: the first request with this key runs `run`; repeats
    get its response (waiting while it runs); another body under the key is a 409. `store`
    is the `IdempotencyStore` deployment's handle."""
    try:
        state, stored = await store.claim.remote(key, body_fingerprint, wait_s)
    except Exception as exc:
        logger.warning("idempotency store unreachable: %r", exc)
        raise ServiceUnavailableError("Idempotency-Key handling is unavailable; try again.") from None
    if state == DONE:
        return stored["content"], {**stored["headers"], "x-artserve-idempotent-replay": "true"}
    if state == CONFLICT:
        raise IdempotencyConflictError("This Idempotency-Key was already used with a different request body.")
    if state == BUSY:
        raise ServiceUnavailableError("The first request with this Idempotency-Key is still running; retry.")
    try:
        content, headers = await run()
    except BaseException:
        with contextlib.suppress(Exception):  # a failure is not kept: a retry runs again
            await store.release.remote(key)
        raise
    try:
        await store.complete.remote(key, {"content": content, "headers": headers})
    except Exception as exc:  # the images exist: answer, even if a repeat may pay again
        logger.warning("idempotency store unreachable, response not kept: %r", exc)
    return content, headers


@dataclass
class Entry:
    fingerprint: str
    created_s: float
    lease_until_s: float  # a running first request; past this, its ingress is presumed dead
    done: asyncio.Event = field(default_factory=asyncio.Event)
    response: dict[str, Any] | None = None
    size: int = 0


@serve.deployment(
    num_replicas=1,
    ray_actor_options={"num_cpus": 0},
    # Each waiting repeat holds a call open here; they cost nothing but a coroutine.
    max_ongoing_requests=100_000,
)
class IdempotencyStore:
    def __init__(self, ttl_s: float, max_bytes: int, lease_s: float):
        self.ttl_s, self.max_bytes, self.lease_s = ttl_s, max_bytes, lease_s
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # oldest first
        self._bytes = 0

    async def claim(self, key: str, body_fingerprint: str, wait_s: float) -> tuple[str, dict[str, Any] | None]:
        deadline = time.monotonic() + wait_s
        while True:
            now = time.monotonic()
            self._expire(now)
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = Entry(body_fingerprint, now, now + self.lease_s)
                return RUN, None
            if entry.fingerprint != body_fingerprint:
                return CONFLICT, None
            if entry.response is not None:
                return DONE, entry.response
            if entry.lease_until_s <= now:  # the first request's ingress is gone: take over
                entry.lease_until_s = now + self.lease_s
                return RUN, None
            timeout = min(deadline, entry.lease_until_s) - now
            if timeout <= 0:
                return BUSY, None
            try:
                await asyncio.wait_for(entry.done.wait(), timeout)
            except TimeoutError:
                continue
            if entry.response is not None:  # also when too large to keep
                return DONE, entry.response

    async def complete(self, key: str, response: dict[str, Any]) -> bool:
        """Keep the first response; True if it was kept (it fits the memory bound)."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.response = response
        entry.size = len(json.dumps(response))
        entry.done.set()
        if entry.size > self.max_bytes:
            logger.warning("idempotency: a %d-byte response exceeds the %d-byte bound; not kept",
                           entry.size, self.max_bytes)
            del self._entries[key]
            return False
        self._bytes += entry.size
        self._evict()
        return key in self._entries

    async def release(self, key: str) -> None:
        """The first request failed: forget the key, so a waiting repeat runs it again."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size
            entry.done.set()

    async def stats(self) -> dict[str, int]:
        self._expire(time.monotonic())
        return {"entries": len(self._entries), "bytes": self._bytes}

    def _expire(self, now: float) -> None:
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.response is None and entry.lease_until_s > now:
                return  # the oldest is still running
            if entry.response is not None and entry.created_s + self.ttl_s > now:
                return
            del self._entries[key]
            self._bytes -= entry.size
            entry.done.set()

    def _evict(self) -> None:
        for key in list(self._entries):
            if self._bytes <= self.max_bytes:
                return
            entry = self._entries[key]
            if entry.response is not None:
                del self._entries[key]
                self._bytes -= entry.size
