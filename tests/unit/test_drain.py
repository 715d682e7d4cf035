"""The graceful stop's two sides (serve_app/api/drain.py): the ingress middleware over a real
Starlette app, and the launcher reading the replicas' in-flight reports."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from serve_app.api import drain


def _app(state: drain.DrainState, release: asyncio.Event | None = None) -> httpx.AsyncClient:
    async def slow(_request):
        if release is not None:
            await release.wait()
        return PlainTextResponse("made")

    async def models(_request):
        return PlainTextResponse("list")

    app = Starlette(routes=[Route("/gen", slow, methods=["POST"]), Route("/models", models)])
    app.add_middleware(drain.DrainMiddleware, state=state)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def _until(condition, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_no_directory_never_drains():
    async def go():
        async with _app(drain.DrainState(None)) as client:
            assert (await client.post("/gen")).status_code == 200
    asyncio.run(go())


def test_in_flight_finishes_new_posts_get_503_and_gets_still_work(tmp_path):
    async def go():
        state, release = drain.DrainState(str(tmp_path)), asyncio.Event()
        async with _app(state, release) as client:
            running = asyncio.ensure_future(client.post("/gen"))
            await _until(lambda: state.in_flight == 1)
            (tmp_path / drain.FLAG).touch()
            await asyncio.sleep(drain.CHECK_EVERY_S * 1.5)
            refused = await client.post("/gen")
            assert refused.status_code == 503
            assert refused.json()["error"]["type"] == "service_unavailable_error"
            assert refused.headers["retry-after"] == str(drain.RETRY_AFTER_S)
            assert refused.headers["x-should-retry"] == "true"
            assert (await client.get("/models")).text == "list"
            # The replica reports 1 in flight while the first request runs, then 0.
            await _until(lambda: drain.in_flight(tmp_path) == 1)
            release.set()
            assert (await running).text == "made"
            await _until(lambda: drain.in_flight(tmp_path) == 0)
            assert state.in_flight == 0
            state.reporter.cancel()
    asyncio.run(go())


def test_in_flight_sums_replicas_and_clear_removes_stale_state(tmp_path):
    (tmp_path / "ingress-1").write_text("2")
    (tmp_path / "ingress-2").write_text("3")
    (tmp_path / "ingress-3").write_text("")
    assert drain.in_flight(tmp_path) == 5
    (tmp_path / drain.FLAG).touch()
    drain.clear(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert drain.in_flight(tmp_path) == 0


@pytest.mark.parametrize("garbage", ["x", "1.5"])
def test_an_unreadable_report_counts_as_busy(tmp_path, garbage):
    (tmp_path / "ingress-9").write_text(garbage)
    assert drain.in_flight(tmp_path) == 1
