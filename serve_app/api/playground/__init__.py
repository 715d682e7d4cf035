"""The playground: one static page at `/` to try prompts in a browser.

No build step and no CDN: `index.html` carries its own CSS and JavaScript and talks only to
the public API (`GET v1/models`, `POST v1/images/generations`, `/edits` from its Edit tab with a
mask painted on a canvas, `/variations` from any shown image), so it needs no credentials to
load; the API calls carry the key the person types in (kept in `sessionStorage`)."""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("index.html")
BASE_MARKER = "__ARTSERVE_BASE__"


@cache
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


def render(root_path: str) -> str:
    """The page, told where the API lives: an application served under a route prefix
    (`/gcs`) sees its prefix in the ASGI `root_path`."""
    base = root_path.rstrip("/") + "/"
    return _page().replace(BASE_MARKER, html.escape(base, quote=True))


def mount_playground(api: FastAPI) -> None:
    @api.get("/", include_in_schema=False)
    async def playground(request: Request) -> HTMLResponse:
        # A page that never changes between deploys of the same code; the API calls are what
        # must stay fresh, so let browsers revalidate rather than cache blindly.
        return HTMLResponse(render(request.scope.get("root_path", "")), headers={"Cache-Control": "no-cache"})
