"""Validate bodies against OpenAI's official Images/Models schemas (../shared/schemas).

One documented relaxation: ImagesResponse's `size` and `quality` enums list only the
gpt-image values (1024x1024…, low/medium/high). The SPEC, which wins over the schema,
returns the size actually generated and the dall-e-3 vocabulary (standard/hd), so those
two enums are widened to strings. Everything else is checked as published."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import jsonschema
from referencing import Registry, Resource

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "shared" / "schemas" / "openai" / "images-schemas.json"


@cache
def _document() -> dict:
    document = copy.deepcopy(json.loads(SCHEMA_FILE.read_text()))
    props = document["components"]["schemas"]["ImagesResponse"]["properties"]
    for name in ("size", "quality"):
        props[name].pop("enum")
    return document


def validate(body: dict, schema_name: str) -> None:
    document = _document()
    registry = Registry().with_resource("", Resource.opaque(document))
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(body)
