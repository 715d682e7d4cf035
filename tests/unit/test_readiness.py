"""What the readiness logic (serve_app/readiness.py) tells a client, from Serve's status and the
autoscaler's events, without Ray: a replica lost with its node is not a start failure, and a
model no node type can hold is refused at once (and a request already waiting is released)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest

from serve_app.errors import ServiceUnavailableError
from serve_app.readiness import (
    UNPLACEABLE_RETRY_AFTER_S,
    DeploymentState,
    ModelReadiness,
    infeasible_requests,
    missing_resources,
    reason_for,
    replica_demand,
    same_demand,
)

H100 = {"num_gpus": 1, "num_cpus": 4, "accelerator_type": "H100"}


def test_a_lost_replica_is_not_a_start_failure():
    lost = DeploymentState("UNHEALTHY", "HEALTH_CHECK_FAILED", running=0)
    failed = DeploymentState("DEPLOY_FAILED", "REPLICA_STARTUP_FAILED", running=0)
    for scale_to_zero in (False, True):
        reason = reason_for("m", lost, scale_to_zero=scale_to_zero, unplaceable=None)
        assert "lost its replica" in reason and "failed to start" not in reason
        assert "failed to start" in reason_for("m", failed, scale_to_zero=scale_to_zero, unplaceable=None)
    unhealthy_at_start = DeploymentState("UNHEALTHY", "REPLICA_STARTUP_FAILED", running=0)
    assert "failed to start" in reason_for("m", unhealthy_at_start, scale_to_zero=False, unplaceable=None)


def test_running_replicas_scale_to_zero_and_loading():
    assert reason_for("m", DeploymentState("UNHEALTHY", "HEALTH_CHECK_FAILED", running=1),
                      scale_to_zero=False, unplaceable=None) is None
    assert reason_for("m", DeploymentState(), scale_to_zero=False, unplaceable="x") is None  # not polled yet
    upscaling = DeploymentState("UPSCALING", "AUTOSCALING", running=0, starting=1)
    assert reason_for("m", upscaling, scale_to_zero=True, unplaceable=None) is None  # its request starts one
    assert "still loading" in reason_for("m", upscaling, scale_to_zero=False, unplaceable=None)
    assert reason_for("m", upscaling, scale_to_zero=True, unplaceable="no A100") == "no A100"


def test_replica_demand_names_resources_as_the_autoscaler_does():
    assert replica_demand(H100) == {"CPU": 4.0, "GPU": 1.0, "accelerator_type:H100": 0.001}
    assert replica_demand({"num_cpus": 0.5}) == {"CPU": 0.5}
    assert replica_demand({"num_gpus": 1, "resources": {"slot": 2}, "memory": 2**30}) == {
        "CPU": 1.0, "GPU": 1.0, "slot": 2.0, "memory": float(2**30)}


def event(message: str, at_s: float) -> dict:
    return {"source_type": "AUTOSCALER", "time": str(datetime.fromtimestamp(int(at_s))), "message": message}


def test_infeasible_requests_from_v1_and_v2_events():
    now = time.time()
    v1 = ("Error: No available node types can fulfill resource request {'CPU': 4.0, 'GPU': 1.0, "
           "'accelerator_type:A100': 0.001}. Add suitable node types to this cluster to resolve this issue.")
    v2 = ("No available node types can fulfill resource requests {'CPU': 1.0}*2, {'GPU': 8.0}*1. "
          "Add suitable node types to this cluster to resolve this issue.")
    events = [event("Adding 1 node(s) of type gpu_l4.", now), event(v1, now - 5), event(v2, now - 1),
              event(v1.replace("A100", "TPU"), now - 600)]  # too old to say anything about now
    assert infeasible_requests(events, now) == [
        {"CPU": 4.0, "GPU": 1.0, "accelerator_type:A100": 0.001}, {"CPU": 1.0}, {"GPU": 8.0}]
    assert same_demand(replica_demand({**H100, "accelerator_type": "A100"}), infeasible_requests(events, now)[0])
    assert not same_demand(replica_demand(H100), infeasible_requests(events, now)[0])


def test_missing_resources_names_the_accelerator():
    demand = replica_demand({**H100, "accelerator_type": "A100"})
    assert missing_resources(demand, {"CPU": 16.0}) == ["accelerator_type:A100"]  # not the GPU as well
    assert missing_resources(demand, {"CPU": 16, "GPU": 1, "accelerator_type:A100": 1}) == []
    assert missing_resources({"CPU": 64.0}, {"CPU": 16.0}) == ["CPU"]


class Call:
    """A model call that never finishes on its own, like one queued for a replica that never comes."""

    def __init__(self):
        self.cancelled = False
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()

    def __await__(self):
        return self.future.__await__()

    def cancel(self) -> None:
        self.cancelled = True


async def ready(readiness: ModelReadiness) -> ModelReadiness:
    readiness._first_poll = asyncio.Event()
    readiness._first_poll.set()
    readiness._task = asyncio.current_task()  # no poller: the test plays its part (poll below)
    return readiness


def poll(readiness: ModelReadiness, model_id: str, state: DeploymentState, unplaceable: str | None = None) -> None:
    """What one round of the poller leaves behind."""
    readiness._status[f"ModelServer:{model_id}"] = state
    readiness._unplaceable = {model_id: unplaceable} if unplaceable else {}
    readiness._changed.set()
    readiness._changed = asyncio.Event()


UPSCALING = DeploymentState("UPSCALING", "AUTOSCALING", running=0, starting=1)
LOST = DeploymentState("UNHEALTHY", "HEALTH_CHECK_FAILED", running=0, starting=1)


def test_a_waiting_request_is_released_when_the_verdict_comes():
    async def scenario():
        readiness = await ready(ModelReadiness({"a100"}, {"a100": replica_demand(H100)}))
        poll(readiness, "a100", UPSCALING)
        call = Call()
        guarded = asyncio.ensure_future(readiness.guard("a100", call))
        await asyncio.sleep(0.05)
        assert not guarded.done()  # waiting for a replica, as a scale-from-zero request does
        poll(readiness, "a100", UPSCALING, "Model 'a100' cannot start: no node type has accelerator_type:A100")
        with pytest.raises(ServiceUnavailableError) as error:
            await asyncio.wait_for(guarded, 1)
        assert call.cancelled and "accelerator_type:A100" in error.value.message
        assert error.value.response_headers()["Retry-After"] == str(UNPLACEABLE_RETRY_AFTER_S)
        refusal = await readiness.refusal("a100")  # a new request: the same answer at once
        assert refusal.message == error.value.message
        poll(readiness, "a100", UPSCALING)  # the verdict expired: calls wait again, and are answered
        finished = Call()
        finished.future.set_result("image")
        assert await readiness.guard("a100", finished) == "image"

    asyncio.run(scenario())


def test_a_request_queued_for_a_lost_replica_is_released_but_not_one_waiting_for_a_start():
    async def scenario():
        readiness = await ready(ModelReadiness(set()))
        poll(readiness, "sdxl", DeploymentState("UPDATING", "CONFIG_UPDATE_STARTED", running=0, starting=1))
        call = Call()
        guarded = asyncio.ensure_future(readiness.guard("sdxl", call))
        assert (await readiness.refusal("sdxl")).message.endswith("still loading; try again shortly.")
        await asyncio.sleep(0.05)
        poll(readiness, "sdxl", DeploymentState("UPDATING", "CONFIG_UPDATE_STARTED", running=0, starting=1))
        await asyncio.sleep(0.05)
        assert not guarded.done()  # a redeploy's old replica may still be finishing it
        poll(readiness, "sdxl", LOST)
        with pytest.raises(ServiceUnavailableError) as error:
            await asyncio.wait_for(guarded, 1)
        assert call.cancelled and "lost its replica" in error.value.message
        assert error.value.response_headers()["Retry-After"] == "10"

    asyncio.run(scenario())


class Parts:
    """A model's stream: `first` parts at once, then it waits, like one whose replica was lost."""

    def __init__(self, first: list[str], then_end: bool = False):
        self.first, self.then_end, self.cancelled = list(first), then_end, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        if self.first:
            return self.first.pop(0)
        if self.then_end:
            raise StopAsyncIteration
        await asyncio.get_running_loop().create_future()  # never

    def cancel(self) -> None:
        self.cancelled = True


def test_a_stream_waiting_for_a_lost_replica_ends_with_the_503():
    async def scenario():
        readiness = await ready(ModelReadiness(set()))
        poll(readiness, "sdxl", DeploymentState("HEALTHY", "", running=1))
        whole = [part async for part in readiness.guard_stream("sdxl", Parts(["p1", "p2", "done"], then_end=True))]
        assert whole == ["p1", "p2", "done"]
        parts = Parts(["p1"])
        stream = readiness.guard_stream("sdxl", parts)
        assert await anext(stream) == "p1"
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # the next partial image is on its way
        poll(readiness, "sdxl", LOST)
        with pytest.raises(ServiceUnavailableError) as error:
            await asyncio.wait_for(waiting, 1)
        assert parts.cancelled and "lost its replica" in error.value.message

    asyncio.run(scenario())
