"""A real multi-node Ray cluster on this machine: a head with no GPU running the v1 autoscaler
over Ray's fake multi-node provider, whose worker node types are cluster.yaml's
`available_node_types` (the same resources, fewer workers). Every node is a real raylet with
its own workers; the autoscaler starts and stops them as it would cloud VMs.

Everything here is this cluster's own: its ports, its temp dir (short: Ray's socket paths must
stay under 108 bytes), its process group. `stop()` kills exactly those processes by pid — never
`ray stop` nor `AutoscalingCluster`, which kill every Ray process on the machine. Fake nodes are
started by the autoscaler and outlive the head, so `stop()` also looks for anything that still
names this cluster's temp dir and checks that nothing is left."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from serve_app.ray_env import with_ray_env

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HEAD_TYPE = "ray.head.default"  # the fake provider names the head's type so, whatever cluster.yaml calls it
# The provider's defaults file is missing from the Ray 2.60 wheel: every key the v1 autoscaler reads.
EMPTY_LAUNCHER_KEYS: dict[str, Any] = {
    "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, period_s: float = 0.5) -> Any:
    """`check()`'s first truthy value, or an AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (httpx.HTTPError, ValueError, KeyError) as exc:  # the cluster is still coming up
            last_error = exc
        time.sleep(period_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f}s (last error: {last_error!r})")


def node_types_from_cluster_yaml(max_workers: dict[str, int], object_store_bytes: int,
                                 path: Path = ROOT / "cluster.yaml") -> tuple[dict[str, Any], dict[str, float]]:
    """The fake provider's `available_node_types` and the head's resources, from cluster.yaml.

    Resources are cluster.yaml's, unchanged: a model whose `ray_actor_options` fit no pool there
    fits none here. Worker counts are capped by `max_workers` (types not named get none: this
    machine holds a few nodes, not a fleet), and each node gets a small object store."""
    cluster = yaml.safe_load(path.read_text())
    types: dict[str, Any] = {}
    head_resources: dict[str, float] = {}
    for name, spec in cluster["available_node_types"].items():
        resources = dict(spec["resources"])
        if name == cluster["head_node_type"]:
            head_resources = resources
            types[HEAD_TYPE] = {"resources": resources, "node_config": {}, "max_workers": 0}
            continue
        cap = max_workers.get(name, 0)
        types[name] = {
            # The provider hands object_store_memory to the node it starts, not to the scheduler.
            "resources": {**resources, "object_store_memory": object_store_bytes},
            "node_config": {},
            "min_workers": min(spec.get("min_workers", 0), cap),
            "max_workers": cap,
        }
    return types, head_resources


