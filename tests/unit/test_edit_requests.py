"""Edits and variations through the real `create_api` in process (no Ray): the official
OpenAI SDK's multipart bodies and JSON bodies become the right `GenerationJob` (a fake model
handle records it), and every bad input is a 400 naming its field before any model call."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from serve_app.api.auth import ApiKeys
from serve_app.api.drain import DrainState
from serve_app.api.ingress import ImageIngress, create_api
from serve_app.api.protocol import ImageEditRequest, ImageVariationRequest, parse_request
from serve_app.config import AppConfig
from serve_app.job import GenerationJob, GenerationResult, ImageResult
from tests.openai_schema import validate


class Metrics:
    def response(self, model: str, status: int) -> None:
        pass


class Ready:
    async def refusal(self, model_id: str) -> None:
        return None

    async def state(self, model_id: str) -> tuple[str, int]:
        return "HEALTHY", 1

    async def guard(self, model_id: str, call):
        return await call


class Handle:
    """A model deployment's handle: records the job, answers with one tiny image per seed."""

    def __init__(self):
        self.jobs: list[GenerationJob] = []
        self.generate = self

    def remote(self, job: GenerationJob):
        self.jobs.append(job)

        async def result() -> GenerationResult:
            return GenerationResult([ImageResult(seed=s, batch_size=1, b64_json="AA==") for s in job.seeds], 3)

        return result()


@pytest.fixture
def ingress(tmp_path):
    config = AppConfig.from_args({"models": ["tiny-sd", "tiny-pixart"], "storage": str(tmp_path)},
                                 env={"ARTSERVE_EDIT_URL_HOSTS": "img.example.com"})
    ingress = ImageIngress.func_or_class.__new__(ImageIngress.func_or_class)
    ingress.config, ingress.models = config, config.load_models()
    ingress.handles = {"tiny-sd": Handle(), "tiny-pixart": Handle()}
    ingress.keys, ingress.metrics, ingress.idempotency = ApiKeys(["sk-1"]), Metrics(), None
    ingress.drain, ingress.readiness = DrainState(None), Ready()
    return ingress


def jobs(ingress) -> list[GenerationJob]:
    return ingress.handles["tiny-sd"].jobs


def png(width: int = 300, height: int = 200, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, format="PNG")
    return out.getvalue()


def mask_png(width: int = 300, height: int = 200) -> bytes:
    return png(width, height, "RGBA")  # all alpha 0: repaint everything


