"""Graceful stop of a `python -m serve_app run` (SIGTERM or Ctrl-C): requests in flight finish,
new ones get 503 + `Retry-After`, then Serve shuts down.

Serve's own `serve shutdown` kills its HTTP proxies at once, so the drain happens before it,
through a directory the launcher and every ingress replica on the host share (the launcher
passes it in `ARTSERVE_DRAIN_DIR`):

- the launcher creates `<dir>/draining`;
- each ingress replica sees it within `CHECK_EVERY_S`, answers every new POST with 503, and
  writes its count of requests in flight (streams until their last byte) to
  `<dir>/ingress-<pid>` every `CHECK_EVERY_S`;
- the launcher waits until every replica that reported says 0 (after `SETTLE_S`, so each
  has seen the flag; or until its grace period ends), then stops `serve run`.

GET requests (model list, image links) keep being served until the proxies stop."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.api.limits import send_error
from serve_app.errors import ServiceUnavailableError

CHECK_EVERY_S = 0.2
FLAG = "draining"
RETRY_AFTER_S = 5
SETTLE_S = 5 * CHECK_EVERY_S


class DrainState:
    """One ingress replica's side: is the host draining, and how many requests are in flight."""

    def __init__(self, directory: str | None):
        self.directory = Path(directory) if directory else None
        self.in_flight = 0
        self._draining = False
        self._checked_at = 0.0
        self.reporter: asyncio.Future | None = None

    def draining(self) -> bool:
        if self.directory is None or self._draining:
            return self._draining
        now = time.monotonic()
        if now - self._checked_at >= CHECK_EVERY_S:
            self._checked_at = now
            self._draining = (self.directory / FLAG).exists()
        return self._draining

    async def report_forever(self) -> None:
        """Once draining: this replica's in-flight count, for the launcher (written atomically)."""
        if self.directory is None:
            return
        report = self.directory / f"ingress-{os.getpid()}"
        while True:
            if self.draining():
                partial = self.directory / f".{report.name}.part"  # not matched by the launcher's glob
                partial.write_text(str(self.in_flight))
                partial.replace(report)
            await asyncio.sleep(CHECK_EVERY_S)


class DrainMiddleware:
    """Counts requests in flight; while draining, refuses new POSTs with 503."""

    def __init__(self, app: ASGIApp, state: DrainState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "POST" and self.state.draining():
            await send_error(send, ServiceUnavailableError(
                "The server is shutting down; retry shortly.", headers={"Retry-After": str(RETRY_AFTER_S)}))
            return
        if self.state.reporter is None:  # a replica with requests reports; one without has none
            self.state.reporter = asyncio.ensure_future(self.state.report_forever())
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


def clear(directory: Path) -> None:
    for stale in [directory / FLAG, *directory.glob("ingress-*"), *directory.glob(".ingress-*.part")]:
        stale.unlink(missing_ok=True)


def in_flight(directory: Path) -> int:
    """The launcher's side: requests in flight over every ingress replica that has reported."""
    total = 0
    for report in directory.glob("ingress-*"):
        try:
            total += int(report.read_text() or 0)
        except (OSError, ValueError):
            total += 1  # being replaced: ask again
    return total
