import io

import numpy as np
import pytest
from PIL import Image

from serve_app.replica.encoding import encode_image


@pytest.fixture
def image():
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(("fmt", "pil_name"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_formats_decode_at_the_right_size(image, fmt, pil_name):
    decoded = Image.open(io.BytesIO(encode_image(image, fmt, 90)))
    assert decoded.format == pil_name and decoded.size == (64, 48)


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_lossless_at_100(image, fmt):
    decoded = Image.open(io.BytesIO(encode_image(image, fmt, 100))).convert("RGB")
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_compression_trades_size(image, fmt):
    assert len(encode_image(image, fmt, 10)) < len(encode_image(image, fmt, 95))


def test_deterministic(image):
    assert encode_image(image, "webp", 100) == encode_image(image, "webp", 100)
