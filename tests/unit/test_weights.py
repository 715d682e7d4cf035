"""Weight sources: gs:// copied once from the emulator and loaded; unreachable or missing
sources fail with a message that names the model, the source and the fix."""

from pathlib import Path

import pytest

from serve_app.config import load_model_config
from serve_app.engine.tiny import ensure_tiny_model
from serve_app.engine.weights import WeightsUnavailable, copy_from_gcs, load_pipeline, resolve_source
from serve_app.storage.gcs import gcs_client
from tests.gcs import BUCKET

MODELS = Path(__file__).resolve().parents[2] / "models"


def model(source: str, **changes):
    return load_model_config(MODELS / "tiny-sd.yaml").model_copy(update={"source": source, **changes})


def test_gs_source_is_copied_once_and_loads(gcs_env, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ARTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    local = ensure_tiny_model("tiny-sd", tmp_path / "built")
    bucket = gcs_client().bucket(BUCKET)
    files = [p for p in local.rglob("*") if p.is_file()]
    for path in files:
        bucket.blob(f"weights/tiny-sd/{path.relative_to(local)}").upload_from_filename(str(path))
    sd = model(f"gs://{BUCKET}/weights/tiny-sd")
    with caplog.at_level("INFO"):
        pipeline = load_pipeline(sd, dtype=None)
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    target = Path(resolve_source(sd))
    assert target.is_relative_to(tmp_path / "cache")
    assert sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file() and p.name != ".complete") == \
        sorted(p.relative_to(local) for p in files)
    assert f"copied {len(files)}/{len(files)} files" in caplog.text
    bucket.blob("weights/tiny-sd/model_index.json").delete()  # a second start does not read the bucket
    assert copy_from_gcs(sd) == target


def test_gs_prefix_without_a_pipeline(gcs_env, tmp_path, monkeypatch):
    monkeypatch.setenv("ARTSERVE_CACHE_DIR", str(tmp_path))
    with pytest.raises(WeightsUnavailable, match=r"model tiny-sd: gs://artserve-test/nothing-here holds no "
                                                 r"diffusers pipeline .* gcloud storage cp"):
        resolve_source(model(f"gs://{BUCKET}/nothing-here"))


def test_unreachable_bucket(tmp_path, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("ARTSERVE_CACHE_DIR", str(tmp_path))
    with pytest.raises(WeightsUnavailable, match=r"model tiny-sd: cannot list gs://artserve-test/w: .*objectViewer"):
        copy_from_gcs(model(f"gs://{BUCKET}/w"), retry_s=1)


def test_hub_source_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable) as raised:
        load_pipeline(model("black-forest-labs/FLUX.1-dev", revision="main"), dtype=None)
    message = str(raised.value)
    assert message.startswith("model tiny-sd: cannot load black-forest-labs/FLUX.1-dev@main")
    assert "huggingface-cli download black-forest-labs/FLUX.1-dev" in message


def test_local_directory_without_a_pipeline(tmp_path):
    with pytest.raises(WeightsUnavailable, match=r"model tiny-sd: .* \(no model_index.json\)"):
        resolve_source(model(str(tmp_path)))


def test_hub_loads_use_hf_token_and_the_cache_and_explain_gated_repos(monkeypatch):
    """The Hub is unreachable here: stand in for it at from_pretrained, the boundary."""
    from diffusers import DiffusionPipeline

    seen = {}

    def gated(source, **kwargs):
        seen.update(kwargs, source=source)
        raise OSError("401 Client Error. Cannot access gated repo for url https://huggingface.co/...")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", gated)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("ARTSERVE_HF_CACHE", "/cache/hf")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    flux = load_model_config(MODELS / "flux-dev.yaml")
    with pytest.raises(WeightsUnavailable, match=r"gated or private.*HF_TOKEN"):
        load_pipeline(flux, dtype=None)
    assert seen == {"source": "black-forest-labs/FLUX.1-dev", "torch_dtype": None, "revision": flux.revision,
                    "token": "hf_test_token", "cache_dir": "/cache/hf"}
