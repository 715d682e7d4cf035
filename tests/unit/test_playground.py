"""The playground page: served at `/` without credentials, no external resources, and told
where the API lives when the application has a route prefix."""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve_app.api.playground import mount_playground


def _client(root_path: str = "") -> TestClient:
    api = FastAPI()
    mount_playground(api)
    return TestClient(api, root_path=root_path)


def test_page_loads_without_a_key_and_points_at_the_api():
    r = _client().get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert '<meta name="artserve-base" content="/">' in r.text
    for needed in ('id="model"', 'id="prompt"', 'id="size"', 'id="quality"', 'id="style"', 'id="n"',
                   'id="seed"', 'id="api-key"', "v1/images/generations", "v1/models", "sessionStorage",
                   'id="tab-edit"', 'id="edit-image"', 'id="mask-canvas"', 'id="strength"', "v1/images/edits",
                   "v1/images/variations"):
        assert needed in r.text, needed


def test_page_under_a_route_prefix_calls_that_prefix():
    r = _client("/gcs").get("/")
    assert '<meta name="artserve-base" content="/gcs/">' in r.text


def test_page_loads_nothing_from_elsewhere():
    """No CDN: every src/href is relative or a data:/same-page reference."""
    text = _client().get("/").text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "localStorage" not in text  # the key stays in the tab's sessionStorage only
