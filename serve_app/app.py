"""`build_app(args)`: the one Serve `import_path` (`serve_app.app:build_app`), the same for
`serve run`, `serve deploy`, the Ray cluster launcher and KubeRay's serveConfigV2."""

from __future__ import annotations

import logging
from typing import Any

from ray.serve import Application

from serve_app.api.idempotency import IdempotencyStore
from serve_app.api.ingress import ImageIngress
from serve_app.config import AppConfig
from serve_app.replica.server import ModelServer, deployment_options

logger = logging.getLogger("ray.serve")

INGRESS_DEFAULTS: dict[str, Any] = {
    # CPU only, and light: no torch. Many requests in flight, each mostly waiting on a model.
    "ray_actor_options": {"num_cpus": 0.25},
    "max_ongoing_requests": 1000,
    # Ctrl-C / SIGTERM / a redeploy: requests in flight get this long to finish.
    "graceful_shutdown_timeout_s": 120,
}
# What a CPU-only replica asks of `cpu_node_resource`: a sliver, so a node offering 1 holds any number.
CPU_NODE_SHARE = 0.001


def on_cpu_nodes(options: dict[str, Any], resource: str | None) -> dict[str, Any]:
    """`options` with `ray_actor_options.resources` asking for `resource` (an operator's own amount
    of it kept). Ray places a replica on any node with room: a CPU-only one (no GPU asked) fits on
    an idle GPU node and keeps it, and the GPU it costs, from ever being released."""
    if resource is None:
        return options
    actor = dict(options.get("ray_actor_options") or {})
    actor["resources"] = {resource: CPU_NODE_SHARE, **(actor.get("resources") or {})}
    return {**options, "ray_actor_options": actor}


def build_app(args: dict[str, Any]) -> Application:
    config = AppConfig.from_args(args)
    models = config.load_models()
    handles = {
        model_id: ModelServer.options(**deployment_options(model)).bind(model, config)
        for model_id, model in models.items()
    }
    # Replays must not hand out links that have expired: keep entries no longer than links live.
    idempotency = IdempotencyStore.options(
        **on_cpu_nodes({"ray_actor_options": IdempotencyStore.ray_actor_options}, config.cpu_node_resource)
    ).bind(
        ttl_s=min(config.idempotency_ttl_s, config.url_ttl_s),
        max_bytes=config.idempotency_max_bytes,
        lease_s=config.request_timeout_s + 30,
    )
    logger.info("ArtServe: models %s, images in %s", sorted(models), config.storage)
    ingress = on_cpu_nodes({**INGRESS_DEFAULTS, **config.ingress}, config.cpu_node_resource)
    return ImageIngress.options(**ingress).bind(config, models, handles, idempotency)
