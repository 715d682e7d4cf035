"""One GPU pool per model on a real multi-node cluster (conftest.py): scale from zero onto the
right node type, a pool capped by its node type, a model no node type can hold, a GPU node lost
under load, and idle GPU nodes released. Each test states what it needs of the cluster and
waits for it, bounded in time, and prints its timings."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.cluster.conftest import (
    A100_MODEL,
    AUTOSCALING,
    H100_MODEL,
    IDLE_TIMEOUT_MINUTES,
    L4_MODEL,
    MAX_WORKERS,
    REQUEST_TIMEOUT_S,
    ClusterApp,
    Load,
    Reply,
    Timeline,
    write_models,
)
from tests.cluster.harness import HEAD_TYPE, wait_for

pytestmark = pytest.mark.cluster
FROM_ZERO_BOUND_S = 90  # a fake node joins in seconds; the replica loads tiny weights
RECOVERY_BOUND_S = 120  # Serve notices, the autoscaler launches a replacement node, the replica loads
IDLE_BOUND_S = AUTOSCALING["downscale_delay_s"] + 60
REDEPLOYED_DOWNSCALE_DELAY_S = 5


def envelope(reply: Reply) -> bool:
    error = reply.body.get("error")
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}


def retryable_503(reply: Reply) -> bool:
    """ArtServe's answer while a model has no replica: 503, Retry-After, the OpenAI envelope."""
    return (reply.status == 503 and reply.headers.get("retry-after", "").isdigit() and envelope(reply)
            and reply.body["error"]["type"] == "service_unavailable_error")


def wait_idle(app: ClusterApp, *models: str) -> None:
    wait_for(f"{models} at zero replicas", lambda: all(app.models()[m]["running_replicas"] == 0 for m in models),
             IDLE_BOUND_S, 1)


@pytest.mark.timeout(240)
def test_scale_from_zero_lands_each_model_on_its_pool(app):
    wait_idle(app, L4_MODEL, H100_MODEL)
    wait_for("no GPU node left", lambda: not app.nodes_of("gpu_l4") and not app.nodes_of("gpu_h100"), 90, 1)
    with ThreadPoolExecutor(2) as pool:  # both at once: two node types launched side by side
        l4, h100 = pool.map(app.generate, [L4_MODEL, H100_MODEL])
    assert (l4.status, h100.status) == (200, 200), (l4, h100)
    assert max(l4.took_s, h100.took_s) < FROM_ZERO_BOUND_S
    print(f"\n[cluster] first image from zero: {L4_MODEL} {l4.took_s:.1f}s (L4 pool), "
          f"{H100_MODEL} {h100.took_s:.1f}s (H100 pool)")
    types = app.node_types()
    assert [types[n] for n in app.replica_nodes(L4_MODEL)] == ["gpu_l4"]
    assert [types[n] for n in app.replica_nodes(H100_MODEL)] == ["gpu_h100"]
    # CPU-only deployments never on a GPU node: the ingress on the CPU node (the head has no CPU for
    # it), the idempotency store (no CPU) on the head or the CPU node.
    placed = app.cpu_only_node_types()
    assert placed["ImageIngress"] == {"cpu"} and placed["IdempotencyStore"] <= {"cpu", HEAD_TYPE}, placed
    # Each replica holds its node's one GPU in Ray's books; with no CUDA behind it the engine ran on CPU.
    report = app.cluster.autoscaler_status()["loadMetricsReport"]
    for model in (L4_MODEL, H100_MODEL):
        [node] = app.replica_nodes(model)
        assert report["usageByNode"][node]["GPU"] == [1.0, 1.0]
    demand = report["resourceDemand"]
    assert not [shape for shape, _ in demand if {"accelerator_type:L4", "accelerator_type:H100"} & set(shape)]


