"""The Qwen-Image family through the real Serve app and the OpenAI Python SDK: generations (and a
stream with a preview) on tiny-qwen-image; `images.edit` with a list of files on the edit-only
tiny-qwen-image-edit, where every input image counts and matters; the refusals that name their
field. Every response validates against OpenAI's published schemas. (Parity with diffusers:
tests/unit/test_qwen_runners.py.)"""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from tests.openai_schema import validate

pytestmark = pytest.mark.integration
EDIT = "tiny-qwen-image-edit"
FAST = {"num_inference_steps": 2, "seed": 21}


def png(color: tuple[int, int, int], width: int = 256, height: int = 256) -> bytes:
    """A solid color with a light square: inputs a tiny random model can tell apart."""
    array = np.full((height, width, 3), color, dtype=np.uint8)
    array[height // 4: height // 2, width // 4: width // 2] = (240, 240, 240)
    out = io.BytesIO()
    Image.fromarray(array, "RGB").save(out, format="PNG")
    return out.getvalue()


def pixels(response) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json))).convert("RGB")) for d in response.data]


def edit(client, images: list[bytes], **kwargs):
    files = [(f"in{i}.png", data, "image/png") for i, data in enumerate(images)]
    return client.images.edit(model=EDIT, image=files, prompt="put the object of picture 2 into picture 1",
                              response_format="b64_json", output_format="png",
                              extra_body={**FAST, **kwargs.pop("extra_body", {})}, **kwargs)


def test_generations_with_true_cfg_seeds_and_sizes(client):
    response = client.images.generate(model="tiny-qwen-image", prompt="a shop sign that says hello", n=2,
                                      size="256x256", response_format="b64_json", output_format="png",
                                      extra_body=FAST)
    validate(response.model_dump(exclude_none=True), "ImagesResponse")
    first, second = pixels(response)
    assert first.shape == (256, 256, 3) and not np.array_equal(first, second)  # seeds 21 and 22
    again = client.images.generate(model="tiny-qwen-image", prompt="a shop sign that says hello", size="512x256",
                                   response_format="b64_json", output_format="png", extra_body=FAST)
    assert pixels(again)[0].shape == (256, 512, 3)
    # The negative prompt is the other half of true CFG: another one changes the image.
    other = client.images.generate(model="tiny-qwen-image", prompt="a shop sign that says hello", size="256x256",
                                   response_format="b64_json", output_format="png",
                                   extra_body={**FAST, "negative_prompt": "blurry, watermark"})
    assert not np.array_equal(pixels(other)[0], first)


def test_a_streamed_generation_previews_then_completes(client):
    stream = client.images.generate(model="tiny-qwen-image", prompt="a fox", stream=True, partial_images=1,
                                    size="256x256", output_format="png", extra_body={**FAST, "num_inference_steps": 3})
    events = [event.model_dump(exclude_none=True) for event in stream]
    assert [e["type"] for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    validate(events[0], "ImageGenPartialImageEvent")
    validate(events[1], "ImageGenCompletedEvent")


def test_an_edit_with_two_files_uses_both(client):
    red, blue, green = png((200, 30, 30)), png((30, 30, 200)), png((30, 200, 30))
    response = edit(client, [red, blue])
    body = response.model_dump(exclude_none=True)
    validate(body, "ImagesResponse")
    [out] = pixels(response)
    assert out.shape == (256, 256, 3)
    assert body["usage"]["input_tokens_details"]["image_tokens"] == 2 * 256  # both 256x256 inputs, 16 px a token
    assert np.array_equal(pixels(edit(client, [red, blue]))[0], out)  # same inputs and seed: same bytes
    assert not np.array_equal(pixels(edit(client, [red, green]))[0], out)  # the second image matters


def test_the_edit_model_refuses_generations_a_fourth_image_and_a_mask(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model=EDIT, prompt="a fox", extra_body=FAST)
    assert raised.value.body["param"] == "model" and "/v1/images/edits" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        edit(client, [png((200, 30, 30))] * 4)
    assert raised.value.body["param"] == "image"
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(model=EDIT, image=("in.png", png((200, 30, 30)), "image/png"), prompt="x",
                           mask=("mask.png", png((0, 0, 0)), "image/png"), extra_body=FAST)
    assert raised.value.body["param"] == "mask"
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model="tiny-qwen-image", prompt="a fox", extra_body={"num_inference_steps": 1})
    assert raised.value.body["param"] == "num_inference_steps"
