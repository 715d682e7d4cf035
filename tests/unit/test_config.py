from pathlib import Path

import pytest
import yaml

from serve_app.config import AppConfig, ConfigError, load_model_config

MODELS = Path(__file__).resolve().parents[2] / "models"


def _write(tmp_path: Path, data: dict, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def tiny_sd() -> dict:
    return yaml.safe_load((MODELS / "tiny-sd.yaml").read_text())


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_model_file_loads(path):
    config = load_model_config(path)
    assert config.id == path.stem
    assert {"1024x1024", "1792x1024", "1024x1792"} <= set(config.sizes.allowed)  # the reference docs' sizes
    if config.source.startswith("tiny:"):
        assert {"256x256", "512x512"} <= set(config.sizes.allowed)


def test_typo_in_a_key_names_the_file_and_key(tmp_path, tiny_sd):
    tiny_sd["batching"]["max_batch_sise"] = tiny_sd["batching"].pop("max_batch_size")
    path = _write(tmp_path, tiny_sd)
    with pytest.raises(ConfigError, match=r"m\.yaml: batching\.max_batch_sise: unknown key"):
        load_model_config(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(family="dalle"), "family"),
        (lambda d: d["sizes"]["allowed"].append("1004x1000"), "multiple of 8"),
        (lambda d: d.update(default_size="640x480"), "not an accepted size"),
        (lambda d: d["quality"].pop("hd"), "quality presets missing"),
        (lambda d: d["style"]["vivid"].update(prompt_template="no placeholder"), "must contain"),
        (lambda d: d["deployment"].update(autoscailing_config={}), "unknown Serve deployment option"),
        (lambda d: d["deployment"].update(autoscaling_config={"max_replica": 2}), r"autoscaling_config\.max_replica"),
        (lambda d: d["deployment"]["ray_actor_options"].update(num_gpu=1), r"ray_actor_options\.num_gpu"),
        (lambda d: d["deployment"].update(autoscaling_config={"min_replicas": 3, "max_replicas": 1}), "invalid Serve"),
        (lambda d: d["deployment"].update(max_ongoing_requests=0), "invalid Serve"),
        (lambda d: d.pop("source"), "source"),
        (lambda d: d.update(family="generic"), "generic pipelines are text-to-image only"),
        (lambda d: d.update(family="qwen-image"), "qwen-image pipelines are text-to-image only"),
        (lambda d: d["batching"].update(policy="call"), "edits need the step engine"),
        (lambda d: d["batching"].update(policy="sjf"), r"batching\.policy"),
        (lambda d: d["batching"].update(mode="turbo"), "not step or call"),
        (lambda d: d["batching"].update(mode="step", policy="cost"), "contradicts policy"),
        (lambda d: d["edits"].update(max_input_images=2), "stable-diffusion edits from one image"),
        (lambda d: d["edits"].update(max_input_images=17), "max_input_images"),
        (lambda d: d.update(generations=False, edits={"enabled": False}), "would serve nothing"),
    ],
)
def test_inconsistent_model_configs_fail_clearly(tmp_path, tiny_sd, change, message):
    change(tiny_sd)
    with pytest.raises(ConfigError, match=message):
        load_model_config(_write(tmp_path, tiny_sd))


def test_a_reference_family_takes_up_to_16_images_and_no_mask(tmp_path, tiny_sd, monkeypatch):
    """No family of this module's catalog is a reference family yet: the test makes SD one."""
    from serve_app import config as config_module

    monkeypatch.setattr(config_module, "REFERENCE_FAMILIES", {"stable-diffusion"})
    tiny_sd["edits"].update(max_input_images=16)
    with pytest.raises(ConfigError, match=r"masks \(inpainting\) are not supported"):
        load_model_config(_write(tmp_path, tiny_sd))
    tiny_sd["edits"].update(inpainting=False)
    config = load_model_config(_write(tmp_path, tiny_sd))
    assert (config.reference_edits, config.edits.max_input_images, config.generations) == (True, 16, True)
    tiny_sd.update(generations=False)
    assert load_model_config(_write(tmp_path, tiny_sd)).generations is False


