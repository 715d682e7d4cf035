"""serve_app/api/uploads.py: type sniffing, the pixel bound before any decode, truncated files,
mask checks and the alpha convention, `size: auto` rounding, data: URLs and the URL
allow-list (httpx.MockTransport: no network)."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import time
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app.api import uploads
from serve_app.api.uploads import Upload
from serve_app.config import SizeRules
from serve_app.errors import InvalidRequestError

MAX_PIXELS = 1792 * 1024


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def rgb(width: int = 64, height: int = 48, fmt: str = "PNG") -> bytes:
    return encode(Image.new("RGB", (width, height), (200, 30, 60)), fmt)


def alpha_mask(width: int = 64, height: int = 48) -> bytes:
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))  # left half transparent: repaint
    return encode(mask)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming WxH, with a tiny (wrong) IDAT: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def error_of(call) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(("data", "kind"), [
    (rgb(fmt="PNG"), "png"), (rgb(fmt="JPEG"), "jpeg"), (rgb(fmt="WEBP"), "webp"),
    (b"GIF89a....", None), (b"", None), (b"RIFF\0\0\0\0WAVE", None), (b"hello", None),
])
def test_sniffed_from_the_bytes(data, kind):
    assert uploads.sniff(data) == kind


def test_a_name_or_content_type_does_not_make_an_image():
    error = error_of(lambda: uploads.input_size([Upload("image", b"not an image at all")], MAX_PIXELS))
    assert (error.param, error.code) == ("image", "invalid_image_format")


def test_bomb_header_is_refused_before_any_decode(monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    for width in (100_000, 3000):  # past PIL's own bound (refused at open), and past only the model's
        bomb = png_header_only(width, width)
        error = error_of(lambda b=bomb: uploads.input_size([Upload("image[1]", b)], MAX_PIXELS))
        assert (error.param, error.code) == ("image[1]", "image_too_large")
    assert "3000x3000" in error.message


def test_just_over_the_models_pixels_is_refused():
    error = error_of(lambda: uploads.input_size([Upload("image", rgb(1793, 1024))], MAX_PIXELS))
    assert error.param == "image"


def test_truncated_file_is_400():
    data = rgb(256, 256, "JPEG")[:300]
    error = error_of(lambda: uploads.prepare([Upload("image", data)], None, width=256, height=256,
                                             max_pixels=MAX_PIXELS))
    assert (error.param, error.code) == ("image", "invalid_image")


def test_over_50_mb_is_400():
    big = Upload("image", b"\x89PNG\r\n\x1a\n" + b"\0" * uploads.MAX_IMAGE_BYTES)
    assert error_of(lambda: uploads.input_size([big], MAX_PIXELS)).param == "image"


def test_count_bounds():
    assert error_of(lambda: uploads.check_count([])).code == "missing_required_parameter"
    assert error_of(lambda: uploads.check_count([Upload("image", b"")] * 17)).param == "image"
    uploads.check_count([Upload("image", b"")] * 16)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_first_image_becomes_rgb_png_at_the_output_size(fmt):
    edit = uploads.prepare([Upload("image", rgb(64, 48, fmt))], None, width=128, height=64, max_pixels=MAX_PIXELS)
    image = Image.open(io.BytesIO(edit.images[0]))
    assert (image.format, image.mode, image.size) == ("PNG", "RGB", (128, 64))
    assert edit.mask is None
    assert edit.image_tokens == (128 // 16) * (64 // 16)


def test_mask_alpha_zero_becomes_255_repaint():
    edit = uploads.prepare([Upload("image", rgb(64, 48))], Upload("mask", alpha_mask(64, 48)),
                           width=128, height=96, max_pixels=MAX_PIXELS)
    mask = Image.open(io.BytesIO(edit.mask))
    assert (mask.format, mask.mode, mask.size) == ("PNG", "L", (128, 96))
    assert mask.getpixel((10, 10)) == 255  # transparent in the upload: repaint
    assert mask.getpixel((120, 10)) == 0  # opaque: keep
    assert set(mask.getdata()) == {0, 255}


@pytest.mark.parametrize(("mask", "what"), [
    (alpha_mask(32, 48), "size"),
    (encode(Image.new("RGB", (64, 48))), "alpha"),
    (encode(Image.new("L", (64, 48))), "alpha"),
    (encode(Image.new("RGBA", (64, 48)), "WEBP"), "format"),
    (b"nope", "format"),
])
def test_bad_masks_are_400_mask(mask, what):
    error = error_of(lambda: uploads.prepare([Upload("image", rgb(64, 48))], Upload("mask", mask),
                                             width=64, height=64, max_pixels=MAX_PIXELS))
    assert error.param == "mask", what


def test_palette_mask_with_transparency_counts_as_alpha():
    mask = Image.new("P", (64, 48), 1)
    mask.info["transparency"] = 0
    mask.paste(0, (0, 0, 32, 48))
    edit = uploads.prepare([Upload("image", rgb(64, 48))], Upload("mask", encode(mask)),
                           width=64, height=48, max_pixels=MAX_PIXELS)
    out = Image.open(io.BytesIO(edit.mask))
    assert (out.getpixel((5, 5)), out.getpixel((60, 5))) == (255, 0)


RULE = SizeRules(allowed=["256x256", "512x512", "1024x1024"], multiple_of=64, min_side=256, max_side=1792,
                 max_pixels=1792 * 1024)


@pytest.mark.parametrize(("size", "expected"), [
    ((256, 256), (256, 256)),
    ((300, 200), (384, 256)),  # scaled up to the smallest side, then rounded to 64
    ((1000, 1000), (1024, 1024)),
    ((4000, 3000), (1536, 1152)),  # scaled down to the pixel bound, aspect kept
    ((640, 480), (640, 512)),
    # Thin inputs keep the rule's sides instead of falling back to a listed square (and take
    # no time: the review found 1x1835008 took 1.5 s in a shrinking loop on the event loop).
    ((1, 1835008), (256, 1792)),
    ((300, 5000), (256, 1792)),
    ((5000, 300), (1792, 256)),
])
def test_auto_size_rounds_the_input_to_the_models_rule(size, expected):
    width, height = RULE.nearest(*size)
    assert (width, height) == expected
    assert RULE.accepts(width, height)


def test_auto_size_with_only_a_list_picks_the_nearest_shape():
    listed = SizeRules(allowed=["1024x1024", "1536x1024", "1024x1536"])
    assert listed.nearest(300, 200) == (1536, 1024)
    assert listed.nearest(200, 300) == (1024, 1536)
    assert listed.nearest(500, 510) == (1024, 1024)
    assert listed.max_input_pixels() == 1536 * 1024


def test_data_urls():
    png = rgb(8, 8)
    assert uploads.decode_data_url("data:image/png;base64," + base64.b64encode(png).decode(), "p") == png
    assert uploads.decode_data_url("data:,hello%20there", "p") == b"hello there"
    assert error_of(lambda: uploads.decode_data_url("data:image/png;base64,@@@", "images[0].image_url")).param \
        == "images[0].image_url"
    assert error_of(lambda: uploads.decode_data_url("data:image/png;base64", "p")).param == "p"


@pytest.mark.parametrize(("url", "ok"), [
    ("https://img.example.com/a.png", True),
    ("http://IMG.example.com:8080/a.png", True),
    ("https://evil.example.com/a.png", False),
    ("https://img.example.com.evil.com/a.png", False),
    ("https://user:pw@img.example.com/a.png", False),
    ("ftp://img.example.com/a.png", False),
    ("file:///etc/passwd", False),
    ("http://169.254.169.254/latest", False),
    ("not a url", False),
])
def test_allow_list(url, ok):
    assert uploads.allowed_host(url, ["img.example.com"]) is ok


def test_fetch_only_allow_listed_hosts_and_never_follows_redirects():
    seen: list[str] = []
    png = rgb(8, 8)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.path == "/moved":
            return httpx.Response(302, headers={"location": "http://169.254.169.254/"})
        return httpx.Response(200, content=png)

    transport = httpx.MockTransport(handler)
    hosts = ["img.example.com"]

    def fetch(url: str):
        return asyncio.run(uploads.resolve_ref(url, None, "images[0]", hosts, transport=transport))

    assert fetch("https://img.example.com/a.png") == Upload("images[0].image_url", png)
    assert error_of(lambda: fetch("https://other.example.com/a.png")).param == "images[0].image_url"
    assert error_of(lambda: fetch("https://img.example.com/moved")).param == "images[0].image_url"
    assert seen == ["https://img.example.com/a.png", "https://img.example.com/moved"]  # nothing else fetched


def test_fetch_size_cap(monkeypatch):
    monkeypatch.setattr(uploads, "MAX_IMAGE_BYTES", 1000)
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=b"x" * 5000))
    error = error_of(lambda: asyncio.run(uploads.fetch_url("https://h/a", "mask.image_url", ["h"],
                                                           transport=transport)))
    assert error.param == "mask.image_url"


def test_file_id_is_400_naming_the_field():
    error = error_of(lambda: asyncio.run(uploads.resolve_ref(None, "file-abc", "images[2]", [])))
    assert error.param == "images[2].file_id"


def test_jpeg_exif_orientation_is_applied_and_auto_size_follows_it():
    image = Image.new("RGB", (64, 48), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    out = io.BytesIO()
    image.save(out, format="JPEG", exif=exif.tobytes())
    upload = Upload("image", out.getvalue())
    assert uploads.input_size([upload], MAX_PIXELS) == (48, 64)
    edit = uploads.prepare([upload], Upload("mask", alpha_mask(48, 64)), width=48, height=64, max_pixels=MAX_PIXELS)
    assert Image.open(io.BytesIO(edit.images[0])).size == (48, 64)


def test_fetch_has_one_deadline_for_the_whole_transfer():
    """Found in review: httpx's timeout is per read, so a host dripping a byte every few
    seconds could hold an edit for as long as it liked."""
    class Drip(httpx.AsyncByteStream):
        async def __aiter__(self):
            for _ in range(100):
                await asyncio.sleep(0.05)  # each read well within the per-read timeout
                yield b"x"

    transport = httpx.MockTransport(lambda request: httpx.Response(200, stream=Drip()))
    started = time.monotonic()
    error = error_of(lambda: asyncio.run(uploads.fetch_url("https://h/a", "images[0].image_url", ["h"],
                                                           transport=transport, timeout_s=0.3)))
    assert error.param == "images[0].image_url" and "could not be fetched" in str(error)
    assert time.monotonic() - started < 2


def test_sixteen_bit_gray_images_and_masks_are_scaled_not_clipped():
    """Found in review: PIL clips 16-bit gray to 255 (a white image) and a tRNS mask lost its alpha."""
    values = np.full((64, 64), 40000, dtype=np.uint16)
    values[:, :32] = 1000
    image, masked = io.BytesIO(), io.BytesIO()
    Image.fromarray(values).save(image, format="PNG")
    Image.fromarray(values).save(masked, format="PNG", transparency=1000)
    edit = uploads.prepare([uploads.Upload("image", image.getvalue())], uploads.Upload("mask", masked.getvalue()),
                           width=64, height=64, max_pixels=64 * 64)
    init = np.asarray(Image.open(io.BytesIO(edit.images[0])).convert("L"))
    assert (init[0, 0], init[0, 63]) == (1000 // 257, 40000 // 257)
    mask = np.asarray(Image.open(io.BytesIO(edit.mask)))
    assert (mask[:, :32] == 255).all() and (mask[:, 32:] == 0).all()  # transparent = repaint


def test_references_stay_at_their_own_size_in_order_as_rgb():
    """A reference family's images travel as uploaded (upright, RGB), each at its own size: its
    pipeline resizes references itself. Image tokens count every one."""
    first, second = rgb(64, 48, "WEBP"), Image.new("RGBA", (32, 80), (0, 0, 255, 0))
    out = io.BytesIO()
    second.save(out, format="PNG")
    edit = uploads.prepare([Upload("image[0]", first), Upload("image[1]", out.getvalue())], None,
                           width=256, height=256, max_pixels=MAX_PIXELS, references=True)
    opened = [Image.open(io.BytesIO(data)) for data in edit.images]
    assert [(i.format, i.mode, i.size) for i in opened] == [("PNG", "RGB", (64, 48)), ("PNG", "RGB", (32, 80))]
    assert opened[1].getpixel((0, 0)) == (0, 0, 255)
    assert edit.image_tokens == (64 // 16) * (48 // 16) + (32 // 16) * (80 // 16)
