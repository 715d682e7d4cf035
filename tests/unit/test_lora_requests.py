"""LoRA adapters on the HTTP side, in process (no Ray): the catalog (YAML + a rescanned directory),
`model: "<base>:<adapter>"` and `extra_body.loras` through the real `create_api` and the official
OpenAI SDK (a fake model handle records the job), every refusal a 400/404 naming its field, the
adapters listed as models, the response's report schema-valid; and the router's preference."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import httpx
import openai
import pytest

from serve_app.api.edits import form_loras
from serve_app.config import ConfigError, LoraSource, ModelConfig, load_model_config
from serve_app.errors import InvalidRequestError
from serve_app.job import AppliedLora, GenerationJob, GenerationResult, LoraChoice
from serve_app.lora_catalog import LoraCatalog
from serve_app.replica.routing import AdapterAffinityRouter, first_adapter, ranked
from tests.loras import MODELS
from tests.openai_schema import validate
from tests.unit import test_edit_requests as edit_requests
from tests.unit.test_edit_requests import ingress as edit_ingress  # noqa: F401 (a fixture)
from tests.unit.test_edit_requests import png, sdk

SHA = "ab" * 32


class Handle(edit_requests.Handle):
    """The edit tests' fake model handle, reporting the job's adapters as applied."""

    def remote(self, job: GenerationJob):
        result = super().remote(job)

        async def with_loras() -> GenerationResult:
            return replace(await result, loras=tuple(AppliedLora(c.name, c.scale, SHA) for c in job.loras))

        return with_loras()


@pytest.fixture
def loras_dir(tmp_path):
    folder = tmp_path / "loras" / "tiny-sd"
    folder.mkdir(parents=True)
    for name in ("red", "blue", "v1.5", ".partial", "bad name"):
        (folder / f"{name}.safetensors").write_bytes(b"not read by the ingress")
    (folder / "notes.txt").write_text("ignored")
    return tmp_path / "loras"


@pytest.fixture
def ingress(edit_ingress, loras_dir):  # noqa: F811 (the imported fixture)
    """The edit tests' ingress (real create_api, fake handles), with adapters in `loras_dir`."""
    edit_ingress.config = edit_ingress.config.model_copy(update={"loras_dir": str(loras_dir)})
    edit_ingress.handles = {"tiny-sd": Handle(), "tiny-pixart": Handle()}
    return edit_ingress


def test_the_directory_is_rescanned_and_the_yaml_adds_and_wins(tmp_path, loras_dir):
    now = [0.0]
    model = load_model_config(MODELS / "tiny-sd.yaml").model_copy(update={"loras": {
        "red": LoraSource(source="/srv/red-v2.safetensors", scale=0.7, description="the YAML's red"),
        "hub": LoraSource(source="owner/repo", weight_name="x.safetensors", revision="0" * 40)}})
    pixart = load_model_config(MODELS / "tiny-pixart.yaml")
    catalog = LoraCatalog(str(loras_dir), {"tiny-sd": model, "tiny-pixart": pixart}, clock=lambda: now[0])
    assert list(catalog.entries("tiny-sd")) == ["blue", "hub", "red", "v1.5"]  # no dot file, no bad name
    assert catalog.get("tiny-sd", "red").source.scale == 0.7 and catalog.get("tiny-sd", "blue").source.scale == 1.0
    (loras_dir / "tiny-sd" / "green.safetensors").write_bytes(b"x")
    (loras_dir / "tiny-sd" / "blue.safetensors").unlink()
    assert "green" not in catalog.entries("tiny-sd")  # within the rescan period: the last listing
    assert catalog.get("tiny-sd", "blue") is None  # a removed file is never handed out, even within the period
    assert "green" in catalog.entries("tiny-sd")  # ... that looked again
    (loras_dir / "tiny-sd" / "yellow.safetensors").write_bytes(b"x")
    assert catalog.get("tiny-sd", "yellow").origin == "directory"  # a name asked for is looked up at once
    now[0] = 2.5
    assert list(catalog.entries("tiny-sd")) == ["green", "hub", "red", "v1.5", "yellow"]
    assert not catalog.supports("tiny-pixart") and catalog.entries("tiny-pixart") == {}


