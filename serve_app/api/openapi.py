"""ArtServe's own OpenAPI document (`GET /openapi.json`), generated from the wire models.

The routes read the raw `Request` (so that every bad body becomes an OpenAI-shaped 400, not
FastAPI's 422), which leaves FastAPI's generated document without bodies. The request and
response models are attached here instead: each route's `openapi_extra` references them,
and `install_openapi` adds their JSON schemas (from pydantic) to `components`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from serve_app.api.protocol import (
    ImageEditJsonRequest,
    ImageEditRequest,
    ImageGenerateRequest,
    ImagesResponse,
    ImageVariationRequest,
    ModelCard,
    ModelList,
)


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for people.")
    type: str = Field(description="invalid_request_error, rate_limit_error, service_unavailable_error, server_error.")
    param: str | None = Field(description="The request field at fault, if any.")
    code: str | None = Field(description="A stable machine-readable code, if any.")


class ErrorEnvelope(BaseModel):
    """Every non-2xx response, from every route (SPEC: Errors)."""

    error: ErrorDetail


MODELS: list[type[BaseModel]] = [ImageGenerateRequest, ImageEditRequest, ImageEditJsonRequest, ImageVariationRequest,
                                  ImagesResponse, ModelCard, ModelList, ErrorEnvelope]


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


_RETRY = {
    "x-should-retry": {"description": "Whether retrying the same request can succeed.", "schema": {"type": "string"}},
}
_RETRY_AFTER = {**_RETRY, "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}


def _error(description: str, headers: dict[str, Any] = _RETRY) -> dict[str, Any]:
    return {**_json(ErrorEnvelope, description), "headers": headers}


_COMMON_ERRORS = {
    "401": _error("Missing or wrong API key."),
    "413": _error("Body larger than the route's limit."),
    "500": _error("A bug or a failed generation."),
}

GENERATIONS_DOC: dict[str, Any] = {
    "summary": "Create images from a prompt (OpenAI Images API).",
    "parameters": [{
        "name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 255},
        "description": "Repeats with the same key (and API key) within 24 h get the first response.",
    }],
    "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(ImageGenerateRequest)}}},
    "responses": {
        "200": _json(ImagesResponse, "The images, in order."),
        "400": _error("Malformed JSON, wrong types, out-of-range values, unsupported size."),
        "404": _error("Unknown model."),
        "409": _error("Idempotency-Key reused with a different body."),
        "429": _error("Over capacity.", _RETRY_AFTER),
        "503": _error("Model not ready, replica lost, storage unavailable.", _RETRY_AFTER),
        **_COMMON_ERRORS,
    },
}
_BINARY = {"type": "string", "format": "binary"}
_FILES = {
    "image": {**_BINARY, "description": "One input image (png, webp or jpeg; at most 50 MB)."},
    "image[]": {"type": "array", "items": _BINARY, "maxItems": 16,
                "description": "Several input images, in order: up to the model's max_input_images (its card)."},
    "mask": {**_BINARY, "description": "PNG with alpha, the first image's size: alpha 0 is repainted."},
}


def _form(model: type[BaseModel], files: tuple[str, ...]) -> dict[str, Any]:
    """A multipart body: the model's fields as text parts (numbers and booleans as strings)
    plus file parts."""
    return {"allOf": [_ref(model), {"type": "object", "properties": {k: _FILES[k] for k in files}}]}


_EDIT_ERRORS = {
    "400": _error("Malformed form or JSON, wrong types, out-of-range values, unsupported size, bad image or mask, "
                  "too many images, a URL not on the allow-list, file_id."),
    "404": _error("Unknown model."),
    "409": _error("Idempotency-Key reused with a different body."),
    "429": _error("Over capacity.", _RETRY_AFTER),
    "503": _error("Model not ready, replica lost, storage unavailable.", _RETRY_AFTER),
    **_COMMON_ERRORS,
}
EDITS_DOC: dict[str, Any] = {
    "summary": "Edit images from a prompt: image-to-image, inpainting with a mask, or (reference models) a new "
               "image conditioned on every input image (OpenAI Images API).",
    "parameters": GENERATIONS_DOC["parameters"],
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": _form(ImageEditRequest, ("image", "image[]", "mask"))},
        "application/json": {"schema": _ref(ImageEditJsonRequest)},
    }},
    "responses": {"200": _json(ImagesResponse, "The images, in order (stream: image_edit.* events)."),
                  **_EDIT_ERRORS},
}
VARIATIONS_DOC: dict[str, Any] = {
    "summary": "Variations of an image, with no prompt (OpenAI Images API).",
    "parameters": GENERATIONS_DOC["parameters"],
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": _form(ImageVariationRequest, ("image",))},
    }},
    "responses": {"200": _json(ImagesResponse, "The images, in order."), **_EDIT_ERRORS},
}
MODELS_DOC: dict[str, Any] = {"responses": {"200": _json(ModelList, "Every served model."), **_COMMON_ERRORS}}
MODEL_DOC: dict[str, Any] = {
    "responses": {"200": _json(ModelCard, "One model."), "404": _error("Unknown model."), **_COMMON_ERRORS}
}


def install_openapi(api: FastAPI) -> None:
    generate = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            document = generate()
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for model in MODELS:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
            # The routes never answer FastAPI's 422: bad input is a 400 in the envelope.
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            document["security"] = [{"bearer": []}]
            api.openapi_schema = document
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
