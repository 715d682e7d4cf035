"""Validate bodies and stream events against OpenAI's official Images/Models schemas
(../shared/schemas/openai), exactly as published: no enum is widened."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema
from referencing import Registry, Resource

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "openai" / "images-schemas.json"


@cache
def _document() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def validate(body: dict, schema_name: str) -> None:
    document = _document()
    registry = Registry().with_resource("", Resource.opaque(document))
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(body)
