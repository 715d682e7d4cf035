"""FLUX.2 (`tiny-flux2`) through the real Serve app with the official Python and Node SDKs:
generations, multi-reference edits (a list of files is sent as repeated `image[]`), the second
reference really steering the image, the card's limits (one image too many → 400 `image`; a
mask → 400 `mask`), streamed edits, and every response valid against OpenAI's schemas as
published. The runner's parity with diffusers is tests/unit/test_flux2_runner.py."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.integration.conftest import API_KEY
from tests.openai_schema import validate

pytestmark = pytest.mark.integration
MODEL = "tiny-flux2"
NODE_DIR = Path(__file__).resolve().parents[1] / "node"
FAST = {"num_inference_steps": 2, "seed": 11, "output_format": "png"}


def png(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


FIRST, SECOND, OTHER_SECOND = png(256, 256, 1), png(128, 160, 2), png(128, 160, 3)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def edit(client, images: list[bytes], **extra):
    return client.images.edit(model=MODEL, image=[(f"ref{i}.png", data, "image/png") for i, data in enumerate(images)],
                              prompt="the fox from the first image in the room of the second",
                              response_format="b64_json", extra_body={**FAST, **extra})


def test_generations(client):
    response = client.images.generate(model=MODEL, prompt="a red fox", n=2, size="512x256",
                                      response_format="b64_json", extra_body=FAST)
    validate(response.model_dump(exclude_none=True), "ImagesResponse")
    first, second = (decoded(d.b64_json) for d in response.data)
    assert first.size == second.size == (512, 256) and first.tobytes() != second.tobytes()  # seeds 11, 12
    assert [d.seed for d in response.data] == [11, 12]
    assert response.usage.output_tokens == 2 * (512 // 16) * (256 // 16)


def test_an_edit_with_two_references_and_the_second_one_matters(client):
    response = edit(client, [FIRST, SECOND])
    validate(response.model_dump(exclude_none=True), "ImagesResponse")
    image = decoded(response.data[0].b64_json)
    assert image.size == (256, 256)  # size auto: the first image's
    # Each reference at the size the model gets it: its own.
    assert response.usage.input_tokens_details.image_tokens == (256 // 16) ** 2 + (128 // 16) * (160 // 16)
    again = decoded(edit(client, [FIRST, SECOND]).data[0].b64_json)
    assert again.tobytes() == image.tobytes()  # same inputs and seed: same bytes
    changed = decoded(edit(client, [FIRST, OTHER_SECOND]).data[0].b64_json)
    difference = np.abs(np.asarray(changed, dtype=np.int16) - np.asarray(image, dtype=np.int16))
    assert difference.max() > 10, difference.max()  # the second reference steers the image
    alone = decoded(edit(client, [FIRST]).data[0].b64_json)
    assert alone.tobytes() != image.tobytes()


def test_the_cards_limits_hold(client, server):
    card = httpx.get(f"{server.base_url}/v1/models/{MODEL}", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert (card["supports_generation"], card["supports_edits"], card["supports_inpainting"]) == (True, True, False)
    limit = card["max_input_images"]
    assert limit == 4
    with pytest.raises(openai.BadRequestError) as too_many:
        edit(client, ([FIRST, SECOND] * limit)[: limit + 1])
    assert too_many.value.body["param"] == "image"
    mask = io.BytesIO()
    Image.new("RGBA", (256, 256)).save(mask, format="PNG")
    with pytest.raises(openai.BadRequestError) as masked:
        client.images.edit(model=MODEL, image=[FIRST, SECOND], mask=mask.getvalue(), prompt="x", extra_body=FAST)
    assert masked.value.body["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as small:
        edit(client, [FIRST, png(48, 48, 4)])
    assert small.value.body["param"] == "image[1]" and "at least 64" in small.value.body["message"]


def test_a_streamed_edit_validates_event_by_event(client):
    stream = client.images.edit(model=MODEL, image=[FIRST, SECOND], prompt="x", stream=True, partial_images=1,
                                extra_body={**FAST, "num_inference_steps": 3})
    events = [event.model_dump(exclude_none=True) for event in stream]
    assert [e["type"] for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    validate(events[0], "ImageEditPartialImageEvent")
    validate(events[1], "ImageEditCompletedEvent")
    assert decoded(events[1]["b64_json"]).size == (256, 256)


def test_node_sdk_edit_with_two_files(server, tmp_path):
    node = shutil.which("node")
    assert node and (NODE_DIR / "node_modules" / "openai").exists(), "run scripts/dev setup (npm install)"
    paths = [tmp_path / "first.png", tmp_path / "second.png"]
    for path, data in zip(paths, (FIRST, SECOND), strict=True):
        path.write_bytes(data)
    env = {**os.environ, "ARTAPI_KEY": API_KEY, "ARTSERVE_BASE_URL": f"{server.base_url}/v1", "ARTSERVE_MODEL": MODEL,
           "ARTSERVE_MAX_IMAGES": "4", "ARTSERVE_IMAGE_PATHS": json.dumps([str(p) for p in paths])}
    out = subprocess.run([node, str(NODE_DIR / "edit_references.mjs")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    two, too_many = (json.loads(line) for line in out.stdout.splitlines())
    validate(two, "ImagesResponse")
    assert decoded(two["data"][0]["b64_json"]).size == (256, 256)
    assert two["usage"]["input_tokens_details"]["image_tokens"] == (256 // 16) ** 2 + (128 // 16) * (160 // 16)
    assert too_many == {"status": 400, "param": "image"}