class Redis:
    """Debian's redis-server on a free port, in its own directory (GCS fault tolerance)."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Redis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: `scripts/dev setup` installs it (Debian's redis-server)")
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "redis.log", "wb") as log:
            self.process = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root), "--save", "",
                 "--appendonly", "no", "--protected-mode", "no"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root,
            )

        def answers() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_for("redis-server answering PING", lambda: _quiet(answers), 20, 0.2)
        return self

    def command(self, *words: str) -> bytes:
        """One command over RESP; the first line of the reply."""
        request = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(request.encode())
            return s.recv(4096).split(b"\r\n", 1)[0]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def _quiet(check: Callable[[], Any]) -> Any:
    try:
        return check()
    except OSError:
        return None


class FakeCluster:
    """`start()` brings up the head (and, through the autoscaler, each type's min_workers);
    `stop()` kills every process of this cluster and checks that none is left."""

    def __init__(self, node_types: dict[str, Any], head_resources: dict[str, float], *, env: dict[str, str],
                 idle_timeout_minutes: float, head_object_store_bytes: int, gcs_fault_tolerance: bool = False):
        # Short and private: Ray's socket paths live under it and must stay under 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="as-cl-"))
        self.node_types, self.head_resources = node_types, head_resources
        # GCS fault tolerance: the GCS keeps its tables in this Redis, as KubeRay's gcsFaultToleranceOptions do.
        redis = self.redis = Redis(self.root / "redis") if gcs_fault_tolerance else None
        self.reaper: subprocess.Popen | None = None
        self.idle_timeout_minutes = idle_timeout_minutes
        self.head_object_store_bytes = head_object_store_bytes
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.http_port, self.worker_http_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {
            **with_ray_env(),
            **env,
            # Pinned for the head, every node the autoscaler starts (they inherit it) and drivers:
            # unset, Ray turns token auth on whenever ~/.ray has a token, and then nothing connects.
            "RAY_AUTH_MODE": "disabled",
            "RAY_FAKE_CLUSTER": "1",
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            # The head's Serve proxy listens on http_port (the test's "load balancer" sends there);
            # every other node's proxy on worker_http_port (they share it with SO_REUSEPORT).
            "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(self.worker_http_port),
        }
        if redis is not None:
            self.env.update(RAY_REDIS_ADDRESS=redis.address, RAY_external_storage_namespace="artserve-cluster-test")
        self.pgid: int | None = None
        self.http = httpx.Client(timeout=10)

    # ---- lifecycle -------------------------------------------------------------------------
    def autoscaler_config(self) -> dict[str, Any]:
        return {
            "cluster_name": "artserve-fake",
            "max_workers": sum(t.get("max_workers", 0) for t in self.node_types.values()),
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": self.idle_timeout_minutes,
            "provider": {
                "type": "fake_multinode",
                "gcs_address": self.gcs_address,  # else the provider points nodes at port 6379
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": self.node_types,
            "head_node_type": HEAD_TYPE,
            **EMPTY_LAUNCHER_KEYS,
        }

    def start(self) -> FakeCluster:
        # First: whatever happens next, it cleans up if this process dies without running finalizers.
        self.reaper = subprocess.Popen([sys.executable, "-m", "tests.cluster.harness", "reap", str(os.getpid()),
                                        str(self.root)], cwd=ROOT, start_new_session=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.redis is not None:
            self.redis.start()
        config = self.root / "autoscaling.yaml"
        config.write_text(yaml.safe_dump(self.autoscaler_config()))
        resources = {k: v for k, v in self.head_resources.items() if k not in ("CPU", "GPU")}
        ports = {name: free_port() for name in ("ray-client-server-port", "node-manager-port", "object-manager-port",
                                                "metrics-export-port", "dashboard-agent-listen-port",
                                                "dashboard-agent-grpc-port", "runtime-env-agent-port")}
        command = [
            str(BIN / "ray"), "start", "--head", f"--port={self.gcs_port}", f"--temp-dir={self.root}",
            f"--autoscaling-config={config}", f"--num-cpus={self.head_resources.get('CPU', 0)}",
            f"--num-gpus={self.head_resources.get('GPU', 0)}", f"--resources={json.dumps(resources)}",
            f"--object-store-memory={self.head_object_store_bytes}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats",
            *(f"--{name}={port}" for name, port in ports.items()),
        ]
        # Its own process group: the head's processes, and the nodes its autoscaler starts, join it.
        with open(self.root / "ray-start.log", "wb") as log:
            process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=ROOT)
        self.pgid = process.pid
        (self.root / "pgid").write_text(str(self.pgid))  # for the reaper
        if process.wait(120) != 0:
            raise RuntimeError(f"ray start --head failed:\n{(self.root / 'ray-start.log').read_text()[-3000:]}")
        wait_for("the dashboard", lambda: self.http.get(f"{self.dashboard_url}/api/version").is_success, 60)
        return self

    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: its process group, and anything naming its temp dir."""
        return cluster_processes(self.pgid, self.root)

    def stop(self) -> None:
        """Kill every process of this cluster (nodes and Redis included), then check that none is left."""
        with contextlib.suppress(Exception):
            self.http.close()
        if self.reaper is not None:
            self.reaper.kill()
            self.reaper.wait(10)
        for _ in range(5):  # again while any is found: a dying node may still start a worker
            if not (procs := self.processes()):
                break
            kill(procs)
        left = self.processes()
        if self.redis is not None:
            self.redis.stop()
        shutil.rmtree(self.root, ignore_errors=True)
        if left:
            raise RuntimeError(f"cluster processes left running: {[p.pid for p in left]}")

    # ---- faults ------------------------------------------------------------------------------
    def find(self, name: str, arg: str = "") -> list[psutil.Process]:
        """This cluster's live processes called `name` (with `arg` in their command line); one
        that exits while it is being looked at is not found (its workers come and go)."""
        found = []
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                if proc.name() == name and (not arg or arg in proc.cmdline()):
                    found.append(proc)
        return found

    def node_tree(self, node_id: str) -> list[psutil.Process]:
        """A node's raylet and every process under it: its agents, its workers, its replicas —
        what goes when the machine goes."""
        for raylet in self.find("raylet", f"--node_id={node_id}"):
            with contextlib.suppress(psutil.Error):
                return [raylet, *raylet.children(recursive=True)]
        raise AssertionError(f"no raylet for node {node_id}")

    def kill_node(self, node_id: str) -> list[str]:
        """SIGKILL a node's whole process tree at once, as when its machine goes; their names."""
        tree = self.node_tree(node_id)
        names = []
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                names.append(proc.name())
        kill(tree)
        return names

    def kill_gcs(self) -> tuple[list[str], dict[str, str], str]:
        """SIGKILL the head's GCS server; what it takes to start it again as it was."""
        [gcs] = self.find("gcs_server")
        saved = gcs.cmdline(), gcs.environ(), gcs.cwd()
        gcs.kill()
        gcs.wait(10)
        return saved

    def start_gcs(self, saved: tuple[list[str], dict[str, str], str]) -> None:
        """The GCS server again, as a head pod's restart would bring it (its command names this
        cluster's temp dir, so `stop()` finds it)."""
        command, env, cwd = saved
        subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)

    # ---- what the cluster says (its dashboard's REST API: no Ray driver in the test process) ----
    def _state(self, resource: str, **params: str) -> list[dict[str, Any]]:
        response = self.http.get(f"{self.dashboard_url}/api/v0/{resource}",
                                 params={"limit": "1000", "detail": "1", **params})
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def nodes(self, alive_only: bool = True) -> list[dict[str, Any]]:
        return [n for n in self._state("nodes") if not alive_only or n["state"] == "ALIVE"]

    def actors(self, alive_only: bool = True) -> list[dict[str, Any]]:
        return [a for a in self._state("actors") if not alive_only or a["state"] == "ALIVE"]

    def placement_groups(self) -> list[tuple[str, Any]]:
        return [(p.get("state"), p.get("bundles")) for p in self._state("placement_groups")]

    def autoscaler_status(self) -> dict[str, Any]:
        response = self.http.get(f"{self.dashboard_url}/api/cluster_status")
        response.raise_for_status()
        return response.json()["data"]["clusterStatus"] or {}

    def serve_applications(self) -> dict[str, Any]:
        response = self.http.get(f"{self.dashboard_url}/api/serve/applications/")
        response.raise_for_status()
        return response.json().get("applications", {})

    def serve_deploy(self, config: dict[str, Any]) -> None:
        path = self.root / "serve_config.yaml"
        path.write_text(yaml.safe_dump(config))
        subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", self.dashboard_url], env=self.env,
                       check=True, capture_output=True, timeout=120, cwd=ROOT)


