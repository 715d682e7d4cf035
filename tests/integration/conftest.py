"""One real `serve run` of the dev serve config per test session, on a free port, with API
keys and a temporary image directory; tests talk to it with the official OpenAI SDK.

A second application at `/gcs` stores its images in a bucket of `gcp-storage-emulator`
(started here, over HTTP) and signs links with a service-account key generated here."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from serve_app.ray_env import with_ray_env
from tests.gcs import BUCKET, Emulator, service_account_key
from tests.loras import save_adapters

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-artserve"
SIGNING_KEY = "integration-signing-key"
STARTUP_TIMEOUT_S = 240
# Served only in the tests (the dev config has tiny-sd and tiny-flux).
EXTRA_FAMILIES = ["tiny-sdxl", "tiny-sd3", "tiny-pixart", "tiny-flux2"]
# The Qwen-Image family (generation; Edit Plus, edits only): warmed up with 2 steps (their minimum).
QWEN_MODELS = ["tiny-qwen-image", "tiny-qwen-image-edit"]
# `tiny-sd-lora`: LoRA adapters from <loras_dir>/tiny-sd-lora/ (test_loras.py, test_dashboard.py), at most
# two in memory so that evictions happen; these three are there from the start.
LORA_MODEL, LORA_NAMES = "tiny-sd-lora", {"red": 11, "blue": 12, "green": 13}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _models_dir(work: Path) -> Path:
    """The repo's models, plus `tiny-sd-small`: one request at a time and a queue of one, so
    overload (429 + Retry-After) is reachable with a handful of requests."""
    models = work / "models"
    models.mkdir()
    for path in (ROOT / "models").glob("*.yaml"):
        (models / path.name).write_text(path.read_text())
    # tiny-sd is where tests watch images share denoiser calls (presets, sizes): on this CPU's
    # linear curve the `cost` policy rightly runs one request at a time, so pin `fixed` (the default).
    tiny_sd = yaml.safe_load((ROOT / "models" / "tiny-sd.yaml").read_text())
    tiny_sd["batching"]["policy"] = "fixed"
    (models / "tiny-sd.yaml").write_text(yaml.safe_dump(tiny_sd))
    small = yaml.safe_load((ROOT / "models" / "tiny-sd.yaml").read_text())
    small["id"] = "tiny-sd-small"
    small["batching"] = {"max_batch_size": 1}
    small["deployment"] = {
        "ray_actor_options": {"num_cpus": 0.1},
        "max_ongoing_requests": 1,
        "max_queued_requests": 1,
        "backpressure_config": {"status_code": 429, "retry_after_s": 3},
    }
    (models / "tiny-sd-small.yaml").write_text(yaml.safe_dump(small))
    # A model whose weights are missing: its replica fails to start, once.
    broken = {**small, "id": "tiny-broken", "source": str(work / "no-such-pipeline")}
    broken["deployment"] = {"ray_actor_options": {"num_cpus": 0.1}, "max_constructor_retry_count": 1}
    (models / "tiny-broken.yaml").write_text(yaml.safe_dump(broken))
    # Two autoscaling models with short delays: one is loaded by the test, one stays idle.
    for model_id, base in [("tiny-flux-auto", "tiny-flux"), ("tiny-sd-auto", "tiny-sd")]:
        auto = yaml.safe_load((ROOT / "models" / f"{base}.yaml").read_text())
        auto["id"] = model_id
        auto["deployment"] = {
            "ray_actor_options": {"num_cpus": 0.1},
            "autoscaling_config": {
                "min_replicas": 1, "initial_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                "upscale_delay_s": 1, "downscale_delay_s": 5, "metrics_interval_s": 0.5, "look_back_period_s": 2,
            },
        }
        (models / f"{model_id}.yaml").write_text(yaml.safe_dump(auto))
    for model_id in [*EXTRA_FAMILIES, *QWEN_MODELS]:  # the repo's YAMLs, lighter on logical CPUs (2 in all here)
        extra = yaml.safe_load((ROOT / "models" / f"{model_id}.yaml").read_text())
        extra["deployment"] = {"ray_actor_options": {"num_cpus": 0.05}}
        if model_id == "tiny-sd3":  # streams its previews through a (random) tiny autoencoder: the catalog's decoder
            extra["previews"]["decoder"] = "tae"
            extra["batching"]["policy"] = "cost"  # the cost policy over HTTP (test_scheduling.py)
        (models / f"{model_id}.yaml").write_text(yaml.safe_dump(extra))
    # `tiny-sd-kill`: only the replica-kill test (test_faults.py) uses it, so killing its
    # replica leaves every other test's model alone.
    kill = yaml.safe_load((ROOT / "models" / "tiny-sd.yaml").read_text())
    kill.update(id="tiny-sd-kill", deployment={"ray_actor_options": {"num_cpus": 0.05}})
    (models / "tiny-sd-kill.yaml").write_text(yaml.safe_dump(kill))
    lora = yaml.safe_load((ROOT / "models" / "tiny-sd.yaml").read_text())
    lora.update(id=LORA_MODEL, max_loaded_loras=2, deployment={"ray_actor_options": {"num_cpus": 0.05}})
    lora["sizes"]["min_side"] = 64  # 64x64 images: many short requests
    lora["batching"]["policy"] = "fixed"  # the mixed-adapter test needs its images to share denoiser calls
    (models / f"{LORA_MODEL}.yaml").write_text(yaml.safe_dump(lora))
    gcs = yaml.safe_load((ROOT / "models" / "tiny-flux.yaml").read_text())
    gcs.update(id="tiny-flux-gcs", deployment={"ray_actor_options": {"num_cpus": 0.04}})
    (models / "tiny-flux-gcs.yaml").write_text(yaml.safe_dump(gcs))
    return models


def _all_models_generate(base_url: str) -> bool:
    """Ready means every working model has made an image, not just that the ingress is up."""
    for prefix, model in [("", "tiny-sd"), ("", "tiny-flux"), ("", "tiny-sd-small"), ("", "tiny-flux-auto"),
                          ("", "tiny-sd-auto"), ("", "tiny-sd-kill"), ("/gcs", "tiny-flux-gcs"), ("", LORA_MODEL),
                          *(("", m) for m in EXTRA_FAMILIES)]:
        try:
            r = httpx.post(f"{base_url}{prefix}/v1/images/generations", timeout=30,
                           headers={"Authorization": f"Bearer {API_KEY}"},
                           json={"model": model, "prompt": "warm-up", "num_inference_steps": 1,
                                 "response_format": "b64_json"})
        except httpx.HTTPError:
            return False
        if r.status_code != 200:
            return False
    return _qwen_models_serve(base_url)


def _qwen_models_serve(base_url: str) -> bool:
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(png, format="PNG")
    headers, fields = {"Authorization": f"Bearer {API_KEY}"}, {"prompt": "warm-up", "num_inference_steps": "2",
                                                                 "response_format": "b64_json"}
    try:
        generated = httpx.post(f"{base_url}/v1/images/generations", timeout=30, headers=headers,
                               json={**fields, "model": "tiny-qwen-image", "num_inference_steps": 2})
        edited = httpx.post(f"{base_url}/v1/images/edits", timeout=30, headers=headers,
                            data={**fields, "model": "tiny-qwen-image-edit"},
                            files={"image": ("warm.png", png.getvalue(), "image/png")})
    except httpx.HTTPError:
        return False
    return generated.status_code == edited.status_code == 200


class Server:
    def __init__(self, base_url: str, storage: Path, log: Path, emulator: Emulator, gcs_public_key, pid: int,
                 ray_tmp: Path | None = None, loras_dir: Path | None = None):
        self.base_url, self.storage, self.log, self.pid = base_url, storage, log, pid  # pid: `serve run`'s
        self.loras_dir = loras_dir  # LoRA files: <loras_dir>/<model id>/<name>.safetensors
        self.emulator, self.gcs_public_key = emulator, gcs_public_key
        # This session's own Ray temp dir: its metrics agent lists its Prometheus endpoint in
        # ray/session_latest/prom_metrics_service_discovery.json (tests/integration/test_dashboard.py).
        self.ray_tmp = ray_tmp

    def client(self, api_key: str = API_KEY, prefix: str = "", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}{prefix}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The session's Serve start has its own deadline (STARTUP_TIMEOUT_S): a test's 300 s are its
    own, not shared with that start (on a slow CI machine the first test lost its budget to it)."""
    here = Path(__file__).parent
    for item in items:
        if item.path.parent == here:
            item.add_marker(pytest.mark.timeout(func_only=True))


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Server:
    work = tmp_path_factory.mktemp("serve")
    port = _free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    storage = work / "images"
    app = config["applications"][0]
    app["args"]["models"] += ["tiny-sd-small", "tiny-broken", "tiny-flux-auto", "tiny-sd-auto", "tiny-sd-kill",
                              *EXTRA_FAMILIES, *QWEN_MODELS, LORA_MODEL]
    loras_dir = work / "loras"
    save_adapters("tiny-sd", loras_dir / LORA_MODEL, LORA_NAMES, strength=3.0)
    app["args"].update(models_dir=str(_models_dir(work)), storage=str(storage), loras_dir=str(loras_dir))
    # Two ingress replicas: Idempotency-Key must hold across them (test_idempotency.py).
    app["args"]["ingress"] = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.05}}
    app["args"]["janitor_period_s"] = 2  # test_edge_limits.py watches the janitor delete a file
    config["applications"].append({
        **app, "name": "gcs", "route_prefix": "/gcs",
        "args": {"models": ["tiny-flux-gcs"], "models_dir": app["args"]["models_dir"],
                 "storage": f"gs://{BUCKET}/images", "storage_retry_s": 2,
                 "ingress": {"ray_actor_options": {"num_cpus": 0.05}}},  # 2 logical CPUs in all
    })
    config["http_options"]["port"] = port
    config_path = work / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    emulator = Emulator(work / "gcs").start()
    gcs_public_key = service_account_key(work / "service-account.json")
    # Short (Ray's socket paths must stay under 108 bytes) and not shared with other Ray runs.
    ray_tmp = Path(tempfile.mkdtemp(prefix="artserve-ray-"))
    env = {
        **with_ray_env(),
        "ARTSERVE_API_KEYS": f"{API_KEY},second-key",
        "ARTSERVE_URL_SIGNING_KEY": SIGNING_KEY,
        "STORAGE_EMULATOR_HOST": emulator.host,
        "GOOGLE_APPLICATION_CREDENTIALS": str(work / "service-account.json"),
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(ray_tmp),
    }
    log = work / "serve.log"
    serve_bin = Path(sys.executable).with_name("serve")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(serve_bin), "run", str(config_path)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve run exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve run not ready in {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
            if _all_models_generate(base_url):
                break
            time.sleep(1)
        yield Server(base_url, storage, log, emulator, gcs_public_key, process.pid, ray_tmp, loras_dir)
    finally:
        os.killpg(process.pid, signal.SIGINT)  # serve run shuts Serve and its Ray down on Ctrl-C
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            # Seen once in a full local run (never in subsets): say what serve run was doing.
            warnings.warn("serve run did not stop within 60 s of SIGINT; its log's tail:\n"
                          + log.read_text(errors="replace")[-3000:], stacklevel=1)
        emulator.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return server.client()