@pytest.mark.timeout(120)
def test_a_model_no_node_type_can_hold_gets_a_clear_503(app):
    """cluster.yaml has no A100 pool: the autoscaler says so, and the waiting request is released."""
    first = app.generate(A100_MODEL)
    assert retryable_503(first), first
    assert "accelerator_type:A100" in first.message and "cannot start" in first.message, first.message
    assert first.took_s < REQUEST_TIMEOUT_S  # released by the autoscaler's verdict, not by the timeout
    again = app.generate(A100_MODEL)
    assert retryable_503(again) and again.message == first.message and again.took_s < 5
    print(f"\n[cluster] a model no pool can hold: 503 after {first.took_s:.1f}s, then at once "
          f"({again.took_s:.2f}s): {first.message!r}")
    # The operator's log line names the missing resource too (the ingress replica's log).
    logs = next(app.cluster.root.glob("session_2*")) / "logs"
    [ingress] = app.cluster.serve_applications()["artserve"]["deployments"]["ImageIngress"]["replicas"]
    log = (logs / ingress["log_file_path"].lstrip("/")).read_text()
    assert re.search(rf"WARNING .*model {A100_MODEL}: .*accelerator_type:A100", log)


@pytest.mark.timeout(240)
def test_a_capped_pool_queues_requests(app):
    """gpu_h100 here holds one node, the model wants two replicas: the second never places, and
    the requests queue on the one replica (none is a 5xx)."""
    assert MAX_WORKERS["gpu_h100"] == 1
    # 4 clients until Serve wants the second replica (however fast this machine runs a request).
    with Load(app, H100_MODEL, clients=4, steps=20) as load:
        wait_for("Serve asking for a second replica", lambda: len(app.deployment(H100_MODEL)["replicas"]) == 2,
                 60, 0.25)
        time.sleep(3)  # the second replica has had time to start, were there a node for it
        states = sorted(r["state"] for r in app.deployment(H100_MODEL)["replicas"])
    replies = load.replies
    assert replies and [r.status for r in replies] == [200] * len(replies), replies
    assert states == ["RUNNING", "STARTING"]  # waiting for a node the pool cannot add
    card = app.models()[H100_MODEL]
    assert card["running_replicas"] == 1 and len(app.nodes_of("gpu_h100")) == 1
    print(f"\n[cluster] capped pool (1 H100 node, up to 2 replicas): {len(replies)} requests from 4 clients all "
          f"200 ({min(r.took_s for r in replies):.1f}-{max(r.took_s for r in replies):.1f}s); replicas {states}")


