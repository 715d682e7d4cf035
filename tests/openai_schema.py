"""Validate bodies and stream events against OpenAI's official Images/Models schemas
(tests/schemas/openai, a verbatim copy of ../shared/schemas/openai kept in the repository so a
clean clone tests the same), exactly as published: no enum is widened."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema
from referencing import Registry, Resource

SCHEMAS = Path(__file__).resolve().parent / "schemas"
SCHEMA_FILE = SCHEMAS / "openai" / "images-schemas.json"


@cache
def _document() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def validate(body: dict, schema_name: str) -> None:
    document = _document()
    registry = Registry().with_resource("", Resource.opaque(document))
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(body)
