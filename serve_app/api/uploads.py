"""Input images of edits and variations: where their bytes come from (multipart files,
`data:` URLs, allow-listed http(s) URLs), what they are (sniffed from the bytes, never from a
name or content type), and how they become a `GenerationJob`'s `images` and `mask`.

Every problem is a 400 naming the field. The pixel count is read from the header and checked
against the model's largest size before anything is decoded, so a small file that claims
100000x100000 pixels (a decompression bomb) costs nothing."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import urllib.parse
import warnings
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image, ImageOps

from serve_app.errors import InvalidRequestError

MAX_IMAGES = 16
MAX_IMAGE_BYTES = 50 * 1024 * 1024


def edit_body_limit(max_input_images: int) -> int:
    """The largest edit body that can be valid: the images and a mask at MAX_IMAGE_BYTES each,
    base64 in a JSON body (4/3 of the bytes), plus 1 MB of fields. A larger body is refused
    (413) before it is read, instead of after holding it in the ingress's memory."""
    return (max_input_images + 1) * MAX_IMAGE_BYTES * 4 // 3 + 1024 * 1024
FETCH_TIMEOUT_S = 10.0
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # ours → PIL's


@dataclass(frozen=True)
class Upload:
    """One input image's bytes, and the request field it came in (for errors)."""

    param: str  # "image", "image[1]", "images[0].image_url", "mask"
    data: bytes


@dataclass(frozen=True)
class EditInput:
    """What an edit adds to its job (GenerationJob's edit fields)."""

    images: tuple[bytes, ...]  # PNG, RGB, in request order: the output size, or references at their own
    mask: bytes | None  # PNG, mode L, the output size: 255 = repaint, 0 = keep
    image_tokens: int


