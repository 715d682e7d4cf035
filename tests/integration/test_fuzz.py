"""Fuzzing the real app with schemathesis, driven by OpenAI's published request schemas
(tests/schemas/openai/images-schemas.json: `CreateImageRequest`; `CreateImageEditRequest`
as multipart and `EditImageBodyJsonParam` as JSON on /v1/images/edits;
`CreateImageVariationRequest`) with `model` pinned to a served tiny model. Examples, boundary
(coverage) and random phases, positive and negative modes. Checks on every case: never a 5xx;
every error is in the OpenAI envelope with one of
the documented statuses and `x-should-retry`.

Keeping it cheap: a schema-valid body would make a real generation (up to n=10 images of
1792x1024 at 50 steps). Before sending, each dict body gets `num_inference_steps: 1`, `n` is
capped at 2 when it is in range, and a size the model accepts becomes 256x256; invalid
values are left as generated, so the 400 paths see exactly what the fuzzer made. For edits,
half of the generated `image` files (by the parity of their length) become a real 64x64 PNG,
so valid edits run too. The reference model `tiny-flux2` (several images, no mask) gets the same
checks on all three routes, with fewer cases (no coverage phase)."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image

from serve_app.config import load_model_config, parse_size
from tests.integration.conftest import API_KEY
from tests.openai_schema import SCHEMA_FILE

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-sd"
# A reference family (multi-image edits, no mask), fuzzed with fewer cases: its routes' own refusals.
REFERENCE_MODEL = "tiny-flux2"
SIZES = load_model_config(ROOT / "models" / f"{MODEL}.yaml").sizes
# 405: the coverage phase also tries other HTTP methods on the route. 5xx is never acceptable.
DOCUMENTED = {400, 401, 404, 405, 409, 413, 429}
MIN_CASES = 1000
MIN_EDIT_CASES = 500
MIN_REFERENCE_CASES = 60
sent: list[int] = []
sent_edits: list[int] = []
sent_references: list[int] = []


def valid_example(route: str, model: str) -> dict | None:
    """A valid generation for the examples phase: every run sends at least one request that must
    succeed, however few of the random ones happen to be valid (a run of 80 cases had none).
    (The edit bodies' published examples name URLs and masks: they stay as published.)"""
    if route != "/v1/images/generations":
        return None
    return {"model": model, "prompt": "a lighthouse at dusk", "size": "256x256", "response_format": "b64_json"}


def openai_document(paths: dict[str, dict[str, str]], models: tuple[str, ...] = (MODEL,)) -> dict:
    """An OpenAPI document of `paths` ({route: {media type: request schema}}) over the published
    components, each request schema's `model` pinned to `models`; generations get a valid
    example for the first of `models` (one that serves them)."""
    published = json.loads(SCHEMA_FILE.read_text())
    components = copy.deepcopy(published["components"])
    for content in paths.values():
        for name in content.values():
            components["schemas"][name]["properties"]["model"] = {"type": "string", "enum": list(models)}
    return {
        "openapi": "3.0.3",  # the published schemas use 3.0's `nullable`
        "info": {"title": "OpenAI Images", "version": "published"},
        "paths": {route: {"post": {
            "requestBody": {"required": True, "content": {
                media: {"schema": {"$ref": f"#/components/schemas/{name}"},
                        **({"example": example} if (example := valid_example(route, models[0])) else {})}
                for media, name in content.items()}},
            "responses": {"200": {"description": "images"}},
        }} for route, content in paths.items()},
        "components": components,
    }


def fuzz_schema(paths: dict[str, dict[str, str]], max_examples: int, models: tuple[str, ...] = (MODEL,),
                phases: tuple[str, ...] = ("examples", "coverage", "fuzzing")):
    loaded = schemathesis.openapi.from_dict(openai_document(paths, models))
    loaded.config.phases.update(phases=list(phases))
    loaded.config.generation.update(
        modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
        max_examples=max_examples, deterministic=False, no_shrink=False,
    )
    return loaded


schema = fuzz_schema({"/v1/images/generations": {"application/json": "CreateImageRequest"}}, 1000)
edit_schema = fuzz_schema({
    "/v1/images/edits": {"multipart/form-data": "CreateImageEditRequest", "application/json": "EditImageBodyJsonParam"},
    "/v1/images/variations": {"multipart/form-data": "CreateImageVariationRequest"},
}, 200)
# tiny-flux2's routes without the coverage phase (its hundreds of boundary cases are tiny-sd's above).
reference_schema = fuzz_schema({
    "/v1/images/generations": {"application/json": "CreateImageRequest"},
    "/v1/images/edits": {"multipart/form-data": "CreateImageEditRequest", "application/json": "EditImageBodyJsonParam"},
    "/v1/images/variations": {"multipart/form-data": "CreateImageVariationRequest"},
}, 25, (REFERENCE_MODEL,), phases=("examples", "fuzzing"))
# The Qwen-Image family's routes, smaller runs (their steps cost more): generations on both models (the
# edit-only one must refuse them with a 400), edits on Edit Plus (up to 3 references, no mask).
QWEN = ("tiny-qwen-image", "tiny-qwen-image-edit")
qwen_schema = fuzz_schema({"/v1/images/generations": {"application/json": "CreateImageRequest"}}, 15, QWEN)
qwen_edit_schema = fuzz_schema({
    "/v1/images/edits": {"multipart/form-data": "CreateImageEditRequest", "application/json": "EditImageBodyJsonParam"},
}, 15, QWEN[1:])
sent_qwen: list[int] = []


def _png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(out, format="PNG")
    return out.getvalue()


PNG = _png()


def cheap(body, steps: int = 1):
    if not isinstance(body, dict):
        return body
    body = {**body, "num_inference_steps": steps}
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 10:
        body["n"] = min(n, 2)
    size = body.get("size")
    dims = parse_size(size) if isinstance(size, str) else None
    if dims and SIZES.accepts(*dims):
        body["size"] = "256x256"
    return body


def real_image(body):
    image = body.get("image") if isinstance(body, dict) else None
    data = getattr(image, "data", image)  # schemathesis wraps generated files in `Binary`
    if isinstance(data, bytes) and len(data) % 2 == 0:
        return {**body, "image": PNG}
    return body


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_openai_schema_fuzz(case, server):
    send(case, server, sent, steps=1)


@edit_schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_openai_edit_schema_fuzz(case, server):
    send(case, server, sent_edits, steps=2, files=True)  # 2 x the edit strengths runs a step


@qwen_schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_qwen_schema_fuzz(case, server):
    send(case, server, sent_qwen, steps=2)  # the family's fewest steps


@qwen_edit_schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_qwen_edit_schema_fuzz(case, server):
    send(case, server, sent_qwen, steps=2, files=True)


def send(case, server, statuses: list[int], steps: int, files: bool = False) -> None:
    """Make the case cheap (and, for file routes, half of its images real), send it, check it."""
    if isinstance(case.body, dict):
        case.body = cheap(case.body, steps)
        if files:
            case.body = real_image(case.body)
    response = case.call(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    statuses.append(response.status_code)
    check(case, response)


@reference_schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_reference_model_schema_fuzz(case, server):
    if isinstance(case.body, dict):
        case.body = real_image(cheap(case.body, steps=2))
    response = case.call(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    sent_references.append(response.status_code)
    check(case, response)


def check(case, response) -> None:
    assert response.status_code < 500, (case.body, response.text[:500])
    if response.status_code >= 400:
        assert response.status_code in DOCUMENTED, (case.body, response.status_code, response.text[:500])
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert isinstance(error["message"], str) and error["type"] == "invalid_request_error"
        assert response.headers["x-should-retry"] == ["false"]  # schemathesis: header -> list of values
        assert "Traceback" not in response.text and "/work/" not in response.text
    elif response.headers["content-type"][0].startswith("text/event-stream"):  # stream: true
        events = [line for line in response.text.splitlines() if line.startswith("event: ")]
        assert events and events[-1].endswith(".completed"), (case.body, response.text[-500:])
    else:
        assert response.status_code == 200
        assert len(response.json()["data"]) >= 1


def ran_enough(label: str, statuses: list[int], minimum: int) -> None:
    counts = {s: statuses.count(s) for s in sorted(set(statuses))}
    print(f"{label}: {len(statuses)} cases, statuses {counts}")
    assert len(statuses) >= minimum, counts
    assert 200 in counts and 400 in counts  # both valid and invalid bodies were exercised


def test_fuzzing_ran_enough_cases():
    """Runs after the fuzz test (file order): at least MIN_CASES requests were made."""
    if not sent:
        pytest.fail("the fuzz test did not run first")
    ran_enough("fuzz", sent, MIN_CASES)
    ran_enough("edit fuzz", sent_edits, MIN_EDIT_CASES)


def test_reference_model_fuzzing_ran_enough_cases():
    """Runs after the reference model's fuzz test (file order)."""
    if not sent_references:
        pytest.fail("the reference model's fuzz test did not run first")
    ran_enough(f"{REFERENCE_MODEL} fuzz", sent_references, MIN_REFERENCE_CASES)


def test_qwen_fuzzing_ran():
    """Runs after the Qwen fuzz tests (file order): their routes saw valid and invalid bodies."""
    if not sent_qwen:
        pytest.fail("the Qwen fuzz tests did not run first")
    ran_enough("qwen fuzz", sent_qwen, 60)
