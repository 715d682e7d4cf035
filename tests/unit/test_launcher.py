"""The run command's readiness logic (serve_app/launcher.py), against a real local HTTP
server standing in for the ingress's `GET /v1/models`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from serve_app.launcher import Endpoint, describe, endpoints, model_states

ROOT = Path(__file__).resolve().parents[2]


def test_endpoints_of_the_dev_config_and_of_prefixed_apps():
    assert endpoints(yaml.safe_load((ROOT / "serve_config.yaml").read_text())) == [Endpoint("http://127.0.0.1:8000")]
    config = {
        "http_options": {"host": "0.0.0.0", "port": 9000},
        "applications": [
            {"import_path": "serve_app.app:build_app", "route_prefix": "/"},
            {"import_path": "serve_app.app:build_app", "route_prefix": "/gcs"},
            {"import_path": "other.app:build", "route_prefix": "/other"},
        ],
    }
    assert endpoints(config) == [Endpoint("http://127.0.0.1:9000"), Endpoint("http://127.0.0.1:9000/gcs")]


def test_ready_line_and_hints():
    endpoint = Endpoint("http://127.0.0.1:8000")
    assert describe(endpoint, {"tiny-sd": "ready", "tiny-flux": "ready"}) == (
        "ArtServe ready on http://127.0.0.1:8000 — models: tiny-sd, tiny-flux")
    assert describe(endpoint, {"tiny-sd": "ready", "tiny-flux": "loading", "broken": "failed"}) == (
        "ArtServe starting on http://127.0.0.1:8000 — loading: tiny-flux; "
        "failed to start, see the log above: broken; ready: tiny-sd")


@pytest.fixture
def models_api():
    """A real HTTP server answering /v1/models with what the test sets, 401 without the key."""
    state: dict = {"cards": [], "seen_auth": []}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            state["seen_auth"].append(self.headers.get("Authorization"))
            if self.headers.get("Authorization") != "Bearer k1":
                self.send_response(401)
                self.end_headers()
                return
            body = json.dumps({"object": "list", "data": state["cards"]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Endpoint(f"http://127.0.0.1:{server.server_address[1]}"), state
    server.shutdown()


def test_model_states_from_the_model_cards(models_api, monkeypatch):
    endpoint, state = models_api
    monkeypatch.setenv("ARTSERVE_API_KEYS", " k1 ,k2")
    state["cards"] = [
        {"id": "a", "status": "UPDATING", "running_replicas": 0},
        {"id": "b", "status": "HEALTHY", "running_replicas": 2},
        {"id": "c", "status": "DEPLOY_FAILED", "running_replicas": 0},
        {"id": "d", "status": "HEALTHY", "running_replicas": 0},  # scale to zero: starts on demand
        {"id": "e", "status": "UPSCALING", "running_replicas": 1},
    ]
    assert model_states(endpoint) == {"a": "loading", "b": "ready", "c": "failed", "d": "ready", "e": "ready"}
    assert state["seen_auth"] == ["Bearer k1"]


def test_model_states_is_none_until_the_api_answers(models_api, monkeypatch):
    endpoint, _ = models_api
    monkeypatch.setenv("ARTSERVE_API_KEYS", "wrong")
    assert model_states(endpoint) is None  # 401: not an answer about readiness
    monkeypatch.delenv("ARTSERVE_API_KEYS")
    assert model_states(Endpoint("http://127.0.0.1:9")) is None  # nothing listening


def test_keys_file_is_read_too(models_api, monkeypatch, tmp_path):
    endpoint, state = models_api
    monkeypatch.delenv("ARTSERVE_API_KEYS", raising=False)
    (tmp_path / "keys").write_text("\nk1\nk3\n")
    monkeypatch.setenv("ARTSERVE_API_KEYS_FILE", str(tmp_path / "keys"))
    state["cards"] = [{"id": "a", "status": "HEALTHY", "running_replicas": 1}]
    assert model_states(endpoint) == {"a": "ready"}


def test_serve_run_started_from_a_background_job_still_stops_on_ctrl_c():
    """A shell's `cmd &` starts with SIGINT ignored and a child keeps that across exec: the
    launcher's SIGINT to serve run did nothing (it was killed after 60 s). A child started
    before the call inherits the ignored signal (the control); one started after has Ctrl-C."""
    script = textwrap.dedent("""
        import signal, subprocess, sys
        from serve_app.ray_env import let_children_take_ctrl_c
        probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"]
        before = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
        let_children_take_ctrl_c()
        after = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
        print("ignored before:", before, "after:", after)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # a background job
    assert out.stdout.split() == ["ignored", "before:", "True", "after:", "False"], out
