"""The reference docs' curl and Node.js examples, run as written (base URL and model id
changed), against the real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
from PIL import Image

from tests.integration.conftest import API_KEY
from tests.openai_schema import validate

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


def _check(response: dict) -> None:
    validate(response, "ImagesResponse")
    (item,) = response["data"]
    image = httpx.get(item["url"], timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/webp"
    from io import BytesIO

    assert Image.open(BytesIO(image.content)).size == (1024, 1024)


def test_curl_example(server):
    curl = shutil.which("curl")
    assert curl, "curl is needed for this test"
    body = {"model": "tiny-flux", "prompt": "A minimalist logo for a tech startup, flat design, blue tones",
            "n": 1, "size": "1024x1024", "quality": "hd", "num_inference_steps": 2}
    out = subprocess.run(
        [curl, "-sS", f"{server.base_url}/v1/images/generations", "-H", f"Authorization: Bearer {API_KEY}",
         "-H", "Content-Type: application/json", "-d", json.dumps(body)],
        capture_output=True, text=True, check=True, timeout=120,
    )
    _check(json.loads(out.stdout))


def test_node_sdk_example(server):
    node = shutil.which("node")
    assert node and (NODE_DIR / "node_modules" / "openai").exists(), "run scripts/dev setup (npm install)"
    out = subprocess.run(
        [node, str(NODE_DIR / "example.mjs")],
        env={**os.environ, "ARTAPI_KEY": API_KEY, "ARTSERVE_BASE_URL": f"{server.base_url}/v1",
             "ARTSERVE_MODEL": "tiny-flux"},
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    _check(json.loads(out.stdout))