def sniff(data: bytes) -> str | None:
    """png, jpeg or webp from the magic numbers; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def check_count(uploads: list[Upload], param: str = "image") -> None:
    if not uploads:
        raise InvalidRequestError(f"Missing required parameter: '{param}'.", param=param,
                                  code="missing_required_parameter")
    if len(uploads) > MAX_IMAGES:
        raise InvalidRequestError(f"At most {MAX_IMAGES} images; {len(uploads)} were given.", param=param)


def check_bytes(upload: Upload) -> None:
    if len(upload.data) > MAX_IMAGE_BYTES:
        raise InvalidRequestError(f"'{upload.param}' is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB.",
                                  param=upload.param)


def open_image(upload: Upload, max_pixels: int, *, formats: tuple[str, ...] = tuple(FORMATS)) -> Image.Image:
    """The image, opened lazily (header only) and checked: a known format, at most
    `max_pixels`. Nothing is decoded yet."""
    check_bytes(upload)
    kind = sniff(upload.data)
    if kind not in formats:
        accepted = ", ".join(formats)
        raise InvalidRequestError(f"'{upload.param}' is not an image of a supported format ({accepted}).",
                                  param=upload.param, code="invalid_image_format")
    try:
        with warnings.catch_warnings():  # our own pixel bound comes first, below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(upload.data), formats=[FORMATS[kind]])
    except Image.DecompressionBombError:  # PIL's own bound (far above any model's), at open
        raise _too_large(upload, "far more", max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise _unreadable(upload) from None
    width, height = image.size
    if width * height > max_pixels or width < 1 or height < 1:
        raise _too_large(upload, f"{width}x{height}", max_pixels)
    return image


def _too_large(upload: Upload, size: str, max_pixels: int) -> InvalidRequestError:
    return InvalidRequestError(f"'{upload.param}' is {size} pixels; this model takes at most {max_pixels} pixels.",
                               param=upload.param, code="image_too_large")


def decode(upload: Upload, image: Image.Image) -> Image.Image:
    """The full decode of an opened image (a JPEG upright, as its EXIF orientation says:
    cameras and phones write it)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit gray: scale, never clip
                image = _eight_bit(image)
            return ImageOps.exif_transpose(image) if image.format == "JPEG" else image
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError):
        raise _unreadable(upload) from None


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale PNG as 8-bit L (PIL's own conversion clips at 255 instead of
    scaling), its transparency (a tRNS gray value) kept as an alpha channel."""
    values = np.asarray(image, dtype=np.uint32)
    gray = Image.fromarray((values // 257).astype(np.uint8), "L")
    transparent = image.info.get("transparency")
    if transparent is None:
        return gray
    alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), "L")
    return Image.merge("LA", (gray, alpha))


def _unreadable(upload: Upload) -> InvalidRequestError:
    return InvalidRequestError(f"'{upload.param}' could not be decoded (truncated or corrupt image).",
                               param=upload.param, code="invalid_image")


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def input_size(images: list[Upload], max_pixels: int) -> tuple[int, int]:
    """Check every image's header; the first one's size (upright), for `size: auto`."""
    opened = [open_image(upload, max_pixels) for upload in images]
    first = opened[0]
    orientation = first.getexif().get(0x0112, 1) if sniff(images[0].data) == "jpeg" else 1
    width, height = first.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def prepare(images: list[Upload], mask: Upload | None, *, width: int, height: int, max_pixels: int,
            references: bool = False) -> EditInput:
    """Decode and check the images and mask. From one image (`references` False), the first image
    becomes the RGB init image at the output size; as references, every image stays RGB at its own
    size (its pipeline resizes references itself). The mask becomes an L mask at the output size
    (alpha 0 → 255, repaint). Image tokens: each image's (W/16) x (H/16), at the size the model gets it."""
    decoded = [decode(upload, open_image(upload, max_pixels)) for upload in images]
    rgb = [image.convert("RGB") for image in (decoded if references else decoded[:1])]
    if not references and rgb[0].size != (width, height):
        rgb[0] = rgb[0].resize((width, height), Image.Resampling.LANCZOS)
    mask_png = None
    if mask is not None:
        first = decoded[0].size
        mask_png = _png(repaint_mask(mask, first, max_pixels).resize((width, height), Image.Resampling.NEAREST))
    tokens = sum((image.width // 16) * (image.height // 16) for image in rgb)
    return EditInput(images=tuple(_png(image) for image in rgb), mask=mask_png, image_tokens=tokens)


def repaint_mask(mask: Upload, size: tuple[int, int], max_pixels: int) -> Image.Image:
    """OpenAI's mask (a PNG with alpha, the first image's size, alpha 0 = edit here) as
    diffusers' (mode L, 255 = repaint, 0 = keep)."""
    image = decode(mask, open_image(mask, max_pixels, formats=("png",)))
    if image.size != size:
        raise InvalidRequestError(
            f"The mask is {image.size[0]}x{image.size[1]}; it must be the image's size, {size[0]}x{size[1]}.",
            param=mask.param,
        )
    if "A" not in image.getbands() and "transparency" not in image.info:
        raise InvalidRequestError("The mask must be a PNG with an alpha channel (alpha 0: the area to edit).",
                                  param=mask.param)
    alpha = image.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0)


# --- JSON edits: image references -------------------------------------------------------


def decode_data_url(url: str, param: str) -> bytes:
    """`data:[<type>][;base64],<data>` → bytes; the declared type is ignored (sniffed later)."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidRequestError(f"'{param}' is not a valid data: URL.", param=param)
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InvalidRequestError(f"'{param}' is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB.", param=param)
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"'{param}' is not valid base64.", param=param) from None
    return urllib.parse.unquote_to_bytes(payload)


def allowed_host(url: str, hosts: list[str]) -> bool:
    """Whether `url` is http(s) with a host on the operator's allow-list (exact names)."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        return False
    return parsed.scheme in ("http", "https") and not parsed.userinfo and parsed.host.lower() in hosts


async def fetch_url(url: str, param: str, hosts: list[str], *, transport: httpx.AsyncBaseTransport | None = None,
                    timeout_s: float = FETCH_TIMEOUT_S) -> bytes:
    """GET an allow-listed image URL: no redirects, no proxy or .netrc from the environment, at
    most MAX_IMAGE_BYTES, `timeout_s` for the whole fetch (not per read: a host dripping bytes
    cannot hold the request)."""
    if not allowed_host(url, hosts):
        raise InvalidRequestError(
            f"'{param}': only data: URLs, or http(s) URLs on this server's allow-list, are accepted.", param=param
        )
    try:
        async with (
            asyncio.timeout(timeout_s),
            httpx.AsyncClient(transport=transport, follow_redirects=False, timeout=timeout_s,
                              trust_env=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:  # a redirect too: it is not followed
                raise InvalidRequestError(
                    f"'{param}': fetching the image answered HTTP {response.status_code}.", param=param
                )
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > MAX_IMAGE_BYTES:
                    raise InvalidRequestError(
                        f"'{param}' is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB.", param=param
                    )
            return bytes(data)
    except (httpx.HTTPError, TimeoutError) as exc:
        raise InvalidRequestError(f"'{param}': the image could not be fetched ({type(exc).__name__}).",
                                  param=param) from None


async def resolve_ref(image_url: str | None, file_id: str | None, param: str, hosts: list[str], *,
                      transport: httpx.AsyncBaseTransport | None = None) -> Upload:
    """A JSON edit's `{image_url}` or `{file_id}` → its bytes."""
    if file_id is not None:
        raise InvalidRequestError("file_id is not supported (there is no Files API); send image_url "
                                  "as a data: URL.", param=f"{param}.file_id")
    if image_url is None:
        raise InvalidRequestError(f"'{param}' needs an image_url.", param=param, code="missing_required_parameter")
    where = f"{param}.image_url"
    if image_url[:5].lower() == "data:":
        return Upload(where, decode_data_url(image_url, where))
    return Upload(where, await fetch_url(image_url, where, hosts, transport=transport))
