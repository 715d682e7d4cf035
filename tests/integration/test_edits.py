"""`POST /v1/images/edits` and `/v1/images/variations` against the real `serve run`
(conftest's `server`), through the official Python and Node SDKs and raw HTTP: what each
route accepts, sizes and formats of what comes back, reproducibility, OpenAI's schemas as
published, and every refusal as a 400/413 naming its field with nothing stored; the last
test, inpainting's semantics through the whole service (the runners' parity with diffusers
is tests/unit/test_edit_runners.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.integration.conftest import API_KEY
from tests.openai_schema import validate

pytestmark = pytest.mark.integration
NODE_DIR = Path(__file__).resolve().parents[1] / "node"
FAST = {"num_inference_steps": 2}
SCHEMAS = {"image_edit.partial_image": "ImageEditPartialImageEvent", "image_edit.completed": "ImageEditCompletedEvent"}


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def photo(width: int = 256, height: int = 256, fmt: str = "PNG") -> bytes:
    """A smooth gradient with a square: an input whose regions can be told apart."""
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    array = np.stack([x, y, np.full_like(x, 128)], axis=-1)
    array[height // 4: height // 2, width // 4: width // 2] = (250, 240, 20)
    return encode(Image.fromarray(array, "RGB"), fmt)


def left_half_mask(width: int = 256, height: int = 256) -> bytes:
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))  # alpha 0: repaint the left half
    return encode(mask)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def stored(server) -> set[Path]:
    return set(server.storage.rglob("*")) if server.storage.exists() else set()


def post(server, path: str = "/v1/images/edits", headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", headers={"Authorization": f"Bearer {API_KEY}", **(headers or {})},
                      timeout=120, **kwargs)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux", "tiny-sdxl"])
def test_sdk_edit_b64_png(client, model):
    response = client.images.edit(model=model, image=("in.png", photo(), "image/png"), prompt="make it night",
                                  size="256x256", response_format="b64_json", output_format="png",
                                  extra_body={"seed": 11, **FAST})
    body = response.model_dump(exclude_none=True)
    validate(body, "ImagesResponse")
    [data] = response.data
    image = decode(data.b64_json)
    assert (image.format, image.size) == ("PNG", (256, 256))
    assert data.seed == 11 and data.revised_prompt == "make it night"
    assert response.usage.input_tokens_details.image_tokens == 16 * 16
    assert response.usage.output_tokens == 16 * 16


def test_sdk_edit_url_jpeg_and_size_auto_from_raw_bytes(client):
    # Raw bytes (the SDK names the part `upload`, application/octet-stream) of a 320x192 JPEG:
    # size auto = the input rounded to tiny-sd's rule (multiples of 64, sides >= 256).
    response = client.images.edit(model="tiny-sd", image=photo(320, 192, "JPEG"), prompt="x",
                                  output_format="jpeg", extra_body=FAST)
    validate(response.model_dump(exclude_none=True), "ImagesResponse")
    [data] = response.data
    assert data.b64_json is None
    image = Image.open(io.BytesIO(httpx.get(data.url, timeout=30).content))
    assert (image.format, image.size) == ("JPEG", (448, 256))


def test_same_seed_same_bytes(client):
    def edit() -> bytes:
        response = client.images.edit(model="tiny-sd", image=photo(), mask=left_half_mask(), prompt="a cat",
                                      response_format="b64_json", extra_body={"seed": 5, "deterministic": True, **FAST})
        validate(response.model_dump(exclude_none=True), "ImagesResponse")
        return base64.b64decode(response.data[0].b64_json)

    assert edit() == edit()


def test_two_images_on_a_one_image_model_is_400_image(client, server):
    before = stored(server)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="tiny-sd", image=[photo(), photo()], prompt="x", extra_body=FAST)
    assert caught.value.body["param"] == "image"
    assert stored(server) == before


def test_sdk_variations(client):
    response = client.images.create_variation(model="tiny-sd", image=("in.png", photo(), "image/png"), n=2,
                                              size="256x256", response_format="b64_json", extra_body=FAST)
    validate(response.model_dump(exclude_none=True), "ImagesResponse")
    assert len(response.data) == 2
    assert [decode(d.b64_json).size for d in response.data] == [(256, 256)] * 2
    url = client.images.create_variation(model="tiny-flux", image=photo(), extra_body=FAST)
    validate(url.model_dump(exclude_none=True), "ImagesResponse")
    assert Image.open(io.BytesIO(httpx.get(url.data[0].url, timeout=30).content)).format == "WEBP"


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_json_edit_with_data_urls(server):
    response = post(server, json={"model": "tiny-sd", "prompt": "x", "images": [{"image_url": data_url(photo())}],
                                  "mask": {"image_url": data_url(left_half_mask())}, "response_format": "b64_json",
                                  **FAST})
    assert response.status_code == 200, response.text
    validate(response.json(), "ImagesResponse")
    assert decode(response.json()["data"][0]["b64_json"]).size == (256, 256)


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


PHOTO = photo()
BAD_FORMS = {
    "not an image": ([("image", ("a.png", b"hello, not a png", "image/png"))], "image"),
    "truncated": ([("image", ("a.jpg", photo(fmt="JPEG")[:400], "image/jpeg"))], "image"),
    "bomb": ([("image", ("a.png", png_header_only(100_000, 100_000), "image/png"))], "image"),
    "mask of another size": ([("image", ("a", PHOTO)), ("mask", ("m", left_half_mask(128, 128)))], "mask"),
    "mask without alpha": ([("image", ("a", PHOTO)), ("mask", ("m", PHOTO))], "mask"),
    "17 images": ([("image[]", ("a", PHOTO))] * 17, "image"),
    "no image": ([("other", ("a", PHOTO))], "image"),
}


@pytest.mark.parametrize("case", list(BAD_FORMS))
def test_bad_inputs_are_400_and_store_nothing(server, case):
    files, param = BAD_FORMS[case]
    before = stored(server)
    response = post(server, data={"model": "tiny-sd", "prompt": "x", **FAST}, files=files)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert stored(server) == before


def test_60_mb_part_is_refused(server):
    before = stored(server)
    big = b"\x89PNG\r\n\x1a\n" + os.urandom(60 * 1024 * 1024)
    response = post(server, data={"model": "tiny-sd", "prompt": "x"}, files={"image": ("big.png", big)})
    assert response.status_code in (400, 413), response.text
    assert response.json()["error"]["param"] in ("image", None)
    assert stored(server) == before


@pytest.mark.parametrize(("body", "param"), [
    ({"images": [{"file_id": "file-123"}]}, "images[0].file_id"),
    ({"images": [{"image_url": "http://169.254.169.254/latest/meta-data"}]}, "images[0].image_url"),
    ({"images": [{"image_url": "https://example.com/a.png"}]}, "images[0].image_url"),
    ({"images": [{"image_url": data_url(PHOTO)}], "n": "two"}, "n"),
    ({"images": [{"image_url": data_url(PHOTO)}], "model": {}}, "model"),
])
def test_json_refusals(server, body, param):
    before = stored(server)
    response = post(server, json={"model": "tiny-sd", "prompt": "x", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert stored(server) == before


def test_streamed_edit_is_image_edit_events(server):
    fields = {"model": "tiny-sd", "prompt": "x", "stream": "true", "partial_images": "2", "output_format": "png",
              "num_inference_steps": "4", "strength": "1"}
    with httpx.stream("POST", f"{server.base_url}/v1/images/edits", data=fields, files={"image": ("a", PHOTO)},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    events = []
    for message in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in message.splitlines() if not line.startswith(":"))
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(event)
    assert [e["type"] for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    for event in events:
        validate(event, SCHEMAS[event["type"]])
        assert decode(event["b64_json"]).size == (256, 256)
    assert events[-1]["usage"]["input_tokens_details"]["image_tokens"] == 256


def test_idempotency_key_on_edits(server):
    key = {"Idempotency-Key": f"edit-{os.urandom(6).hex()}"}
    fields = {"model": "tiny-sd", "prompt": "x", "response_format": "b64_json", **FAST}
    first = post(server, data=fields, files={"image": ("a.png", PHOTO)}, headers=key)
    again = post(server, data=fields, files={"image": ("renamed.png", PHOTO)}, headers=key)  # same bytes
    assert first.status_code == again.status_code == 200, again.text
    assert again.headers["x-artserve-idempotent-replay"] == "true"
    assert again.json() == first.json()
    other = post(server, data=fields, files={"image": ("a.png", photo(320, 256))}, headers=key)
    assert other.status_code == 409, other.text


def test_node_sdk_edits(server):
    node = shutil.which("node")
    assert node and (NODE_DIR / "node_modules" / "openai").exists(), "run scripts/dev setup (npm install)"
    env = {**os.environ, "ARTAPI_KEY": API_KEY, "ARTSERVE_BASE_URL": f"{server.base_url}/v1",
           "ARTSERVE_MODEL": "tiny-sd", "ARTSERVE_IMAGE_B64": base64.b64encode(PHOTO).decode()}
    out = subprocess.run([node, str(NODE_DIR / "edit.mjs")], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    one, two = (json.loads(line) for line in out.stdout.splitlines())
    validate(one, "ImagesResponse")
    assert decode(one["data"][0]["b64_json"]).size == (256, 256)
    assert two == {"status": 400, "param": "image"}


def test_inpainting_keeps_the_unmasked_half_and_repaints_the_masked_half(client):
    """Semantics (engine side): with a mask, what the output shows in the kept (opaque) half
    comes from the input, not the seed; the repainted (transparent) half comes from the seed.
    Measured as change between two seeds, away from the boundary (the tiny models' random VAE
    does not reproduce the input's pixels, so "close to the input" is not the test here)."""
    def inpaint(seed: int) -> np.ndarray:
        response = client.images.edit(model="tiny-sd", image=photo(), mask=left_half_mask(), prompt="x",
                                      response_format="b64_json", output_format="png",
                                      extra_body={"seed": seed, "num_inference_steps": 4, "deterministic": True})
        return np.asarray(decode(response.data[0].b64_json).convert("RGB"), dtype=np.float32)

    change = np.abs(inpaint(3) - inpaint(4))
    kept, repainted = change[:, 192:].mean(), change[:, :64].mean()
    assert repainted > 1, repainted
    assert kept < 0.25 * repainted, (kept, repainted)