@pytest.mark.parametrize("loras,message", [
    ({"x": {"source": "owner/repo"}}, "weight_name"),
    ({"x": {"source": "/srv/x.ckpt"}}, "safetensors"),
    ({"x/y": {"source": "/srv/x.safetensors"}}, "valid adapter name"),
    ({"x": {"source": "/srv/x.safetensors", "scale": 3}}, "less than or equal to 2"),
    ({"x": {"source": "/srv/x.safetensors", "sacle": 1}}, "unknown key"),
])
def test_the_yaml_block_is_strict(tmp_path, loras, message):
    import yaml

    data = yaml.safe_load((MODELS / "tiny-sd.yaml").read_text())
    path = tmp_path / "tiny-sd.yaml"
    path.write_text(yaml.safe_dump({**data, "loras": loras}))
    with pytest.raises(ConfigError, match=message):
        load_model_config(path)
    generic = yaml.safe_load((MODELS / "tiny-pixart.yaml").read_text())
    with pytest.raises(ValueError, match="step engine"):
        ModelConfig.model_validate({**generic, "loras": {"x": {"source": "/srv/x.safetensors"}}})


def test_both_ways_of_asking_reach_the_job_in_order(ingress):
    async def generate(client):
        return await client.images.generate(model="tiny-sd:red", prompt="a fox", extra_body={
            "loras": [{"name": "blue", "scale": -0.5}, {"name": "v1.5"}]})

    response = sdk(ingress, generate)
    [job] = ingress.handles["tiny-sd"].jobs
    assert [(c.name, c.scale, c.param) for c in job.loras] == [
        ("red", 1.0, "model"), ("blue", -0.5, "loras[0].name"), ("v1.5", 1.0, "loras[1].name")]
    body = response.model_dump(exclude_none=True)
    validate(body, "ImagesResponse")
    assert body["data"][0]["loras"] == [{"name": "red", "scale": 1.0, "sha256": SHA},
                                        {"name": "blue", "scale": -0.5, "sha256": SHA},
                                        {"name": "v1.5", "scale": 1.0, "sha256": SHA}]


def test_an_edit_takes_them_as_the_sdk_sends_a_form(ingress):
    async def edit(client):
        return await client.images.edit(model="tiny-sd", image=png(), prompt="a fox", extra_body={
            "loras": [{"name": "red", "scale": 0.25}, {"name": "blue", "scale": 2}]})

    sdk(ingress, edit)
    [job] = ingress.handles["tiny-sd"].jobs
    assert [(c.name, c.scale) for c in job.loras] == [("red", 0.25), ("blue", 2.0)] and job.images
    assert form_loras([("loras[1][name]", "b"), ("loras[0][name]", "a"), ("loras[1][scale]", "2")]) == [
        {"name": "a"}, {"name": "b", "scale": "2"}]
    assert form_loras([("loras[][name]", "a"), ("loras[][name]", "b"), ("loras[][scale]", "1"),
                       ("loras[][scale]", "2")]) == [{"name": "a", "scale": "1"}, {"name": "b", "scale": "2"}]
    with pytest.raises(InvalidRequestError, match="same fields"):  # which name would the one scale go with?
        form_loras([("loras[][name]", "a"), ("loras[][name]", "b"), ("loras[][scale]", "2")])


