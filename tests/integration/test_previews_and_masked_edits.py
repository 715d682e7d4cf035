"""Masked edits keep the unmasked pixels, and cheap previews, through the real `serve run`
(conftest's `server`) and the official OpenAI SDK: the kept region is the input's pixels, the
repainted region is the model's, the band at the border blends the two; `preserve_unmasked:
false` returns the model's raw output; a model whose previews come from a tiny autoencoder
streams schema-valid partial images of the requested size and format."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.conftest import API_KEY
from tests.integration.test_edits import left_half_mask, photo
from tests.openai_schema import validate

pytestmark = pytest.mark.integration
FEATHER_PX = 8  # models/tiny-*.yaml: edits.mask_feather_px (the default)
SIDE = 256


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-flux"])
def test_a_masked_edit_returns_the_inputs_pixels_where_the_mask_keeps(client, model):
    def inpaint(**extra) -> np.ndarray:
        response = client.images.edit(model=model, image=("in.png", photo(), "image/png"), mask=left_half_mask(),
                                      prompt="a cat", response_format="b64_json", output_format="png",
                                      extra_body={"seed": 9, "num_inference_steps": 4, "deterministic": True, **extra})
        validate(response.model_dump(exclude_none=True), "ImagesResponse")
        return pixels(response.data[0].b64_json)

    original = np.asarray(Image.open(io.BytesIO(photo())).convert("RGB"), dtype=np.int16)
    kept, raw = inpaint(), inpaint(preserve_unmasked=False)
    half = SIDE // 2  # the mask repaints x < 128
    assert np.abs(kept[:, half:] - original[:, half:]).max() <= 1
    assert np.abs(raw[:, half:] - original[:, half:]).mean() > 5  # the model's own (tiny VAE) kept half
    deep = half - FEATHER_PX - 1
    assert np.abs(kept[:, :deep] - raw[:, :deep]).max() <= 1  # repainted: the model's output
    assert np.abs(kept[:, :deep] - original[:, :deep]).mean() > 5
    for x in range(deep, half):  # the band: the input blended into the output, linearly
        weight = (half - x) / (FEATHER_PX + 1)
        expected = np.rint(original[:, x] + weight * (raw[:, x] - original[:, x]))
        assert np.abs(kept[:, x] - expected).max() <= 1, x


def test_preserve_unmasked_in_json_and_its_type_errors(server, client):
    def post(**kwargs) -> httpx.Response:
        return httpx.post(f"{server.base_url}/v1/images/edits", headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=120, **kwargs)

    def data_url(data: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(data).decode()

    body = {"model": "tiny-sd", "prompt": "a cat", "images": [{"image_url": data_url(photo())}],
            "mask": {"image_url": data_url(left_half_mask())}, "response_format": "b64_json",
            "output_format": "png", "seed": 9, "num_inference_steps": 4, "deterministic": True,
            "preserve_unmasked": False}
    response = post(json=body)
    assert response.status_code == 200, response.text
    sdk = client.images.edit(model="tiny-sd", image=("in.png", photo(), "image/png"), mask=left_half_mask(),
                             prompt="a cat", response_format="b64_json", output_format="png",
                             extra_body={"seed": 9, "num_inference_steps": 4, "deterministic": True,
                                         "preserve_unmasked": False})
    assert response.json()["data"][0]["b64_json"] == sdk.data[0].b64_json  # JSON and multipart: the same raw output
    for bad in ("no", 1, {}):
        refused = post(json={**body, "preserve_unmasked": bad})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "preserve_unmasked", refused.text
    form = post(data={"model": "tiny-sd", "prompt": "x", "preserve_unmasked": "maybe"},
                files={"image": ("a.png", photo())})
    assert form.status_code == 400 and form.json()["error"]["param"] == "preserve_unmasked", form.text


def test_tiny_autoencoder_previews_stream_as_partial_image_events(client):
    """tiny-sd3 decodes its previews with a tiny autoencoder here (conftest), as the catalog does."""
    extra = {"seed": 3, "num_inference_steps": 6}
    stream = client.images.generate(model="tiny-sd3", prompt="a red fox", stream=True, partial_images=2,
                                    size="256x384", output_format="jpeg", extra_body=extra)
    events = [event.model_dump(exclude_none=True) for event in stream]
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    for event in events:
        validate(event, "ImageGenPartialImageEvent" if event["type"].endswith("partial_image")
                 else "ImageGenCompletedEvent")
        image = Image.open(io.BytesIO(base64.b64decode(event["b64_json"])))
        assert (image.format, image.size) == ("JPEG", (256, 384))
    plain = client.images.generate(model="tiny-sd3", prompt="a red fox", size="256x384", output_format="jpeg",
                                   response_format="b64_json", extra_body=extra)
    assert plain.data[0].b64_json == events[-1]["b64_json"]  # the final image: the full decode, unchanged
