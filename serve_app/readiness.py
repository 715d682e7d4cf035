"""Which models can take a request right now, from Serve's own status, polled in the
background by the ingress. A model with no running replica answers 503 at once (loading,
crashed or failed to deploy) instead of leaving the client waiting on a queue no replica
will drain. Scale-to-zero models are the exception: their first request starts a replica.

Two states look alike in Serve's status and mean different things to a client: a replica
that failed to start (an operator must act) and a replica lost with its node or process,
which Serve replaces by itself (retry). And one state Serve cannot see at all: a replica
that no node of the cluster can ever hold (no node type has its accelerator): the Ray
autoscaler says so in its events. A model whose replica is lost, failed or unplaceable answers
503 at once, and a request already waiting for it is released with the same 503 instead of
waiting out its timeout for a replica that cannot come."""

from __future__ import annotations

import ast
import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from ray import serve

from serve_app.errors import ServiceUnavailableError

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
POLL_INTERVAL_S = 2.0
FAILED = {"UNHEALTHY", "DEPLOY_FAILED"}
# Serve's trigger when a running replica stopped answering its health checks: its process or
# its node died (or the model's own check_health failed). Serve starts a replacement itself.
LOST_TRIGGERS = {"HEALTH_CHECK_FAILED"}
# The autoscaler repeats its verdict every 30 s while the demand stands (v1; v2 at each
# update): an older one says nothing about the cluster of now.
INFEASIBLE_WINDOW_S = 120.0
INFEASIBLE = re.compile(r"No available node types can fulfill resource requests? (.*)")
NOT_READY_RETRY_AFTER_S = 10  # loading, or a lost replica being replaced
# Retrying soon cannot help until an operator adds a node type; the autoscaler re-checks every 30 s.
UNPLACEABLE_RETRY_AFTER_S = 60
ACCELERATOR_PREFIX = "accelerator_type:"


def deployment_name(model_id: str) -> str:
    return f"ModelServer:{model_id}"


@dataclass(frozen=True)
class DeploymentState:
    """One model deployment in Serve's status (last poll)."""

    status: str = "UNKNOWN"
    trigger: str = ""
    running: int = 0
    starting: int = 0


def replica_demand(ray_actor_options: Mapping[str, Any]) -> dict[str, float]:
    """The resources one replica asks Ray for, named as the autoscaler names them."""
    demand = {"CPU": ray_actor_options.get("num_cpus", 1), "GPU": ray_actor_options.get("num_gpus", 0),
              "memory": ray_actor_options.get("memory", 0), **ray_actor_options.get("resources", {})}
    if ray_actor_options.get("accelerator_type"):
        demand[ACCELERATOR_PREFIX + ray_actor_options["accelerator_type"]] = 0.001  # Ray's marker amount
    return {name: float(amount) for name, amount in demand.items() if amount}


def infeasible_requests(events: list[dict[str, Any]], now_s: float) -> list[dict[str, float]]:
    """The resource requests the autoscaler said no node type can fulfill, in recent events."""
    requests = []
    for event in events:
        match = INFEASIBLE.search(event.get("message", ""))
        try:
            at_s = datetime.fromisoformat(event["time"]).timestamp()  # the dashboard's local time
        except (KeyError, TypeError, ValueError):
            continue
        if match is None or abs(now_s - at_s) > INFEASIBLE_WINDOW_S:
            continue
        for text in re.findall(r"\{[^{}]*\}", match[1]):  # v2 lists several: {...}*1, {...}*2
            try:
                requests.append({k: float(v) for k, v in ast.literal_eval(text).items()})
            except (ValueError, SyntaxError, AttributeError, TypeError):
                continue
    return requests


