"""Which replica of a model takes a request: Serve's power of two choices, with a preference for
a replica that already holds the request's (first) LoRA adapter — while that replica is not
much busier than another one.

Serve's own multiplexed routing (`handle.options(multiplexed_model_id=…)`) sends every request for
an adapter to the replicas that hold it until their queues are full (`max_ongoing_requests`),
and only then elsewhere (request_router.py, `apply_multiplex_routing`): a hot adapter stays
pinned to one replica while another idles (ray#65691). Here the holder is one of the two
candidates and wins only while its queue is at most `imbalance` requests longer than the
other's — affinity while the load is balanced, load balancing when it is not, as Ray Serve
LLM's PrefixCacheAffinityRouter does for prompt prefixes. An adapter load costs a second or two;
a queue of a batch's length costs more. Replicas report what they hold through Serve's
`record_routing_stats` (ModelServer)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

ROUTER_PATH = "serve_app.replica.routing:AdapterAffinityRouter"


def first_adapter(pending_request: PendingRequest | None) -> str | None:
    """The name of the first adapter of the GenerationJob a request carries, if any."""
    args = getattr(pending_request, "args", None) or ()
    loras = getattr(args[0], "loras", None) if args else None
    return loras[0].name if loras else None


def holds(replica: RunningReplica, adapter: str) -> bool:
    return adapter in ((replica.routing_stats or {}).get("loras") or ())


def ranked(holder: Any, other: Any, holder_queue: int, other_queue: int, imbalance: int) -> list[list[Any]]:
    """Serve tries rank by rank: the holder first unless its queue is more than `imbalance` longer."""
    return [[holder], [other]] if holder_queue <= other_queue + imbalance else [[other], [holder]]


class AdapterAffinityRouter(PowerOfTwoChoicesRequestRouter):
    def initialize_state(self, imbalance: int = 4, **kwargs: Any) -> None:
        self._imbalance = imbalance

    async def choose_replicas(self, candidate_replicas: Sequence[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        adapter = first_adapter(pending_request)
        holders = [r for r in candidate_replicas if holds(r, adapter)] if adapter else []
        others = [r for r in candidate_replicas if r not in holders]
        if not holders or not others:  # nobody holds it, or everybody does: plain power of two choices
            return await super().choose_replicas(list(candidate_replicas), pending_request)
        holder, other = random.choice(holders), random.choice(others)
        return ranked(holder, other, self._queue(holder), self._queue(other), getattr(self, "_imbalance", 4))

    def _queue(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0
