"""One fake multi-node cluster (tests/cluster/harness.py) for the module's tests, with a Redis
behind its GCS, running ArtServe's real app (`serve_app.app:build_app`, deployed with
`serve deploy` as in production) with tiny models given the catalog's production
`ray_actor_options` (`num_gpus: 1`, an accelerator type): the engine runs them on CPU, since a
fake GPU node has a GPU in Ray's books and no CUDA.

The test process is no Ray driver: it talks to the app over HTTP through the head's Serve proxy
(a load balancer that only sends to the head) and to the cluster through its dashboard."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.cluster.harness import ROOT, FakeCluster, node_types_from_cluster_yaml, wait_for

API_KEY = "sk-cluster-test"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
# Worker nodes this machine can hold at once (24 GiB shared): the CPU node for the ingress, two
# L4 nodes (a lost one and its replacement), one H100 node (the pool-cap test).
MAX_WORKERS = {"cpu": 1, "gpu_l4": 2, "gpu_h100": 1}
OBJECT_STORE_BYTES = 80 * 2**20
IDLE_TIMEOUT_MINUTES = 0.1  # an idle GPU node goes after 6 s (cluster.yaml: 10 minutes)
REQUEST_TIMEOUT_S = 60  # the ingress's wait for one generation (production: 600)
STARTUP_TIMEOUT_S = 240
# Tiny weights, production shapes: (model id, tiny base, catalog model whose ray_actor_options it takes).
L4_MODEL, H100_MODEL, A100_MODEL = "tiny-sd-l4", "tiny-flux-h100", "tiny-sd-a100"
SHAPES = [(L4_MODEL, "tiny-sd", "sdxl"), (H100_MODEL, "tiny-flux", "flux-dev"), (A100_MODEL, "tiny-sd", "sdxl")]
AUTOSCALING = {  # scale to zero, with test-sized delays (production: minutes)
    "min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 2,
    "upscale_delay_s": 1, "downscale_delay_s": 20, "metrics_interval_s": 0.5, "look_back_period_s": 2,
}


# The production serve config's: the ingress and the idempotency store stay off GPU nodes.
PRODUCTION_ARGS = yaml.safe_load((ROOT / "serve_config.production.yaml").read_text())["applications"][0]["args"]
CPU_NODE_RESOURCE = PRODUCTION_ARGS["cpu_node_resource"]

# One cluster for all, in this order: each test starts from what the one before left warm (a
# replica still up saves a scale from zero), the GCS tests last (the control ends the cluster).
TEST_ORDER = [
    "test_scale_from_zero_lands_each_model_on_its_pool",
    # Before the node loss: run after it once, the autoscaler's verdict did not come within the timeout.
    "test_a_model_no_node_type_can_hold_gets_a_clear_503",
    "test_a_capped_pool_queues_requests",  # the H100 replica from zero still up
    "test_a_gpu_node_lost_under_load",  # the L4 replica still up
    "test_a_redeploy_settles_and_idle_gpu_nodes_are_released",  # the new L4 replica still up
    "test_a_gcs_restart_with_redis_loses_no_generation",
    "test_control_a_gcs_restart_without_its_stored_state_loses_the_cluster",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slots = [i for i, item in enumerate(items) if item.path.parent == Path(__file__).parent]
    ordered = sorted((items[i] for i in slots), key=lambda item: TEST_ORDER.index(item.name))  # every test listed
    for slot, item in zip(slots, ordered, strict=True):
        items[slot] = item


def catalog_actor_options(model_id: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "models" / f"{model_id}.yaml").read_text())["deployment"]["ray_actor_options"])


def write_models(directory: Path, changes: dict[str, dict[str, Any]] | None = None,
                 downscale_delay_s: float = AUTOSCALING["downscale_delay_s"]) -> None:
    """The tiny models with the catalog's resources; `changes` updates a model's YAML."""
    directory.mkdir(exist_ok=True)
    for model_id, base, production in SHAPES:
        model = yaml.safe_load((ROOT / "models" / f"{base}.yaml").read_text())
        options = catalog_actor_options(production)
        if model_id == A100_MODEL:
            options["accelerator_type"] = "A100"  # no node type of cluster.yaml has one
        autoscaling = {**AUTOSCALING, "downscale_delay_s": downscale_delay_s}
        if model_id == H100_MODEL:
            autoscaling["max_replicas"] = 2
        model.update(id=model_id, deployment={"ray_actor_options": options, "autoscaling_config": autoscaling,
                                              "graceful_shutdown_timeout_s": 5})  # tiny requests end in seconds
        model.update((changes or {}).get(model_id, {}))
        (directory / f"{model_id}.yaml").write_text(yaml.safe_dump(model))


@dataclass
class Reply:
    """One generation as the client saw it."""

    sent_s: float  # time.monotonic() when sent
    took_s: float
    status: int | None  # None: no HTTP response at all
    headers: dict[str, str]
    body: dict[str, Any]
    error: str = ""  # the transport error when status is None

    @property
    def message(self) -> str:
        return (self.body.get("error") or {}).get("message", "")


class ClusterApp:
    """The cluster and the app it serves."""

    def __init__(self, cluster: FakeCluster, models_dir: Path, storage: Path):
        self.cluster, self.models_dir, self.storage = cluster, models_dir, storage
        self.base_url = f"http://127.0.0.1:{cluster.http_port}"

    def serve_config(self, **args: Any) -> dict[str, Any]:
        return {
            "proxy_location": "EveryNode",  # as in production
            "http_options": {"host": "127.0.0.1", "port": self.cluster.http_port},
            "applications": [{
                "name": "artserve", "route_prefix": "/", "import_path": "serve_app.app:build_app",
                "args": {"models": [m for m, _, _ in SHAPES], "models_dir": str(self.models_dir),
                         # One directory every fake node sees: storage all nodes share, as a bucket is.
                         "storage": str(self.storage), "request_timeout_s": REQUEST_TIMEOUT_S,
                         "cpu_node_resource": CPU_NODE_RESOURCE, **args},
            }],
        }

    def deploy(self, **args: Any) -> None:
        """`serve deploy` of the app; `args` change its config (Serve redeploys only on a change)."""
        self.cluster.serve_deploy(self.serve_config(**args))

    def generate(self, model: str, steps: int = 4, timeout_s: float = REQUEST_TIMEOUT_S + 30) -> Reply:
        sent = time.monotonic()
        try:
            response = httpx.post(f"{self.base_url}/v1/images/generations", headers=HEADERS, timeout=timeout_s,
                                  json={"model": model, "prompt": "a lighthouse", "num_inference_steps": steps})
        except httpx.HTTPError as exc:
            return Reply(sent, time.monotonic() - sent, None, {}, {}, repr(exc))
        try:
            body = response.json()
        except ValueError:
            body = {"raw": response.text[:500]}
        return Reply(sent, time.monotonic() - sent, response.status_code, dict(response.headers), body)

    def models(self) -> dict[str, dict[str, Any]]:
        response = httpx.get(f"{self.base_url}/v1/models", headers=HEADERS, timeout=30)
        response.raise_for_status()
        return {card["id"]: card for card in response.json()["data"]}

    def deployment(self, model: str) -> dict[str, Any]:
        return self.cluster.serve_applications()["artserve"]["deployments"][f"ModelServer:{model}"]

    def cpu_only_node_types(self) -> dict[str, set[str]]:
        """The node types the ingress and the idempotency store run on."""
        deployments = self.cluster.serve_applications()["artserve"]["deployments"]
        types = self.node_types()
        return {name: {types.get(r["node_id"], "?") for r in deployments[name]["replicas"]}
                for name in ("ImageIngress", "IdempotencyStore")}

    def replica_nodes(self, model: str) -> list[str]:
        return [r["node_id"] for r in self.deployment(model)["replicas"] if r["state"] == "RUNNING"]

    def node_types(self) -> dict[str, str]:
        """Alive node id -> its node type, as the autoscaler launched it."""
        mapping = self.cluster.autoscaler_status()["autoscalerReport"]["nodeTypeMapping"] or {}
        return {n["node_id"]: mapping.get(n["node_id"], "?") for n in self.cluster.nodes()}

    def nodes_of(self, node_type: str) -> list[str]:
        return [node for node, kind in self.node_types().items() if kind == node_type]

    def wait_serving(self, model: str, timeout_s: float = 120) -> Reply:
        return wait_for(f"{model} answering 200", lambda: (r := self.generate(model)).status == 200 and r, timeout_s)


class Load:
    """Clients generating in a loop through the block; every reply kept, in order of sending."""

    def __init__(self, app: ClusterApp, model: str, *, clients: int, steps: int = 4, pause_s: float = 0.0):
        self.replies: list[Reply] = []
        self._stop = threading.Event()

        def client() -> None:
            while not self._stop.is_set():
                self.replies.append(app.generate(model, steps=steps))
                self._stop.wait(pause_s)

        self._threads = [threading.Thread(target=client) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 40)


class Timeline:
    """What the cluster said about one model, once a second, kept where it changed: the story a
    failing recovery test tells."""

    def __init__(self, app: ClusterApp, model: str):
        self.app, self.model, self.started = app, model, time.monotonic()
        self.events: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1):
            try:
                d = self.app.deployment(self.model)
                types = self.app.node_types()
                replicas = [f"{r['state']}@{types.get(r.get('node_id') or '', '-')}" for r in d["replicas"]]
                now = f"{d['status']}/{d['status_trigger']} {replicas} nodes={sorted(types.values())}"
            except Exception as exc:  # the dashboard between two states
                now = f"({type(exc).__name__})"
            if not self.events or self.events[-1][1] != now:
                self.events.append((time.monotonic() - self.started, now))

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def __str__(self) -> str:
        return "\n".join(f"  +{at:5.1f}s {what}" for at, what in self.events)


# Package scope: the cluster is gone before tests/integration starts its own Ray.
@pytest.fixture(scope="package")
def app() -> Iterator[ClusterApp]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing (the GCS's fault tolerance): `scripts/dev setup` installs it")
    types, head = node_types_from_cluster_yaml(MAX_WORKERS, OBJECT_STORE_BYTES)
    env = {"ARTSERVE_API_KEYS": API_KEY, "HF_HUB_OFFLINE": "1",
           # A proxy on a node left without replicas drains this long before it goes and the node
           # can idle out (production keeps Serve's 30 s: load balancers see the drain).
           "RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S": "5",
           # A dead node is declared dead after ~5 failed health checks 1 s apart, not 15 s: until
           # then the autoscaler counts its GPU as free and launches no replacement (a slow but
           # live node still has 5 checks of 5 s to answer).
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "5000"}
    cluster = FakeCluster(types, head, env=env,
                          idle_timeout_minutes=IDLE_TIMEOUT_MINUTES, head_object_store_bytes=OBJECT_STORE_BYTES,
                          gcs_fault_tolerance=True)
    try:
        started = time.monotonic()
        cluster.start()
        app = ClusterApp(cluster, cluster.root / "models", cluster.root / "images")
        write_models(app.models_dir)
        wait_for("the CPU node (min_workers: 1)", lambda: app.nodes_of("cpu"), STARTUP_TIMEOUT_S, 1)
        app.deploy()
        wait_for("the app RUNNING", lambda: cluster.serve_applications()["artserve"]["status"] == "RUNNING",
                 STARTUP_TIMEOUT_S, 1)
        print(f"\n[cluster] head, CPU node and app up in {time.monotonic() - started:.1f}s")
        yield app
    finally:
        cluster.stop()
