"""LoRA adapters through the real app and the OpenAI SDK: `model: "<base>:<adapter>"` and
`extra_body.loras` on generations, edits and streams; requests with different adapters sharing
denoiser calls; a file dropped into the directory while serving becomes usable (and a removed one
unlisted); bad input and bad files refused with a clear 4xx while the service goes on."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import json
import shutil
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.integration.conftest import API_KEY, LORA_MODEL
from tests.loras import save_adapters
from tests.openai_schema import validate

pytestmark = pytest.mark.integration
BASE = {"size": "64x64", "response_format": "b64_json", "output_format": "png"}


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def sha256(server, name: str) -> str:
    return hashlib.sha256((server.loras_dir / LORA_MODEL / f"{name}.safetensors").read_bytes()).hexdigest()


def drop(server, source, name: str) -> None:
    """As docs/loras.md says: copy under a dot name, then rename into place (never half a file)."""
    folder = server.loras_dir / LORA_MODEL
    shutil.copy(source, folder / f".{name}.part")
    (folder / f".{name}.part").rename(folder / f"{name}.safetensors")


def listed(client) -> set[str]:
    return {m.id for m in client.models.list().data}


def wait_until(predicate, timeout_s: float = 15.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, "not within the rescan time"
        time.sleep(0.25)
    return time.monotonic() - started


def test_both_forms_apply_the_adapter_and_report_it(client, server):
    extra = {"seed": 5, "num_inference_steps": 3, "deterministic": True}
    plain = client.images.generate(model=LORA_MODEL, prompt="a fox", **BASE, extra_body=extra)
    red = client.images.generate(model=f"{LORA_MODEL}:red", prompt="a fox", **BASE, extra_body=extra)
    zero = client.images.generate(model=LORA_MODEL, prompt="a fox", **BASE,
                                  extra_body={**extra, "loras": [{"name": "red", "scale": 0}]})
    stacked = client.images.generate(model=f"{LORA_MODEL}:red", prompt="a fox", **BASE,
                                     extra_body={**extra, "loras": [{"name": "blue", "scale": -0.5}]})
    body = red.model_dump(exclude_none=True)
    validate(body, "ImagesResponse")
    assert body["data"][0]["loras"] == [{"name": "red", "scale": 1.0, "sha256": sha256(server, "red")}]
    assert [(a["name"], a["scale"]) for a in stacked.model_dump()["data"][0]["loras"]] == [("red", 1.0), ("blue", -0.5)]
    moved = int(np.abs(pixels(red.data[0].b64_json) - pixels(plain.data[0].b64_json)).max())
    print(f"adapter red moves the 64x64 image by {moved} levels")
    assert moved > 4 and pixels(stacked.data[0].b64_json).tolist() != pixels(red.data[0].b64_json).tolist()
    assert zero.data[0].b64_json == plain.data[0].b64_json  # scale 0: the base image, byte for byte
    assert plain.model_dump(exclude_none=True)["data"][0].get("loras") is None


def test_requests_with_different_adapters_share_denoiser_calls(client):
    def generate(model: str, loras: list | None = None):
        raw = client.images.with_raw_response.generate(
            model=model, prompt="a fox", **BASE, extra_body={"seed": 9, "num_inference_steps": 20, "loras": loras})
        return int(raw.headers["x-artserve-batch-size"]), raw.parse()

    asks = [(f"{LORA_MODEL}:red", None), (LORA_MODEL, [{"name": "blue", "scale": 0.7}]), (LORA_MODEL, None)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda ask: generate(*ask), asks))
    sizes = [size for size, _ in results]
    print(f"largest denoiser batch per request (red, blue, none): {sizes}")
    assert max(sizes) >= 2  # two different adapters, or one and none, in one denoiser call
    solo = client.images.generate(model=f"{LORA_MODEL}:red", prompt="a fox", **BASE,
                                  extra_body={"seed": 9, "num_inference_steps": 20, "deterministic": True})
    assert int(np.abs(pixels(solo.data[0].b64_json) - pixels(results[0][1].data[0].b64_json)).max()) <= 1


def test_edits_and_streams_take_adapters(client, server):
    source = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(source, format="PNG")
    edit = client.images.edit(model=f"{LORA_MODEL}:blue", image=source.getvalue(), prompt="a fox", size="64x64",
                              response_format="b64_json", extra_body={"num_inference_steps": 4,
                                                                      "loras": [{"name": "red", "scale": 0.5}]})
    assert [(a["name"], a["scale"]) for a in edit.model_dump()["data"][0]["loras"]] == [("blue", 1.0), ("red", 0.5)]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": LORA_MODEL, "prompt": "a fox", "stream": True, "partial_images": 1, "size": "64x64",
            "num_inference_steps": 3, "loras": [{"name": "green", "scale": 1.5}]}
    with httpx.stream("POST", f"{server.base_url}/v1/images/generations", json=body, headers=headers,
                      timeout=120) as response:
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                  if line.startswith("data: ")]
    completed = events[-1]
    validate(completed, "ImageGenCompletedEvent")
    assert completed["loras"] == [{"name": "green", "scale": 1.5, "sha256": sha256(server, "green")}]


def test_a_file_dropped_in_while_serving_becomes_usable_and_a_removed_one_unlisted(client, server, tmp_path):
    made = save_adapters("tiny-sd", tmp_path, {"late": 21}, text_encoder=False, strength=3.0)
    drop(server, made["late"], "late")
    waited = wait_until(lambda: f"{LORA_MODEL}:late" in listed(client))
    card = client.models.retrieve(f"{LORA_MODEL}:late").model_dump()
    assert card["base_model"] == LORA_MODEL and card["lora_scale"] == 1.0
    image = client.images.generate(model=f"{LORA_MODEL}:late", prompt="a fox", **BASE,
                                   extra_body={"num_inference_steps": 2})
    assert image.model_dump()["data"][0]["loras"][0]["sha256"] == sha256(server, "late")
    (server.loras_dir / LORA_MODEL / "late.safetensors").unlink()
    unlisted = wait_until(lambda: f"{LORA_MODEL}:late" not in listed(client))
    print(f"listed {waited:.1f}s after the copy, unlisted {unlisted:.1f}s after the removal")
    with pytest.raises(openai.NotFoundError):
        client.images.generate(model=f"{LORA_MODEL}:late", prompt="a fox", **BASE)


def test_bad_input_and_bad_files_are_refused_and_the_service_goes_on(client, server, tmp_path):
    folder = server.loras_dir / LORA_MODEL
    (folder / "broken.safetensors").write_bytes(b"\x00" * 64 + b"not a safetensors file")
    flux = save_adapters("tiny-flux", tmp_path, {"fluxy": 31}, text_encoder=False)
    drop(server, flux["fluxy"], "fluxy")
    wait_until(lambda: {f"{LORA_MODEL}:broken", f"{LORA_MODEL}:fluxy"} <= listed(client))
    cases = [
        ({"model": f"{LORA_MODEL}:broken"}, 400, "model", "not a readable safetensors file"),
        ({"model": LORA_MODEL, "loras": [{"name": "red"}, {"name": "fluxy"}]}, 400, "loras[1].name",
         "another model family"),
        ({"model": f"{LORA_MODEL}:nope"}, 404, "model", "does not exist"),
        ({"model": LORA_MODEL, "loras": [{"name": "nope"}]}, 400, "loras[0].name", "no LoRA adapter"),
        ({"model": LORA_MODEL, "loras": [{"name": "red", "scale": 9}]}, 400, "loras[0].scale", "less than"),
        ({"model": LORA_MODEL, "loras": [{"name": "red", "scale": "x"}]}, 400, "loras[0].scale", "number"),
        ({"model": LORA_MODEL, "loras": [{"name": "red"}] * 5}, 400, "loras", "at most 4"),
        ({"model": f"{LORA_MODEL}:../red"}, 400, "model", "not an adapter name"),
        ({"model": LORA_MODEL, "loras": [{"name": "../../etc/passwd"}]}, 400, "loras[0].name", "pattern"),
    ]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for body, status, param, words in cases:
        r = httpx.post(f"{server.base_url}/v1/images/generations", headers=headers, timeout=60,
                       json={"prompt": "a fox", "size": "64x64", "num_inference_steps": 2, **body})
        error = r.json()["error"]
        print(body, "->", r.status_code, error)
        assert (r.status_code, error["param"]) == (status, param) and words.lower() in error["message"].lower()
        assert str(server.loras_dir) not in error["message"] and r.headers["x-should-retry"] == "false"
    log = server.log.read_text()
    assert "broken.safetensors" in log and "fluxy.safetensors" in log and "refused" in log  # which file, and why
    after = client.images.generate(model=f"{LORA_MODEL}:red", prompt="a fox", **BASE,
                                   extra_body={"num_inference_steps": 2})
    assert after.data[0].b64_json  # everyone else is still served
    for name in ("broken", "fluxy"):
        (folder / f"{name}.safetensors").unlink()
