"""Which models can take a request right now, from Serve's own status, polled in the
background by the ingress. A model with no running replica answers 503 at once (loading,
crashed or failed to deploy) instead of leaving the client waiting on a queue no replica
will drain. Scale-to-zero models are the exception: their first request starts a replica."""

from __future__ import annotations

import asyncio
import logging

from ray import serve

logger = logging.getLogger("ray.serve")
POLL_INTERVAL_S = 2.0
FAILED = {"UNHEALTHY", "DEPLOY_FAILED"}


def deployment_name(model_id: str) -> str:
    return f"ModelServer:{model_id}"


class ModelReadiness:
    def __init__(self, scale_to_zero: set[str]):
        self._scale_to_zero = scale_to_zero
        self._status: dict[str, tuple[str, int]] = {}  # deployment -> (status, running replicas)
        self._task: asyncio.Task | None = None
        self._first_poll: asyncio.Event | None = None

    async def state(self, model_id: str) -> tuple[str, int]:
        """Serve's status of the model's deployment and its running replicas (last poll)."""
        if self._task is None:  # started lazily: replica constructors have no running loop
            self._first_poll = asyncio.Event()
            self._task = asyncio.create_task(self._poll())
        await self._first_poll.wait()  # type: ignore[union-attr]
        return self._status.get(deployment_name(model_id), ("UNKNOWN", 0))

    async def not_ready_reason(self, model_id: str) -> str | None:
        """None when the model can take a request; otherwise why not, for the client."""
        status, running = await self.state(model_id)
        if running > 0 or status == "UNKNOWN":  # no news is not bad news: let Serve route it
            return None
        if status in FAILED:
            return f"Model '{model_id}' failed to start; an operator must check its logs."
        if model_id in self._scale_to_zero:
            return None
        return f"Model '{model_id}' is still loading; try again shortly."

    async def _poll(self) -> None:
        app = serve.get_replica_context().app_name
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                deployments = status.applications[app].deployments
                self._status = {
                    name: (str(getattr(d.status, "value", d.status)),
                           int(d.replica_states.get("RUNNING", 0)))
                    for name, d in deployments.items()
                }
            except Exception as exc:  # keep serving on the last known status
                logger.warning("readiness poll failed: %r", exc)
            self._first_poll.set()  # type: ignore[union-attr]
            await asyncio.sleep(POLL_INTERVAL_S)
