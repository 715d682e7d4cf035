"""`python -m serve_app run` (what `scripts/dev run` runs): it prints
`ArtServe ready on http://… — models: tiny-sd, tiny-flux` once, and only once a generation
on every model succeeds; SIGTERM shuts `serve run` (and its Ray) down.

Its own `serve run` of the dev config (two tiny models) on a free port, with its own Ray
temp dir, API keys configured (the launcher reads the model list with the operator's key)."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serve_app.api import drain
from tests.integration.conftest import ROOT, _free_port

pytestmark = pytest.mark.integration
READY_TIMEOUT_S = 240
KEY = "sk-ready-line"


def _lines(stream, out: queue.Queue) -> None:
    for raw in iter(stream.readline, b""):
        out.put((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))
    out.put((time.monotonic(), None))


def iter_queue(out: queue.Queue):
    while True:
        try:
            yield out.get_nowait()
        except queue.Empty:
            return


def test_ready_line_comes_when_every_model_generates(tmp_path):
    port = _free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"].update(models_dir=str(ROOT / "models"), storage=str(tmp_path / "images"))
    config_path = tmp_path / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ray_tmp = Path(tempfile.mkdtemp(prefix="artserve-ray-"))
    env = {**os.environ, "ARTSERVE_API_KEYS": KEY, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(ray_tmp), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "serve_app", "run", str(config_path)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    base_url = f"http://127.0.0.1:{port}"
    log, ours = [], []
    try:
        ready_at = None
        deadline = started + READY_TIMEOUT_S
        while ready_at is None:
            try:
                at, line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no ready line in {READY_TIMEOUT_S}s:\n" + "\n".join(log[-60:]))
            assert line is not None, "the launcher exited:\n" + "\n".join(log[-60:])
            log.append(line)
            if line.startswith("ArtServe "):
                ours.append(line)
            if line.startswith("ArtServe ready on"):
                ready_at = at
        # Right after the line, every model generates (no "still loading" 503).
        for model in ["tiny-sd", "tiny-flux"]:
            r = httpx.post(f"{base_url}/v1/images/generations", timeout=120,
                           headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": model, "prompt": "ready?", "num_inference_steps": 1,
                                 "response_format": "b64_json"})
            assert r.status_code == 200, (model, r.status_code, r.text)
        assert ours[-1] == f"ArtServe ready on {base_url} — models: tiny-sd, tiny-flux"
        assert [line for line in ours if line.startswith("ArtServe ready")] == ours[-1:]  # once
        # Any hint before it named what was still loading.
        assert all("loading: " in line or "ready: " in line for line in ours[:-1]), ours
        print(f"\nready line after {ready_at - started:.1f} s; our lines: {ours}")

        _graceful_stop(process, base_url)
        code = process.wait(timeout=90)
        time.sleep(0.5)  # the reader thread's last lines
        after = [line for _, line in iter_queue(lines) if line is not None]  # what the stop printed
        assert code == 0, "\n".join(after[-40:])
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{base_url}/-/healthz", timeout=5)  # serve run shut the proxy down
    finally:
        _stop(process)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _graceful_stop(process: subprocess.Popen, base_url: str) -> None:
    """SIGTERM while a long generation runs: it still gets its image; a new one gets 503."""
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{base_url}/v1/images/generations"
    long_body = {"model": "tiny-sd", "prompt": "in flight", "size": "512x512", "num_inference_steps": 100,
                 "response_format": "b64_json"}
    outcome: dict = {}

    def in_flight() -> None:
        r = httpx.post(url, headers=headers, json=long_body, timeout=120)
        outcome.update(status=r.status_code, body=r.json(), done_at=time.monotonic())

    thread = threading.Thread(target=in_flight)
    thread.start()
    time.sleep(1.5)  # running on the replica by now
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    time.sleep(3 * drain.CHECK_EVERY_S)  # every ingress replica has looked at the flag by now
    refused = httpx.post(url, headers=headers, timeout=30,
                         json={"model": "tiny-sd", "prompt": "too late", "num_inference_steps": 1})
    refused_after_s = time.monotonic() - signalled
    thread.join(timeout=120)
    assert refused.status_code == 503, (refused.status_code, refused.text)
    assert refused.json()["error"]["type"] == "service_unavailable_error"
    assert refused.headers["retry-after"] and refused.headers["x-should-retry"] == "true"
    assert "done_at" in outcome, "the request in flight got no answer"
    assert outcome["status"] == 200 and outcome["body"]["data"][0]["b64_json"], outcome.get("body")
    print(f"SIGTERM: a new request refused (503) {refused_after_s:.2f} s after the signal, the one in flight "
          f"answered 200 {outcome['done_at'] - signalled:.1f} s after it")


def _stop(process: subprocess.Popen) -> None:
    """After a failure: the launcher's `serve run` runs in its own session, so stop it by its
    group too if the launcher does not stop it."""
    if process.poll() is not None:
        return
    children = [c.pid for c in psutil.Process(process.pid).children()]
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