def sdk(ingress, call):
    async def go():
        transport = httpx.ASGITransport(app=create_api(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            client = openai.AsyncOpenAI(api_key="sk-1", base_url="http://t/v1", http_client=http, max_retries=0)
            return await call(client)

    return asyncio.run(go())


def post(ingress, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=create_api(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            path = kwargs.pop("path", "/v1/images/edits")
            headers = {"authorization": "Bearer sk-1", **kwargs.pop("headers", {})}
            return await http.post(path, headers=headers, **kwargs)

    return asyncio.run(go())


def error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_sdk_edit_one_file_with_extensions(ingress):
    response = sdk(ingress, lambda c: c.images.edit(
        model="tiny-sd", image=("a.png", png(), "image/png"), prompt="a red door", n=2, size="auto",
        response_format="b64_json", output_format="png",
        extra_body={"seed": 7, "strength": 0.4, "num_inference_steps": 3, "guidance_scale": 2.5,
                    "negative_prompt": "blur", "deterministic": True}))
    validate(response.model_dump(exclude_none=True), "ImagesResponse")
    [job] = jobs(ingress)
    assert (job.width, job.height) == (384, 256)  # 300x200 rounded to tiny-sd's rule
    assert (job.seeds, job.strength, job.num_inference_steps, job.guidance_scale) == ((7, 8), 0.4, 3, 2.5)
    assert (job.prompt, job.negative_prompt, job.deterministic) == ("a red door", "blur", True)
    assert job.mask is None and job.event_prefix == "image_edit"
    assert job.image_tokens == (384 // 16) * (256 // 16)
    assert response.usage.input_tokens_details.image_tokens == job.image_tokens
    assert Image.open(io.BytesIO(job.images[0])).size == (384, 256)


def test_sdk_edit_with_mask_uses_the_inpaint_strength(ingress):
    sdk(ingress, lambda c: c.images.edit(model="tiny-sd", image=png(), mask=mask_png(), prompt="x", size="512x512"))
    [job] = jobs(ingress)
    assert (job.width, job.height, job.strength) == (512, 512, 1.0)
    mask = Image.open(io.BytesIO(job.mask))
    assert (mask.mode, mask.size, mask.getextrema()) == ("L", (512, 512), (255, 255))


def test_sdk_raw_bytes_and_default_strength(ingress):
    sdk(ingress, lambda c: c.images.edit(model="tiny-sd", image=png(256, 256), prompt="x"))
    [job] = jobs(ingress)
    assert (job.width, job.height, job.strength) == (256, 256, 0.6)


def test_sdk_two_images_on_a_one_image_model_is_400_image(ingress):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(ingress, lambda c: c.images.edit(model="tiny-sd", image=[png(), png()], prompt="x"))
    assert caught.value.body["param"] == "image"
    assert jobs(ingress) == []


def test_sdk_variation(ingress):
    response = sdk(ingress, lambda c: c.images.create_variation(model="tiny-sd", image=png(), n=2,
                                                                 response_format="b64_json", extra_body={"seed": 3}))
    validate(response.model_dump(exclude_none=True), "ImagesResponse")
    [job] = jobs(ingress)
    assert (job.prompt, job.strength, job.seeds, job.event_prefix) == ("", 0.75, (3, 4), "image_generation")


def test_variation_ignores_a_prompt_and_refuses_several_images(ingress):
    post(ingress, path="/v1/images/variations", data={"model": "tiny-sd", "prompt": "ignored"},
         files={"image": ("a", png())})
    assert jobs(ingress)[0].prompt == ""
    response = post(ingress, path="/v1/images/variations", data={"model": "tiny-sd"},
                    files=[("image[]", ("a", png())), ("image[]", ("b", png()))])
    assert error(response)["param"] == "image"
    assert error(post(ingress, path="/v1/images/variations", json={"model": "tiny-sd"}))["param"] is None


def test_stream_edit_is_image_edit_events(ingress):
    # The stream itself needs a replica; here: the job is marked for image_edit events.
    job = parse_request(ImageEditRequest, {"model": "m", "prompt": "x", "stream": "true", "partial_images": "2"},
                        from_form=True)
    assert (job.stream, job.partial_images) == (True, 2)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_json_edit_with_data_urls(ingress):
    body = {"model": "tiny-sd", "prompt": "x", "images": [{"image_url": data_url(png())}],
            "mask": {"image_url": data_url(mask_png())}, "n": 1, "response_format": "b64_json"}
    response = post(ingress, json=body)
    assert response.status_code == 200, response.text
    validate(response.json(), "ImagesResponse")
    [job] = jobs(ingress)
    assert job.mask is not None and (job.width, job.height) == (384, 256)


@pytest.mark.parametrize(("body", "param"), [
    ({"images": [{"file_id": "file-1"}]}, "images[0].file_id"),
    ({"images": [{"image_url": "https://evil.example.com/a.png"}]}, "images[0].image_url"),
    ({"images": [{"image_url": "http://169.254.169.254/"}]}, "images[0].image_url"),
    ({"images": [{}]}, "images[0]"),
    ({"images": []}, "images"),
    ({"images": "x"}, "images"),
    ({"images": [{"image_url": 5}]}, "images[0].image_url"),
    ({"images": [{"image_url": data_url(png())}], "mask": {"file_id": "f"}}, "mask.file_id"),
    ({"images": [{"image_url": data_url(png())}], "mask": "x"}, "mask"),
    ({"images": [{"image_url": data_url(b"not an image")}]}, "images[0].image_url"),
    ({"images": [{"image_url": data_url(png())}] * 2}, "images"),
    ({"images": [{"image_url": data_url(png())}] * 17}, "images"),
    ({"images": [{"image_url": data_url(png())}], "strength": 0}, "strength"),
    ({"images": [{"image_url": data_url(png())}], "n": "2"}, "n"),
])
def test_json_edit_errors(ingress, body, param):
    assert error(post(ingress, json={"model": "tiny-sd", "prompt": "x", **body}))["param"] == param
    assert jobs(ingress) == []


PNG = png()


@pytest.mark.parametrize(("data", "files", "param"), [
    ({"prompt": "x"}, [], "image"),
    ({"prompt": "x", "image": "text"}, [], "image"),
    ({"prompt": "x", "n": "two"}, [("image", ("a", PNG))], "n"),
    ({"prompt": "x", "n": "11"}, [("image", ("a", PNG))], "n"),
    ({"prompt": "x", "stream": "maybe"}, [("image", ("a", PNG))], "stream"),
    ({"prompt": "x", "strength": "1.5"}, [("image", ("a", PNG))], "strength"),
    ({"prompt": "x", "strength": "nan"}, [("image", ("a", PNG))], "strength"),
    ({"prompt": "x", "size": "100x100"}, [("image", ("a", PNG))], "size"),
    ({"prompt": ""}, [("image", ("a", PNG))], "prompt"),
    ({}, [("image", ("a", PNG))], "prompt"),
    ({"prompt": "x"}, [("image", ("a", PNG)), ("prompt", ("p", b"x"))], "prompt"),
    ({"prompt": "x"}, [("image", ("a.png", b"GIF89a", "image/png"))], "image"),
    ({"prompt": "x"}, [("image", ("a", PNG)), ("mask", ("m", png(10, 10, "RGBA")))], "mask"),
    ({"prompt": "x"}, [("image", ("a", PNG)), ("mask", ("m", png()))], "mask"),
    ({"prompt": "x"}, [("image", ("a", PNG)), ("mask", ("m", PNG)), ("mask", ("m", PNG))], "mask"),
    ({"prompt": "x"}, [("image[]", ("a", PNG))] * 17, "image"),
    ({"prompt": "x"}, [("image[]", ("a", PNG))] * 18, "image"),
])
def test_form_errors(ingress, data, files, param):
    response = post(ingress, data={"model": "tiny-sd", **data}, files=files or {"x": ("x", b"")})
    assert error(response)["param"] == param
    assert jobs(ingress) == []


def test_unknown_model_and_a_model_that_does_not_edit(ingress):
    files = {"image": ("a", PNG)}
    assert error(post(ingress, data={"model": "nope", "prompt": "x"}, files=files), 404)["param"] == "model"
    assert error(post(ingress, data={"model": "tiny-pixart", "prompt": "x"}, files=files))["param"] == "model"


def test_malformed_bodies_are_400(ingress):
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    assert error(post(ingress, content=b"--xyz\r\nbroken", headers=headers))["param"] == "model"  # truncated: empty
    assert error(post(ingress, content=b"--xyz\r\n\r\nno disposition\r\n--xyz--\r\n", headers=headers))["code"] \
        == "invalid_form"
    assert error(post(ingress, content=b"x", headers={"content-type": "multipart/form-data"}))["code"] \
        == "invalid_form"
    assert error(post(ingress, content=b"{not json"))["code"] == "invalid_json"
    assert error(post(ingress, content=b"[]", headers={"content-type": "application/json"}))["param"] is None


def test_models_say_whether_they_edit(ingress):
    async def go():
        transport = httpx.ASGITransport(app=create_api(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return [(await http.get(f"/v1/models/{m}", headers={"authorization": "Bearer sk-1"})).json()
                    for m in ("tiny-sd", "tiny-pixart")]

    sd, pixart = asyncio.run(go())
    assert (sd["supports_edits"], sd["supports_inpainting"], sd["max_input_images"]) == (True, True, 1)
    assert (pixart["supports_edits"], pixart["max_input_images"]) == (False, 0)


def test_fingerprint_covers_fields_and_file_bytes(ingress):
    from serve_app.api.edits import _from_form

    def digest(fields, images):
        request = parse_request(ImageVariationRequest, {"model": "tiny-sd", **fields}, from_form=True)
        return _from_form(request, {"model": "tiny-sd", **fields}, images, None).fingerprint

    assert digest({"n": "2"}, [b"a"]) == digest({"n": "2"}, [b"a"])
    assert digest({"n": "2"}, [b"a"]) != digest({"n": "2"}, [b"b"])
    assert digest({"n": "2"}, [b"a"]) != digest({"n": "3"}, [b"a"])


@pytest.mark.parametrize(("route", "extra", "param"), [
    ("edit", {"strength": 0.2, "num_inference_steps": 4}, "strength"),
    ("edit", {"num_inference_steps": 1}, "num_inference_steps"),  # x the default 0.6
    ("variation", {"num_inference_steps": 1}, "num_inference_steps"),  # x the variation strength 0.75
])
def test_an_edit_that_would_run_no_denoising_step_is_400(ingress, route, extra, param):
    """Found by fuzzing: a variation at 1 step ran no step and failed in the replica (500)."""
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(ingress, lambda c: c.images.edit(model="tiny-sd", image=png(256, 256), prompt="x", extra_body=extra)
            if route == "edit" else c.images.create_variation(model="tiny-sd", image=png(256, 256), extra_body=extra))
    assert caught.value.body["param"] == param
    assert jobs(ingress) == []


def test_an_empty_mask_file_is_400_mask(ingress):
    """Found in review: an empty mask part broke the body's fingerprint (a 500)."""
    response = post(ingress, data={"model": "tiny-sd", "prompt": "x"},
                    files={"image": ("a.png", png()), "mask": ("m.png", b"")})
    assert error(response)["param"] == "mask"
    assert jobs(ingress) == []


def test_a_one_step_preset_is_raised_until_the_edit_runs_a_step():
    """Found in review: sdxl-turbo's 1-step presets at strength 0.5/0.6 ran no step, so every
    default edit or variation was a 400. Preset steps are raised; the request's own are not."""
    from pathlib import Path

    from serve_app.api.presets import edit_schedule
    from serve_app.config import load_model_config

    turbo = load_model_config(Path(__file__).resolve().parents[2] / "models" / "sdxl-turbo.yaml")
    variation = parse_request(ImageVariationRequest, {"model": "sdxl-turbo"}, from_form=True)
    assert edit_schedule(variation, turbo, mask=False, steps=1) == (2, 0.6)
    edit = parse_request(ImageEditRequest, {"model": "sdxl-turbo", "prompt": "x"}, from_form=True)
    assert edit_schedule(edit, turbo, mask=False, steps=1) == (2, 0.5)
    assert edit_schedule(edit, turbo, mask=True, steps=1) == (1, 1.0)
    explicit = parse_request(ImageEditRequest, {"model": "sdxl-turbo", "prompt": "x", "num_inference_steps": "1"},
                             from_form=True)
    with pytest.raises(Exception, match="at least 1") as caught:
        edit_schedule(explicit, turbo, mask=False, steps=1)
    assert caught.value.param == "num_inference_steps"


def test_json_mask_problems_name_the_mask_image_url(ingress):
    """Every mask problem of a JSON edit names `mask.image_url` (format and size alike)."""
    for mask in (mask_png(128, 128), png()):  # another size; no alpha
        response = post(ingress, json={"model": "tiny-sd", "prompt": "x", "images": [{"image_url": data_url(png())}],
                                       "mask": {"image_url": data_url(mask)}})
        assert error(response)["param"] == "mask.image_url", response.text
    assert jobs(ingress) == []


# --- several input images (`image[]`, JSON `images`) and edit-only models -----------------


@pytest.fixture
def multi(tmp_path, monkeypatch):
    """An ingress serving tiny-sd plus two models of a reference family taking up to 3 images:
    `refs` (generations and edits) and `refs-edit-only` (generations: false), made from tiny-flux's
    YAML with FLUX.1 declared a reference family for the test: the HTTP side is all it exercises
    (the handle records the job), independent of any one reference family's own rules."""
    import yaml

    from serve_app import config as config_module

    monkeypatch.setattr(config_module, "REFERENCE_FAMILIES", {"flux"})
    base = yaml.safe_load((config_module.PROJECT_ROOT / "models" / "tiny-flux.yaml").read_text())
    paths = []
    for model_id, extra in (("refs", {}), ("refs-edit-only", {"generations": False})):
        data = {**base, **extra, "id": model_id, "edits": {**base["edits"], "max_input_images": 3, "inpainting": False}}
        path = tmp_path / f"{model_id}.yaml"
        path.write_text(yaml.safe_dump(data))
        paths.append(str(path))
    config = AppConfig.from_args({"models": ["tiny-sd", *paths], "storage": str(tmp_path / "images")}, env={})
    ingress = ImageIngress.func_or_class.__new__(ImageIngress.func_or_class)
    ingress.config, ingress.models = config, config.load_models()
    ingress.handles = {model_id: Handle() for model_id in ingress.models}
    ingress.keys, ingress.metrics, ingress.idempotency = ApiKeys(["sk-1"]), Metrics(), None
    ingress.drain, ingress.readiness = DrainState(None), Ready()
    return ingress


def colored(width: int, height: int, color: tuple[int, int, int], fmt: str = "PNG", mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), color).save(out, format=fmt)
    return out.getvalue()


THREE = [colored(320, 192, (255, 0, 0)), colored(64, 96, (0, 255, 0), "JPEG"), colored(128, 128, (0, 0, 255), "WEBP")]


def sizes_and_colors(job: GenerationJob) -> list[tuple[tuple[int, int], str, tuple[int, int, int]]]:
    opened = [Image.open(io.BytesIO(data)) for data in job.images]
    return [(image.size, image.mode, tuple(round(c / 64) for c in image.getpixel((5, 5)))) for image in opened]


EXPECTED = [((320, 192), "RGB", (4, 0, 0)), ((64, 96), "RGB", (0, 4, 0)), ((128, 128), "RGB", (0, 0, 4))]


def test_sdk_list_of_images_reaches_the_job_in_order_at_their_own_sizes(multi):
    response = sdk(multi, lambda c: c.images.edit(model="refs", image=THREE, prompt="the three of them",
                                                  response_format="b64_json"))
    validate(response.model_dump(exclude_none=True), "ImagesResponse")
    [job] = multi.handles["refs"].jobs
    assert sizes_and_colors(job) == EXPECTED  # references: as uploaded, in request order
    assert (job.width, job.height) == (448, 256)  # size auto: the first image's 320x192, on the model's rule
    assert (job.strength, job.mask) == (1.0, None)
    tokens = (320 // 16) * (192 // 16) + (64 // 16) * (96 // 16) + (128 // 16) * (128 // 16)
    assert job.image_tokens == tokens == response.usage.input_tokens_details.image_tokens


def test_json_images_list_in_order(multi):
    body = {"model": "refs", "prompt": "x", "images": [{"image_url": data_url(data)} for data in THREE]}
    response = post(multi, json=body)
    assert response.status_code == 200, response.text
    validate(response.json(), "ImagesResponse")
    assert sizes_and_colors(multi.handles["refs"].jobs[0]) == EXPECTED


def test_one_image_family_still_gets_its_first_image_at_the_output_size(multi):
    sdk(multi, lambda c: c.images.edit(model="tiny-sd", image=THREE[0], prompt="x", size="256x256"))
    [job] = multi.handles["tiny-sd"].jobs
    assert [Image.open(io.BytesIO(d)).size for d in job.images] == [(256, 256)]
    assert job.image_tokens == 16 * 16


def test_more_images_than_the_card_allows_is_400_image_or_images(multi):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(multi, lambda c: c.images.edit(model="refs", image=[*THREE, THREE[0]], prompt="x"))
    assert caught.value.body["param"] == "image" and "at most 3" in caught.value.body["message"]
    body = {"model": "refs", "prompt": "x", "images": [{"image_url": data_url(THREE[0])}] * 4}
    assert error(post(multi, json=body))["param"] == "images"
    assert multi.handles["refs"].jobs == []


@pytest.mark.parametrize(("second", "code"), [(b"GIF89a not one", "invalid_image_format"),
                                              (THREE[0][:60], "invalid_image"),
                                              (colored(1800, 1100, (0, 0, 0)), "image_too_large")])
def test_each_image_is_checked_and_named(multi, second, code):
    response = post(multi, data={"model": "refs", "prompt": "x"},
                    files=[("image[]", ("a", THREE[0])), ("image[]", ("b", second))])
    assert (error(response)["param"], error(response)["code"]) == ("image[1]", code)
    body = {"model": "refs", "prompt": "x", "images": [{"image_url": data_url(d)} for d in (THREE[0], second)]}
    assert error(post(multi, json=body))["param"] == "images[1].image_url"
    assert multi.handles["refs"].jobs == []


def test_a_reference_model_takes_no_mask_and_no_strength(multi):
    files = [("image[]", ("a", THREE[0])), ("image[]", ("b", THREE[1])), ("mask", ("m", mask_png(320, 192)))]
    assert error(post(multi, data={"model": "refs", "prompt": "x"}, files=files))["param"] == "mask"
    response = post(multi, data={"model": "refs", "prompt": "x", "strength": "0.5"}, files=files[:2])
    assert "strength does not apply" in error(response)["message"]
    assert multi.handles["refs"].jobs == []


def test_generations_on_an_edit_only_model_name_the_edits_route(multi):
    response = post(multi, path="/v1/images/generations", json={"model": "refs-edit-only", "prompt": "x"})
    body = error(response)
    assert body["param"] == "model" and "/v1/images/edits" in body["message"]
    sdk(multi, lambda c: c.images.edit(model="refs-edit-only", image=THREE[:2], prompt="x"))
    assert len(multi.handles["refs-edit-only"].jobs) == 1
    post(multi, path="/v1/images/generations", json={"model": "refs", "prompt": "x"})
    assert len(multi.handles["refs"].jobs) == 1


def test_cards_say_what_each_model_takes(multi):
    async def go():
        transport = httpx.ASGITransport(app=create_api(multi))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            listed = await http.get("/v1/models", headers={"authorization": "Bearer sk-1"})
            return {card["id"]: card for card in listed.json()["data"]}

    cards = asyncio.run(go())
    keys = ("supports_generation", "supports_edits", "supports_inpainting", "max_input_images")
    assert [cards["tiny-sd"][k] for k in keys] == [True, True, True, 1]
    assert [cards["refs"][k] for k in keys] == [True, True, False, 3]
    assert [cards["refs-edit-only"][k] for k in keys] == [False, True, False, 3]


def test_the_edit_body_limit_follows_the_served_models_images(multi):
    from serve_app.api import uploads

    limit = uploads.edit_body_limit(3)
    assert limit == 4 * 50 * 1024 * 1024 * 4 // 3 + 1024 * 1024
    response = post(multi, content=b"", headers={"content-length": str(limit + 1)})
    assert str(limit) in error(response, 413)["message"]
