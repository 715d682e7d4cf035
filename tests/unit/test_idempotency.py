"""The Idempotency-Key store's rules, on the deployment's class in process (no Ray): first
claim runs, repeats wait and get the first response, another body is a conflict, failures
are forgotten, entries expire and stay within the memory bound."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from serve_app.api.idempotency import (
    BUSY,
    CONFLICT,
    DONE,
    RUN,
    IdempotencyStore,
    check_key,
    fingerprint,
    run_once,
    scoped_key,
)
from serve_app.errors import GenerationError, IdempotencyConflictError, InvalidRequestError, ServiceUnavailableError

Store = IdempotencyStore.func_or_class
RESPONSE = {"content": {"created": 1, "data": [{"url": "http://x/1", "seed": 1}]}, "headers": {}}


def run(coro):
    return asyncio.run(coro)


def test_first_runs_repeat_gets_the_first_response():
    async def go():
        store = Store(ttl_s=60, max_bytes=10_000, lease_s=30)
        assert await store.claim("k", "f", 1) == (RUN, None)
        assert await store.complete("k", RESPONSE)
        assert await store.claim("k", "f", 1) == (DONE, RESPONSE)
        assert await store.claim("k", "other-body", 1) == (CONFLICT, None)

    run(go())


def test_concurrent_repeats_wait_for_the_first():
    async def go():
        store = Store(ttl_s=60, max_bytes=10_000, lease_s=30)
        assert (await store.claim("k", "f", 5))[0] == RUN
        waiters = [asyncio.create_task(store.claim("k", "f", 5)) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)
        await store.complete("k", RESPONSE)
        assert await asyncio.gather(*waiters) == [(DONE, RESPONSE)] * 5

    run(go())


def test_a_failed_first_is_forgotten_and_one_waiter_runs_again():
    async def go():
        store = Store(ttl_s=60, max_bytes=10_000, lease_s=30)
        await store.claim("k", "f", 5)
        waiters = [asyncio.create_task(store.claim("k", "f", 5)) for _ in range(3)]
        await asyncio.sleep(0.05)
        await store.release("k")
        await asyncio.sleep(0.05)
        done = [w for w in waiters if w.done()]
        assert [w.result()[0] for w in done] == [RUN]  # one takes over, the others wait on it
        await store.complete("k", RESPONSE)
        assert sorted(r[0] for r in await asyncio.gather(*waiters)) == [DONE, DONE, RUN]

    run(go())


def test_wait_bound_and_dead_first_lease():
    async def go():
        store = Store(ttl_s=60, max_bytes=10_000, lease_s=0.2)
        await store.claim("k", "f", 1)
        assert await store.claim("k", "f", 0.05) == (BUSY, None)
        # The first's ingress died (no complete, no release): after its lease, a repeat runs.
        assert (await store.claim("k", "f", 2))[0] == RUN

    run(go())


def test_entries_expire_and_stay_within_the_memory_bound():
    async def go():
        store = Store(ttl_s=0.1, max_bytes=10_000, lease_s=30)
        await store.claim("k", "f", 1)
        await store.complete("k", RESPONSE)
        await asyncio.sleep(0.15)
        assert (await store.claim("k", "f", 1))[0] == RUN  # expired: a new generation

        store = Store(ttl_s=60, max_bytes=300, lease_s=30)
        big = {"content": {"b64_json": "A" * 200}, "headers": {}}
        for key in "abc":
            await store.claim(key, "f", 1)
            await store.complete(key, big)
        stats = await store.stats()
        assert stats["bytes"] <= 300 and stats["entries"] == 1  # the oldest went first
        assert (await store.claim("c", "f", 1))[0] == DONE and (await store.claim("a", "f", 1))[0] == RUN
        # Larger than the whole bound: handed to waiters, never kept.
        huge = {"content": {"b64_json": "A" * 1000}, "headers": {}}
        await store.claim("h", "f", 1)
        waiter = asyncio.create_task(store.claim("h", "f", 1))
        await asyncio.sleep(0.01)
        assert not await store.complete("h", huge)
        assert await waiter == (DONE, huge)

    run(go())


def test_keys_are_scoped_per_api_key_and_hide_it():
    a, b = scoped_key("Bearer sk-one", "key-1"), scoped_key("Bearer sk-two", "key-1")
    assert a != b and "sk-one" not in a and len(a) == 64
    assert scoped_key("Bearer sk-one", "key-1") == a
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})
    assert check_key("0f5e-ab") == "0f5e-ab"
    for bad in ["", "x" * 256, "caf\u00e9", "a\nb"]:
        with pytest.raises(InvalidRequestError):
            check_key(bad)


class Handle:
    """The deployment handle's shape (`handle.method.remote(...)` → awaitable) over the store."""

    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        return SimpleNamespace(remote=getattr(self.store, name))


def test_run_once_runs_once_replays_and_forgets_failures():
    calls = []

    async def generate():
        calls.append(1)
        await asyncio.sleep(0.05)
        return {"data": [len(calls)]}, {"x-artserve-batch-size": "1"}

    async def fail():
        raise GenerationError("boom")

    async def go():
        handle = Handle(Store(ttl_s=60, max_bytes=10_000, lease_s=30))
        results = await asyncio.gather(*(run_once(handle, "k", "f", 5, generate) for _ in range(4)))
        assert len(calls) == 1 and all(content == {"data": [1]} for content, _ in results)
        assert sum(h.get("x-artserve-idempotent-replay") == "true" for _, h in results) == 3
        with pytest.raises(IdempotencyConflictError):
            await run_once(handle, "k", "other", 5, generate)
        with pytest.raises(GenerationError):
            await run_once(handle, "j", "f", 5, fail)
        assert (await run_once(handle, "j", "f", 5, generate))[0] == {"data": [2]}  # the failure was forgotten

    run(go())


def test_run_once_without_a_reachable_store_is_503():
    class Down:
        def __getattr__(self, name):
            raise RuntimeError("actor died")

    async def go():
        with pytest.raises(ServiceUnavailableError):
            await run_once(Down(), "k", "f", 1, lambda: None)

    run(go())
