"""The bodies of `POST /v1/images/edits` (multipart or JSON) and `/variations` (multipart),
read into a validated request plus its image sources. Nothing is fetched or decoded here
beyond the form itself: the ingress checks the model first (edits.py → presets.check_edit →
uploads).

Multipart as the OpenAI SDKs (Python and Node) send it: scalar fields as text parts
(numbers and booleans as strings), one file as `image`, several as repeated `image[]`, the
mask as `mask`; raw bytes come with a made-up filename (`upload`, `unknown_file`) and
`application/octet-stream`."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from serve_app.api import uploads
from serve_app.api.idempotency import fingerprint
from serve_app.api.limits import decode_json_body
from serve_app.api.protocol import ImageEditJsonRequest, ImageEditRequest, ImageVariationRequest, parse_request
from serve_app.api.uploads import MAX_IMAGE_BYTES, MAX_IMAGES, Upload
from serve_app.errors import InvalidRequestError

logger = logging.getLogger("ray.serve")
FILE_FIELDS = ("image", "image[]", "mask")
MAX_FORM_FIELDS = 64  # every field of the schema, with room for a client's extras
MAX_FIELD_BYTES = 1024 * 1024  # a text part: prompts are at most a few tens of KB
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
# extra_body={"loras": [{"name", "scale"}]} as the SDKs put it in a form: loras[][name], loras[][scale], ...
LORA_PART = re.compile(r"^loras\[(\d*)\]\[([a-z_]+)\]$")


@dataclass(frozen=True)
class EditBody:
    """A validated edit or variation request. `load` gives its images and mask as bytes
    (for JSON references it decodes data: URLs and fetches allow-listed URLs)."""

    request: ImageEditRequest | ImageVariationRequest
    image_count: int
    image_param: str  # "image" (multipart) or "images" (JSON)
    has_mask: bool
    fingerprint: str  # the body's, for Idempotency-Key
    load: Callable[[], Awaitable[tuple[list[Upload], Upload | None]]]


def is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() in FORM_TYPES


async def read_edit(request: Request, url_hosts: list[str]) -> EditBody:
    if is_form(request):
        fields, files = await read_form(request, ImageEditRequest)
        images = [*files.get("image", []), *files.get("image[]", [])]
        return _from_form(parse_request(ImageEditRequest, fields, from_form=True), fields, images,
                          _one_mask(files.get("mask", [])))
    body = decode_json_body(await request.body())
    edit = parse_request(ImageEditJsonRequest, body)

    async def load() -> tuple[list[Upload], Upload | None]:
        images = [await uploads.resolve_ref(ref.image_url, ref.file_id, f"images[{i}]", url_hosts)
                  for i, ref in enumerate(edit.images)]
        mask = edit.mask and await uploads.resolve_ref(edit.mask.image_url, edit.mask.file_id, "mask", url_hosts)
        return images, mask

    return EditBody(edit, len(edit.images), "images", edit.mask is not None, fingerprint(body), load)


async def read_variation(request: Request) -> EditBody:
    if not is_form(request):
        raise InvalidRequestError("Variations take a multipart/form-data body (image, model, n, size, ...).",
                                  param=None)
    fields, files = await read_form(request, ImageVariationRequest)
    if files.get("image[]") or files.get("mask"):
        raise InvalidRequestError("A variation takes exactly one image, as the field 'image'.", param="image")
    images = files.get("image", [])
    if len(images) > 1:
        raise InvalidRequestError("A variation takes exactly one image.", param="image")
    return _from_form(parse_request(ImageVariationRequest, fields, from_form=True), fields, images, None)


def _from_form(request: ImageEditRequest | ImageVariationRequest, fields: dict[str, Any], images: list[bytes],
               mask: bytes | None) -> EditBody:
    named = [Upload("image" if len(images) == 1 else f"image[{i}]", data) for i, data in enumerate(images)]
    uploads.check_count(named)
    mask_upload = Upload("mask", mask) if mask is not None else None
    digest = fingerprint({**fields, "image": [_sha(d) for d in images],
                          "mask": _sha(mask) if mask is not None else None})

    async def load() -> tuple[list[Upload], Upload | None]:
        return named, mask_upload

    return EditBody(request, len(named), "image", mask is not None, digest, load)


def _one_mask(masks: list[bytes]) -> bytes | None:
    if len(masks) > 1:
        raise InvalidRequestError("Send at most one mask.", param="mask")
    return masks[0] if masks else None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def form_loras(parts: list[tuple[str, str]]) -> list[dict[str, str]]:
    """`loras` from form fields: `loras[0][name]`, `loras[0][scale]`, ... by index, or `loras[][name]`,
    `loras[][scale]`, ... by position (the Python SDK sends each field's values together, so the
    i-th name goes with the i-th scale: every adapter must then carry the same fields)."""
    fields: dict[str, dict[str, str]] = {}
    positions: dict[str, list[str]] = {}
    for key, value in parts:
        index, field = LORA_PART.match(key).groups()  # type: ignore[union-attr]
        if index:
            fields.setdefault(index, {})[field] = value
        else:
            positions.setdefault(field, []).append(value)
    if fields and positions:
        raise InvalidRequestError("Give 'loras' fields either all with an index or all as loras[][...].",
                                  param="loras")
    if fields:
        return [fields[index] for index in sorted(fields, key=int)]
    counts = {len(values) for values in positions.values()}
    if len(counts) > 1:
        raise InvalidRequestError("In a form, give every adapter in 'loras' the same fields (each a name and a "
                                  "scale, or each a name only), or use JSON.", param="loras")
    return [dict(zip(positions, values, strict=True)) for values in zip(*positions.values(), strict=True)]


async def read_form(request: Request, model: type[Any]) -> tuple[dict[str, Any], dict[str, list[bytes]]]:
    """Text fields (each at most once) and file parts (`image`, `image[]`, `mask`), with the
    parser's limits; every malformed form is a 400."""
    try:
        form = await request.form(max_files=MAX_IMAGES + 1, max_fields=MAX_FORM_FIELDS,
                                  max_part_size=MAX_FIELD_BYTES)
    except StarletteHTTPException as exc:  # Starlette's MultiPartException, as a 400
        detail = str(exc.detail)
        raise InvalidRequestError(f"The form could not be read: {detail}",
                                  param="image" if "files" in detail else None, code="invalid_form") from None
    try:
        fields: dict[str, Any] = {}
        files: dict[str, list[bytes]] = {}
        loras: list[tuple[str, str]] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key in FILE_FIELDS:
                    files.setdefault(key, []).append(await _file_bytes(key, value))
                elif key in model.model_fields:
                    raise InvalidRequestError(f"'{key}' must be a text field, not a file.", param=key)
                else:
                    logger.debug("ignoring unknown file field %r", key)
            elif key in FILE_FIELDS:
                raise InvalidRequestError(f"'{key}' must be a file (a part with a filename).", param=key)
            elif LORA_PART.match(key):
                loras.append((key, value))
            elif key in fields:
                raise InvalidRequestError(f"'{key}' was given more than once.", param=key)
            else:
                fields[key] = value
        if loras or "loras" in fields:
            fields["loras"] = _loras_field(fields.get("loras"), loras)
        return fields, files
    finally:
        await form.close()


def _loras_field(text: str | None, parts: list[tuple[str, str]]) -> Any:
    """`loras` from a form: the SDKs' bracketed parts, or one text field of JSON (curl)."""
    if text is None:
        return form_loras(parts)
    if parts:
        raise InvalidRequestError("Give 'loras' once: as loras[][name] fields or as one JSON field.", param="loras")
    try:
        return json.loads(text)
    except ValueError:
        raise InvalidRequestError("'loras' must be a JSON list of {\"name\", \"scale\"} objects.",
                                  param="loras") from None


async def _file_bytes(key: str, file: UploadFile) -> bytes:
    param = key.removesuffix("[]")
    if file.size is not None and file.size > MAX_IMAGE_BYTES:
        raise InvalidRequestError(f"'{param}' is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB.", param=param)
    return await file.read()