@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny-sd:nope"}, 404, "model"),
    ({"model": "tiny-sd:../red"}, 400, "model"),
    ({"model": "tiny-pixart:red"}, 404, "model"),
    ({"model": "tiny-sd", "loras": [{"name": "red"}, {"name": "nope"}]}, 400, "loras[1].name"),
    ({"model": "tiny-sd", "loras": [{"name": "a/b"}]}, 400, "loras[0].name"),
    ({"model": "tiny-sd", "loras": [{"name": ".."}]}, 400, "loras[0].name"),
    ({"model": "tiny-sd", "loras": [{"name": "red", "scale": 2.5}]}, 400, "loras[0].scale"),
    ({"model": "tiny-sd", "loras": [{"name": "red", "scale": "0.5"}]}, 400, "loras[0].scale"),
    ({"model": "tiny-sd", "loras": [{"name": "red", "path": "/etc"}]}, 400, "loras[0]"),
    ({"model": "tiny-sd", "loras": {"name": "red"}}, 400, "loras"),
    ({"model": "tiny-sd", "loras": [{"name": "red"}] * 5}, 400, "loras"),
    ({"model": "tiny-sd:red", "loras": [{"name": n} for n in ("blue", "v1.5", "red")]}, 400, "loras[2].name"),
    ({"model": "tiny-sd:red", "loras": [{"name": n} for n in ("blue", "v1.5", "red", "x")]}, 400, "loras"),
    ({"model": "tiny-pixart", "loras": [{"name": "red"}]}, 400, "loras"),
])
def test_refusals_name_the_field(ingress, body, status, param):
    async def post(client):
        return await client.post("/images/generations", body={"prompt": "a fox", **body}, cast_to=httpx.Response)

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(ingress, post)
    error = caught.value.body
    print(body, "->", caught.value.status_code, error)
    assert caught.value.status_code == status and error["param"] == param
    assert not ingress.handles["tiny-sd"].jobs


def test_adapters_are_listed_as_models_of_their_own(ingress):
    async def models(client):
        return [m.model_dump() for m in (await client.models.list()).data], await client.models.retrieve("tiny-sd:red")

    listed, one = sdk(ingress, models)
    ids = [m["id"] for m in listed]
    assert ids == ["tiny-sd", "tiny-sd:blue", "tiny-sd:red", "tiny-sd:v1.5", "tiny-pixart"]
    red = next(m for m in listed if m["id"] == "tiny-sd:red")
    assert red["base_model"] == "tiny-sd" and red["lora_scale"] == 1.0 and red["object"] == "model"
    assert one.id == "tiny-sd:red"
    with pytest.raises(openai.NotFoundError):
        sdk(ingress, lambda client: client.models.retrieve("tiny-sd:nope"))


class Replica:
    def __init__(self, name: str, loras: list[str]):
        self.replica_id, self.routing_stats = name, {"loras": loras}


class Pending:
    def __init__(self, job):
        self.args = [job]


def test_the_router_prefers_a_holder_unless_it_is_a_batch_busier():
    plain = GenerationJob("r", "p", None, 64, 64, 2, 1.0, (1,), "png", 100, "b64_json", "http://t")
    job = replace(plain, loras=(LoraChoice("red", 1.0, "model"), LoraChoice("blue", 1.0, "loras[0].name")))
    assert first_adapter(Pending(job)) == "red" and first_adapter(Pending(plain)) is None
    assert ranked("h", "o", holder_queue=5, other_queue=1, imbalance=4) == [["h"], ["o"]]
    assert ranked("h", "o", holder_queue=6, other_queue=1, imbalance=4) == [["o"], ["h"]]
    router = AdapterAffinityRouter.__new__(AdapterAffinityRouter)
    router.initialize_state(imbalance=2)
    queues = {"a": 2, "b": 0, "c": 0}
    router._queue = lambda replica: queues[replica.replica_id]
    replicas = [Replica("a", ["red"]), Replica("b", []), Replica("c", ["blue"])]
    for _ in range(20):
        first, second = asyncio.run(router.choose_replicas(replicas, Pending(job)))
        assert first[0].replica_id == "a" and second[0].replica_id in ("b", "c")
    queues["a"] = 3  # now more than 2 longer than the others
    for _ in range(20):
        first, second = asyncio.run(router.choose_replicas(replicas, Pending(job)))
        assert first[0].replica_id in ("b", "c") and second[0].replica_id == "a"

