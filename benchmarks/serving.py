"""One `serve run` of ArtServe for a benchmark: model YAMLs variants written to a temporary
directory, its own port and Ray temp dir (whose metrics endpoints replica_costs.py reads),
ready when every model has made an image. Stopped by the caller with `stop` (its own session,
so a plain kill of the benchmark unwinds it too)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from serve_app.ray_env import let_children_take_ctrl_c, with_ray_env

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def variant(model_id: str, new_id: str | None = None, **batching) -> dict:
    """The repo's model YAML, light on logical CPUs, with another id and batching settings."""
    config = yaml.safe_load((ROOT / "models" / f"{model_id}.yaml").read_text())
    config["deployment"] = {"ray_actor_options": {"num_cpus": 0.1}}
    config = {**config, "id": new_id or model_id, "batching": {**config["batching"], **batching}}
    if config["batching"].get("policy") == "call":
        config["edits"] = {**config.get("edits", {}), "enabled": False}  # whole calls cannot edit
    return config


def start(work: Path, ray_tmp: Path, models: list[dict], timeout_s: float = 300,
          env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    directory = work / "models"
    directory.mkdir()
    for config in models:
        (directory / f"{config['id']}.yaml").write_text(yaml.safe_dump(config))
    ids = [config["id"] for config in models]
    port = free_port()
    serve = {"proxy_location": "EveryNode", "http_options": {"host": "127.0.0.1", "port": port},
             "applications": [{"name": "bench", "route_prefix": "/", "import_path": "serve_app.app:build_app",
                               "args": {"models": ids, "models_dir": str(directory), "storage": str(work / "images")}}]}
    (work / "serve.yaml").write_text(yaml.safe_dump(serve))
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - lives as long as the server
    let_children_take_ctrl_c()  # stop() sends SIGINT
    env = {**with_ray_env(), "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    process = subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run", str(work / "serve.yaml")],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, ids, timeout_s, work / "serve.log")
    return process, base


def stop(process: subprocess.Popen, ray_tmp: Path | None = None, grace_s: float = 150) -> None:
    """SIGINT, as an operator stops `serve run`. Replicas drain queued work for up to their
    graceful_shutdown_timeout_s (120 s) first, so wait longer than that; then kill its group
    and the raylet and GCS of this run (they leave the group; their command lines name its own
    temp dir, so no other Ray on the machine is touched); the workers exit with their raylet."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=grace_s)
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if ray_tmp is not None:
        subprocess.run(["pkill", "-KILL", "-f", str(ray_tmp)], check=False)


def wait_ready(base: str, models: list[str], timeout_s: float = 300, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if all(httpx.post(f"{base}/v1/images/generations", timeout=60,
                              json={"model": m, "prompt": "w", "num_inference_steps": 1,
                                    "response_format": "b64_json"}).status_code == 200 for m in models):
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"{base} did not get ready" + (f":\n{log.read_text()[-3000:]}" if log else ""))
