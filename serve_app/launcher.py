"""`python -m serve_app run CONFIG`: `serve run CONFIG`, plus one line saying when ArtServe is
ready and where, so a person does not have to read Ray's log to know.

    ArtServe ready on http://127.0.0.1:8000 — models: tiny-sd, tiny-flux

Ready means every model of every ArtServe application in the config reports a running
replica on the public `GET /v1/models` (what the ingress itself checks before it routes a
request, so a generation made right after the line is served, not answered "still
loading"). Until then a hint line is printed whenever the set of loading models changes.
Ctrl-C or SIGTERM stops it gracefully (serve_app/api/drain.py): new requests get 503 at once,
requests in flight finish (up to `DRAIN_GRACE_S`), then `serve run` gets the SIGINT it
shuts Serve and Ray down on. A second Ctrl-C kills it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from serve_app.api import drain
from serve_app.ray_env import let_children_take_ctrl_c, with_ray_env

IMPORT_PATH = "serve_app.app:build_app"
POLL_INTERVAL_S = 1.0
SHUTDOWN_GRACE_S = 60  # after the drain: for serve run to stop
DRAIN_GRACE_S = 120  # the deployments' graceful_shutdown_timeout_s
FAILED = {"UNHEALTHY", "DEPLOY_FAILED"}


@dataclass(frozen=True)
class Endpoint:
    """One ArtServe application of the serve config: where its API answers."""

    url: str  # e.g. http://127.0.0.1:8000 or http://127.0.0.1:8000/gcs


def endpoints(config: dict) -> list[Endpoint]:
    http = config.get("http_options") or {}
    host = http.get("host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # listening everywhere: ask locally
    port = http.get("port", 8000)
    return [
        Endpoint(f"http://{host}:{port}{(app.get('route_prefix') or '/').rstrip('/')}")
        for app in config.get("applications", [])
        if app.get("import_path") == IMPORT_PATH
    ]


def _auth_header() -> dict[str, str]:
    """The operator's own key when keys are configured (as serve_app.api.auth reads them):
    /v1/models needs one then."""
    keys = os.environ.get("ARTSERVE_API_KEYS", "").split(",")
    if os.environ.get("ARTSERVE_API_KEYS_FILE"):
        keys += Path(os.environ["ARTSERVE_API_KEYS_FILE"]).read_text().splitlines()
    keys = [k.strip() for k in keys if k.strip()]
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def model_states(endpoint: Endpoint, timeout_s: float = 5) -> dict[str, str] | None:
    """model id -> "ready" | "loading" | "failed", or None while the API does not answer."""
    request = urllib.request.Request(f"{endpoint.url}/v1/models", headers=_auth_header())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            cards = json.load(response)["data"]
    except (OSError, ValueError, KeyError):  # not up yet (connection refused, 404, 503...)
        return None
    states = {}
    for card in cards:
        running, status = card.get("running_replicas", 0), card.get("status", "")
        # A scale-to-zero model is HEALTHY with no replica: its first request starts one.
        states[card["id"]] = "ready" if running > 0 or status == "HEALTHY" else (
            "failed" if status in FAILED else "loading")
    return states


def describe(endpoint: Endpoint, states: dict[str, str]) -> str:
    """The ready line, or the hint while some models are not ready."""
    if all(s == "ready" for s in states.values()):
        return f"ArtServe ready on {endpoint.url} — models: {', '.join(states)}"
    parts = []
    for label, state in [("loading", "loading"), ("failed to start, see the log above", "failed"),
                         ("ready", "ready")]:
        names = [m for m, s in states.items() if s == state]
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    return f"ArtServe starting on {endpoint.url} — {'; '.join(parts)}"


class Launcher:
    def __init__(self, config_path: Path, out=sys.stdout):
        self.config_path = config_path
        self.endpoints = endpoints(yaml.safe_load(config_path.read_text()))
        self.out = out
        self.process: subprocess.Popen | None = None
        self._signals = 0
        self._first_signal_at = 0.0  # the drain's start
        self._stop_sent_at = 0.0  # the SIGINT to serve run
        self.drain_dir = Path(os.environ.get("ARTSERVE_DRAIN_DIR") or tempfile.mkdtemp(prefix="artserve-drain-"))

    def say(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # stdout closed (piped into `head`...): keep serving
            print(line, file=self.out, flush=True)

    def _forward(self, signum, _frame) -> None:
        self._signals += 1
        if self.process is None or self.process.poll() is not None:
            return
        if self._signals == 1:
            self._first_signal_at = time.monotonic()
            self.say("ArtServe stopping: new requests get 503, those in flight finish (Ctrl-C again to kill)…")
            with contextlib.suppress(OSError):
                (self.drain_dir / drain.FLAG).touch()
        else:
            os.killpg(self.process.pid, signal.SIGKILL)

    def _stop_when_drained(self) -> None:
        """Called while waiting: once draining has settled and nothing is in flight (or the
        grace period is over), the SIGINT that stops serve run."""
        if not self._first_signal_at or self._stop_sent_at:
            return
        waited = time.monotonic() - self._first_signal_at
        if waited < drain.SETTLE_S:
            return
        busy = drain.in_flight(self.drain_dir)
        if busy and waited < DRAIN_GRACE_S:
            return
        if busy:
            self.say(f"{busy} request(s) still in flight after {DRAIN_GRACE_S}s; stopping anyway")
        self._stop_sent_at = time.monotonic()
        self.process.send_signal(signal.SIGINT)

    def run(self) -> int:
        serve_bin = Path(sys.executable).with_name("serve")
        command = [str(serve_bin) if serve_bin.exists() else "serve", "run", str(self.config_path)]
        # Its own session: a terminal's Ctrl-C reaches only us, and we pass on exactly one.
        drain.clear(self.drain_dir)  # a flag left by an earlier run would refuse every request
        env = {**with_ray_env(), "ARTSERVE_DRAIN_DIR": str(self.drain_dir)}  # the ingresses' side of the drain
        let_children_take_ctrl_c()  # the SIGINT that stops serve run (below) must not be ignored there
        self.process = subprocess.Popen(command, start_new_session=True, env=env)
        signal.signal(signal.SIGINT, self._forward)
        signal.signal(signal.SIGTERM, self._forward)
        try:
            self.watch()
        except BaseException:  # never leave serve run (in its own session) behind
            self._forward(signal.SIGINT, None)
            self.wait()
            raise
        return self.wait()

    def watch(self) -> None:
        """Print hints until every endpoint is ready (then the ready line), or serve run ends."""
        last: dict[Endpoint, str] = {}
        pending = list(self.endpoints)
        while pending and self.process.poll() is None and not self._signals:
            for endpoint in list(pending):
                states = model_states(endpoint)
                if states is None:
                    continue
                line = describe(endpoint, states)
                if line != last.get(endpoint):
                    self.say(line)
                    last[endpoint] = line
                if line.startswith("ArtServe ready"):
                    pending.remove(endpoint)
            time.sleep(POLL_INTERVAL_S)

    def wait(self) -> int:
        while True:
            try:
                code = self.process.wait(timeout=drain.CHECK_EVERY_S)
                return code if code >= 0 else 128 - code  # killed by signal N: 128+N, as a shell says
            except subprocess.TimeoutExpired:
                self._stop_when_drained()
                if self._stop_sent_at and time.monotonic() - self._stop_sent_at > SHUTDOWN_GRACE_S:
                    self.say(f"serve run did not stop in {SHUTDOWN_GRACE_S}s; killing it")
                    os.killpg(self.process.pid, signal.SIGKILL)


def run(config_path: Path) -> int:
    return Launcher(config_path).run()