def cluster_processes(pgid: int | None, root: Path) -> list[psutil.Process]:
    """A cluster's live processes: its process group (Ray retitles its workers, so their command
    lines name nothing), anything whose command line names its temp dir, and anything working
    in it (its Redis)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            mine = ((pgid is not None and os.getpgid(proc.pid) == pgid)
                    or any(str(root) in part for part in proc.info["cmdline"] or [])
                    or Path(proc.cwd()).is_relative_to(root))
        except (ProcessLookupError, psutil.Error):
            continue
        if mine and proc.pid != os.getpid() and _alive(proc):  # a zombie is gone, only not yet reaped
            found.append(proc)
    return found


def kill(procs: list[psutil.Process]) -> None:
    """SIGKILL, until none is alive (three rounds: a dying raylet may still start a worker)."""
    for _ in range(3):
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        deadline = time.monotonic() + 10
        while (procs := [p for p in procs if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not procs:
            return


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE  # a zombie is dead, only not yet reaped by its parent
    except psutil.Error:
        return False


def reap(test_pid: int, root: Path) -> None:
    """Wait for the test process to end, however it ends (a SIGKILL runs no finalizer), then
    kill what `FakeCluster.stop()` would have."""
    while psutil.pid_exists(test_pid) and _alive(psutil.Process(test_pid)):
        time.sleep(1)
    pgid_file = root / "pgid"
    kill(cluster_processes(int(pgid_file.read_text()) if pgid_file.exists() else None, root))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # python -m tests.cluster.harness reap TEST_PID ROOT
    _, command, test_pid, root = sys.argv
    assert command == "reap"
    reap(int(test_pid), Path(root))