def test_not_a_mapping(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_model_config(path)


def test_quality_fallbacks(tmp_path, tiny_sd):
    for name in ["low", "medium", "high", "auto"]:
        tiny_sd["quality"].pop(name)
    config = load_model_config(_write(tmp_path, tiny_sd))
    assert config.quality_preset("high") == config.quality["hd"]
    assert config.quality_preset("low") == config.quality["standard"]


def test_env_overrides_app_args(tmp_path):
    config = AppConfig.from_args(
        {"models": ["tiny-sd"], "storage": "/somewhere", "url_ttl_s": 60},
        env={"ARTSERVE_STORAGE": str(tmp_path), "ARTSERVE_URL_TTL_S": "120"},
    )
    assert (config.storage, config.url_ttl_s) == (str(tmp_path), 120)
    assert set(config.load_models()) == {"tiny-sd"}


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ({"models": ["tiny-sd"], "modles_dir": "x"}, {}, "modles_dir: unknown key"),
        ({"models": []}, {}, "models"),
        ({"models": ["tiny-sd"]}, {"ARTSERVE_URL_TTL_S": "1d"}, "url_ttl_s"),
        ({"models": ["tiny-sd"], "ingress": {"max_ongoing_request": 5}}, {}, "unknown Serve"),
        ({"models": ["tiny-sd"]}, {"ARTSERVE_STORAGE": "gs://Bad_Bucket/images"}, "not gs://BUCKET"),
        ({"models": ["tiny-sd"]}, {"ARTSERVE_URL_TTL_S": "604801"}, "url_ttl_s: Input should be less than"),
        ({"models": ["tiny-sd"]}, {"ARTSERVE_STORAGE_RETRY_S": "0"}, "storage_retry_s"),
    ],
)
def test_bad_app_config(args, env, message):
    with pytest.raises(ConfigError, match=message):
        AppConfig.from_args(args, env=env)


def test_gcs_storage_and_its_options_from_the_environment():
    config = AppConfig.from_args(
        {"models": ["tiny-sd"]},
        env={"ARTSERVE_STORAGE": "gs://my-bucket/art/images", "ARTSERVE_SIGNING_SERVICE_ACCOUNT": "sa@p.iam",
             "ARTSERVE_STORAGE_RETRY_S": "2.5", "ARTSERVE_URL_TTL_S": "604800"},
    )
    assert (config.storage, config.signing_service_account) == ("gs://my-bucket/art/images", "sa@p.iam")
    assert (config.storage_retry_s, config.url_ttl_s, config.uses_gcs()) == (2.5, 604800, True)


def test_unknown_model_id_is_a_clear_error():
    with pytest.raises(ConfigError, match="'nope': no file"):
        AppConfig.from_args({"models": ["nope"]}, env={}).load_models()


def test_dev_serve_config_is_valid_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import build_app

    raw = yaml.safe_load((MODELS.parent / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    assert build_app(app.args) is not None


def test_model_entries_may_be_yaml_paths():
    config = AppConfig.from_args({"models": ["tiny-sd", "benchmarks/models/tiny-sd-b1.yaml"]}, env={})
    assert list(config.load_models()) == ["tiny-sd", "tiny-sd-b1"]
    with pytest.raises(ConfigError, match="listed twice"):
        AppConfig.from_args({"models": ["tiny-sd", "models/tiny-sd.yaml"]}, env={}).load_models()


def test_benchmark_twin_differs_from_tiny_sd_only_in_batching():
    twin = yaml.safe_load((MODELS.parent / "benchmarks" / "models" / "tiny-sd-b1.yaml").read_text())
    original = yaml.safe_load((MODELS / "tiny-sd.yaml").read_text())
    different = {key for key in original.keys() | twin.keys() if original.get(key) != twin.get(key)}
    assert different == {"id", "description", "batching"}
    assert twin["batching"]["max_batch_size"] == 1


def test_batching_policy_defaults_to_fixed_and_the_deprecated_mode_maps_onto_it(tmp_path, tiny_sd):
    assert load_model_config(_write(tmp_path, tiny_sd)).batching.policy == "fixed"
    tiny_sd["batching"]["mode"] = "step"  # what the step engine was before policies: today's fixed
    with pytest.warns(FutureWarning, match="write `policy: fixed`"):
        batching = load_model_config(_write(tmp_path, tiny_sd)).batching
    assert (batching.policy, batching.max_batch_size) == ("fixed", 4)