def same_demand(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    return a.keys() == b.keys() and all(math.isclose(a[k], b[k], rel_tol=1e-6) for k in a)


def missing_resources(demand: Mapping[str, float], cluster: Mapping[str, float]) -> list[str]:
    """What no node of the cluster has enough of: the accelerator first, which is what a
    missing node type lacks; every such resource if no accelerator is among them."""
    missing = [name for name, amount in demand.items() if cluster.get(name, 0) < amount]
    return [m for m in missing if m.startswith(ACCELERATOR_PREFIX)] or missing


def reason_for(model_id: str, state: DeploymentState, *, scale_to_zero: bool, unplaceable: str | None) -> str | None:
    """None when the model can take a request; otherwise why not, for the client."""
    if state.running > 0 or state.status == "UNKNOWN":  # no news is not bad news: let Serve route it
        return None
    if unplaceable:
        return unplaceable
    if state.status == "UNHEALTHY" and state.trigger in LOST_TRIGGERS:
        return f"Model '{model_id}' lost its replica (its node or process stopped); a new one is starting, try again."
    if state.status in FAILED:
        return f"Model '{model_id}' failed to start; an operator must check its logs."
    if scale_to_zero:
        return None
    return f"Model '{model_id}' is still loading; try again shortly."


class ModelReadiness:
    def __init__(self, scale_to_zero: set[str], demands: dict[str, dict[str, float]] | None = None):
        self._scale_to_zero = scale_to_zero
        self._demands = demands or {}  # model -> one replica's resources, where the YAML names them
        self._status: dict[str, DeploymentState] = {}  # deployment name -> state
        self._unplaceable: dict[str, str] = {}  # model -> why no node can hold its replica
        self._changed = asyncio.Event()  # set (and replaced) after every poll
        self._task: asyncio.Task | None = None
        self._first_poll: asyncio.Event | None = None

    @classmethod
    def for_models(cls, models: Mapping[str, Any]) -> ModelReadiness:
        """From the models' configs (`deployment.autoscaling_config` and `ray_actor_options`)."""
        return cls(
            {m.id for m in models.values() if (m.deployment.get("autoscaling_config") or {}).get("min_replicas") == 0},
            {m.id: replica_demand(m.deployment["ray_actor_options"]) for m in models.values()
             if m.deployment.get("ray_actor_options")},
        )

    async def _started(self) -> None:
        if self._task is None:  # started lazily: replica constructors have no running loop
            self._first_poll = asyncio.Event()
            self._task = asyncio.create_task(self._poll())
        await self._first_poll.wait()  # type: ignore[union-attr]

    async def state(self, model_id: str) -> tuple[str, int]:
        """Serve's status of the model's deployment and its running replicas (last poll)."""
        await self._started()
        state = self._status.get(deployment_name(model_id), DeploymentState())
        return state.status, state.running

    async def refusal(self, model_id: str) -> ServiceUnavailableError | None:
        """None when the model can take a request; otherwise the 503 that says why not."""
        await self._started()
        return self._refusal(model_id, waiting=False)

    def _refusal(self, model_id: str, *, waiting: bool) -> ServiceUnavailableError | None:
        unplaceable = self._unplaceable.get(model_id)
        # A call already waiting keeps waiting while replicas start (a redeploy's old replica may
        # still be finishing it); it is released when no replica can come: lost, failed, no node.
        reason = reason_for(model_id, self._status.get(deployment_name(model_id), DeploymentState()),
                            scale_to_zero=waiting or model_id in self._scale_to_zero, unplaceable=unplaceable)
        if reason is None:
            return None
        retry_after_s = UNPLACEABLE_RETRY_AFTER_S if reason == unplaceable else NOT_READY_RETRY_AFTER_S
        return ServiceUnavailableError(reason, headers={"Retry-After": str(retry_after_s)})

    async def guard(self, model_id: str, call: Awaitable[T]) -> T:
        """`await call` (a model's `DeploymentResponse`), unless, while it waits, the model turns
        out to have no replica that can answer it (lost with its node, failed, or no node of the
        cluster can hold one): then cancel the call and raise the 503 a new request would get."""
        await self._started()
        waiting = asyncio.ensure_future(call)
        changed: asyncio.Future | None = None
        try:
            while (refusal := self._refusal(model_id, waiting=True)) is None:
                changed = asyncio.ensure_future(self._changed.wait())  # the next poll
                done, _ = await asyncio.wait({waiting, changed}, return_when=asyncio.FIRST_COMPLETED)
                if waiting in done:
                    return waiting.result()
            getattr(call, "cancel", lambda: None)()  # a DeploymentResponse leaves Serve's queue
            raise refusal
        finally:
            waiting.cancel()
            if changed is not None:
                changed.cancel()

    async def guard_stream(self, model_id: str, parts: AsyncIterator[T]) -> AsyncIterator[T]:
        """`parts` (a model's streaming response), each one awaited under `guard`: a stream
        waiting for a replica that cannot come ends with the 503 a new request would get (the
        relay sends it as the stream's error event) instead of waiting for the client to give up."""
        iterator = aiter(parts)
        while True:
            try:
                part = await self.guard(model_id, anext(iterator))
            except StopAsyncIteration:
                return
            except ServiceUnavailableError:
                getattr(parts, "cancel", lambda: None)()  # a DeploymentResponseGenerator leaves Serve's queue
                raise
            yield part

    async def _poll(self) -> None:
        app = serve.get_replica_context().app_name
        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                self._status = {
                    name: DeploymentState(str(getattr(d.status, "value", d.status)),
                                          str(getattr(d.status_trigger, "value", d.status_trigger)),
                                          int(d.replica_states.get("RUNNING", 0)),
                                          int(d.replica_states.get("STARTING", 0)))
                    for name, d in status.applications[app].deployments.items()
                }
                await self._check_pools()
            except Exception as exc:  # keep serving on the last known status
                logger.warning("readiness poll failed: %r", exc)
            self._first_poll.set()  # type: ignore[union-attr]
            self._changed.set()
            self._changed = asyncio.Event()
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _check_pools(self) -> None:
        """Models with no running replica whose replica the autoscaler says no node type fits.
        Asked only while such a model has a replica waiting to start (or a verdict standing)."""
        states = {m: self._status.get(deployment_name(m), DeploymentState()) for m in self._demands}
        waiting = {m: self._demands[m] for m, s in states.items()
                   if s.running == 0 and (s.starting > 0 or m in self._unplaceable)}
        verdicts: dict[str, str] = {}
        if waiting:
            try:
                verdicts = await asyncio.to_thread(_unplaceable, waiting)
            except Exception as exc:  # no dashboard, no autoscaler: no verdict, requests wait as before
                logger.debug("no autoscaler events to read: %r", exc)
        for model_id, reason in verdicts.items():
            if model_id not in self._unplaceable:
                logger.warning("model %s: %s", model_id, reason)
        for model_id in self._unplaceable.keys() - verdicts.keys():
            logger.info("model %s: the autoscaler no longer reports its replica as unplaceable", model_id)
        self._unplaceable = verdicts


def _unplaceable(waiting: dict[str, dict[str, float]]) -> dict[str, str]:
    """For each waiting model whose exact replica shape the autoscaler recently called
    infeasible: the reason, naming what no node has. (Blocking: Ray's state API.)"""
    import ray
    from ray.util.state import list_cluster_events

    events = list_cluster_events(address=ray.get_runtime_context().gcs_address, limit=10_000, timeout=10,
                                 filters=[("source_type", "=", "AUTOSCALER")], raise_on_missing_output=False)
    infeasible = infeasible_requests(events, time.time())
    if not infeasible:
        return {}
    cluster = ray.cluster_resources()
    reasons = {}
    for model_id, demand in waiting.items():
        if any(same_demand(demand, request) for request in infeasible):
            missing = ", ".join(missing_resources(demand, cluster)) or f"all of {demand} on one node"
            reasons[model_id] = (f"Model '{model_id}' cannot start: no node type of this cluster has {missing} "
                                 f"(one replica needs {demand}); an operator must add one.")
    return reasons