@pytest.mark.timeout(300)
def test_a_gpu_node_lost_under_load(app):
    killed_at = float("nan")
    # Clients pause between requests so that 503s do not starve the recovery of this machine's CPUs.
    with Timeline(app, L4_MODEL) as timeline, Load(app, L4_MODEL, clients=4, pause_s=0.5) as load:
        try:
            served = wait_for("the model serving under load", lambda: [r for r in list(load.replies)
                                                                     if r.status == 200], FROM_ZERO_BOUND_S, 0.5)
            link = served[0].body["data"][0]["url"]  # made before the loss, stored where every node sees it
            [node] = wait_for("its replica running", lambda: app.replica_nodes(L4_MODEL), 30, 0.5)
            time.sleep(2)  # every client has a request in flight
            killed_at = time.monotonic()
            killed = app.cluster.kill_node(node)

            def served_again() -> float | None:
                done = [r.sent_s + r.took_s for r in list(load.replies) if r.status == 200 and r.sent_s > killed_at]
                return min(done) - killed_at if done else None

            recovered_s = wait_for("a request sent after the kill answered 200", served_again, RECOVERY_BOUND_S, 1)
        finally:
            print(f"\n[cluster] {L4_MODEL}, the node killed at +{killed_at - timeline.started:.1f}s:\n{timeline}")
    answered = [r for r in load.replies if r.sent_s + r.took_s > killed_at]
    for reply in answered:  # a 200 or a retryable 503: never a 500, a broken connection or a hang
        assert reply.status == 200 or retryable_503(reply), reply
        assert "failed to start" not in reply.message, reply.message
        assert reply.took_s < REQUEST_TIMEOUT_S + 10, reply
    unavailable = [r for r in answered if r.status == 503]
    assert all("lost" in r.message for r in unavailable), {r.message for r in unavailable}
    [new_node] = app.replica_nodes(L4_MODEL)
    assert new_node != node and app.node_types()[new_node] == "gpu_l4"
    assert node not in {n["node_id"] for n in app.cluster.nodes()}  # the GCS has it dead
    image = httpx.get(link, timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/webp" and image.content
    first_503 = min((r.sent_s + r.took_s - killed_at for r in unavailable), default=None)
    print(f"[cluster] GPU node lost under 4 clients (killed {len(killed)} processes: {sorted(set(killed))}): "
          f"{sum(r.status == 200 for r in answered)} x 200, {len(unavailable)} x 503 "
          f"({sorted({r.message for r in unavailable})}); first 503 after "
          f"{first_503 if first_503 is None else round(first_503, 1)}s; serving again {recovered_s:.1f}s after "
          "the kill on a new gpu_l4 node; the link made before the loss still resolves")


@pytest.mark.timeout(300)
def test_a_redeploy_settles_and_idle_gpu_nodes_are_released(app):
    # Light traffic keeps one replica through the redeploy.
    with Timeline(app, L4_MODEL) as timeline, Load(app, L4_MODEL, clients=1, pause_s=0.5) as load:
        try:
            [old] = wait_for("one replica serving", lambda: [
                r["replica_id"] for r in app.deployment(L4_MODEL)["replicas"] if r["state"] == "RUNNING"],
                FROM_ZERO_BOUND_S, 0.5)
            assert len(app.nodes_of("gpu_l4")) == 1  # steady: one replica, one node
            started = time.monotonic()
            # A new app config: every model deployment gets a new version (the idle ones stay at zero),
            # and the models a shorter downscale delay (the idle phase below waits for it).
            write_models(app.models_dir, downscale_delay_s=REDEPLOYED_DOWNSCALE_DELAY_S)
            app.deploy(janitor_period_s=300)

            def settled() -> bool:
                replicas = app.deployment(L4_MODEL)["replicas"]
                return ([r["state"] for r in replicas] == ["RUNNING"] and replicas[0]["replica_id"] != old
                        and len(app.nodes_of("gpu_l4")) == 1)

            wait_for("the redeployed model on one gpu_l4 node again", settled, 180, 1)
            redeployed_s = time.monotonic() - started
            # The new CPU-only replicas too stay off GPU nodes (unpinned, they were placed on the
            # idle H100 node, which was then never released).
            placed = app.cpu_only_node_types()
            assert placed["ImageIngress"] == {"cpu"} and placed["IdempotencyStore"] <= {"cpu", HEAD_TYPE}, placed
        finally:
            print(f"\n[cluster] {L4_MODEL} through the redeploy:\n{timeline}")
    replies = load.replies
    assert all(r.status == 200 or retryable_503(r) for r in replies), [r for r in replies if r.status != 200]
    # No traffic from here: replicas go to zero, then their nodes.
    idle_from = time.monotonic()
    wait_idle(app, L4_MODEL, H100_MODEL)
    zero_s = time.monotonic() - idle_from
    try:
        wait_for("every GPU node released", lambda: not app.nodes_of("gpu_l4") and not app.nodes_of("gpu_h100"),
                 120, 1)
    except AssertionError:  # what still holds the node: its resources in use, its replicas and actors
        report = app.cluster.autoscaler_status()["loadMetricsReport"]
        replicas = {m: [(r["state"], r["node_id"]) for r in app.deployment(m)["replicas"]]
                    for m in (L4_MODEL, H100_MODEL)}
        actors = [(a["class_name"], a["state"], a["node_id"]) for a in app.cluster.actors(alive_only=False)
                  if a["state"] != "DEAD"]
        print(f"[cluster] nodes {app.node_types()}\nusage {report.get('usageByNode')}\nreplicas {replicas}\n"
              f"actors {actors}\nplacement groups {app.cluster.placement_groups()}")
        raise
    released_s = time.monotonic() - idle_from - zero_s
    assert app.nodes_of("cpu")  # min_workers: 1 stays
    print(f"\n[cluster] redeploy under light load settled on one gpu_l4 node in {redeployed_s:.1f}s "
          f"({sum(r.status == 200 for r in replies)} x 200, {sum(r.status == 503 for r in replies)} x 503); idle: "
          f"replicas at zero after {zero_s:.1f}s (downscale_delay_s {REDEPLOYED_DOWNSCALE_DELAY_S}), GPU nodes "
          f"released {released_s:.1f}s later (idle_timeout {IDLE_TIMEOUT_MINUTES * 60:.0f}s)")
