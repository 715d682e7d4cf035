"""`python -m serve_app validate`: every config in the repo passes; broken copies fail with
the file and the field named."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
REPO_CONFIGS = [*sorted(ROOT.glob("models/*.yaml")), ROOT / "serve_config.yaml", ROOT / "serve_config.production.yaml",
                ROOT / "benchmarks/serve_config.yaml"]


def validate(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve_app", "validate", *map(str, paths)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_every_config_in_the_repo_passes():
    result = validate(*REPO_CONFIGS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok: ") == len(REPO_CONFIGS)
    for model in ["flux-dev", "flux-schnell", "sdxl", "sdxl-turbo", "sd3.5-large"]:
        assert f"model {model} " in result.stdout


def broken_copy(tmp_path: Path, source: str, change) -> Path:
    data = yaml.safe_load((ROOT / source).read_text())
    change(data)
    path = tmp_path / Path(source).name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(defualt_size=d.pop("default_size")), "defualt_size: unknown key (misspelled?)"),
        (lambda d: d["sizes"]["allowed"].append("1000x1000"), "size '1000x1000': flux needs sides multiple of 16"),
        (lambda d: d["deployment"]["autoscaling_config"].update(min_replicas=5), "min_replicas"),
        (lambda d: d.update(family="stable-cascade"), "family: Input should be"),
        (lambda d: d["deployment"]["ray_actor_options"].update(num_gpu=1), "ray_actor_options.num_gpu"),
        (lambda d: d["engine"].update(quantisation="fp8"), "engine.quantisation: unknown key"),
        (lambda d: d["engine"].update(cpu_offload="always"), "engine.cpu_offload"),
    ],
)
def test_a_broken_model_fails_naming_file_and_field(tmp_path, change, message):
    path = broken_copy(tmp_path, "models/flux-dev.yaml", change)
    result = validate(path)
    assert result.returncode == 1
    assert f"error: {path}:" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["applications"][0]["args"].update(modles=["x"]), "applications[0] (artserve).args: "
                                                                     "app config: modles: unknown key"),
        (lambda d: d["applications"][0]["args"].update(models=["no-such-model"]), "'no-such-model': no file"),
        (lambda d: d["applications"][0].update(import_path="other:app"), "import_path: expected"),
        (lambda d: d["applications"][0].update(deployments=[{"name": "ModelServer:nope"}]),
         "deployments[0].name: 'ModelServer:nope' is not one of"),
        (lambda d: d["applications"][0].update(deployments=[{"name": "ModelServer:tiny-sd", "num_replica": 2}]),
         "deployments[0] (ModelServer:tiny-sd): unknown Serve deployment option(s): num_replica"),
        (lambda d: d.update(http_option={}), "http_option"),
    ],
)
def test_a_broken_serve_config_fails_naming_file_and_field(tmp_path, change, message):
    path = broken_copy(tmp_path, "serve_config.yaml", change)
    result = validate(path)
    assert result.returncode == 1, result.stdout
    assert f"error: {path}:" in result.stderr
    assert message in result.stderr


def test_hub_models_pin_a_commit():
    """A redeploy must never pull different weights by surprise."""
    for path in ROOT.glob("models/*.yaml"):
        data = yaml.safe_load(path.read_text())
        if not data["source"].startswith(("tiny:", "gs://", "/", ".")):
            assert re.fullmatch(r"[0-9a-f]{40}", str(data.get("revision"))), path.name


def test_the_deprecated_batching_mode_still_validates_and_says_what_to_write(tmp_path):
    def change(d):
        d["batching"]["mode"] = "call"
        d["edits"] = {"enabled": False}

    path = broken_copy(tmp_path, "models/tiny-flux.yaml", change)
    result = validate(path)
    assert result.returncode == 0, result.stderr
    assert f"warning: {path}: batching.mode is deprecated: write `policy: call` instead of `mode: call`" \
        in result.stderr
