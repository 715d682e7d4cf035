"""The head survives a GCS restart. With the GCS's tables in Redis (what k8s/ sets up with
`gcsFaultToleranceOptions`), its GCS server killed for 15 s under load costs no generation and
keeps every replica. The control is the same restart with the stored tables gone — what a head
without Redis always restarts with: its GCS comes back empty, and the cluster is lost.
These run last on the shared cluster (conftest.py orders them): the control ends it."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.cluster.conftest import L4_MODEL, ClusterApp, Load, Reply
from tests.cluster.harness import wait_for

pytestmark = pytest.mark.cluster
OUTAGE_S = 15
HEAD_NODE = "f" * 51 + "00000"  # the fake provider's fixed id for the head


def under_load(app: ClusterApp, *, wipe: bool, until: Callable[[list[Reply], float], bool],
               bound_s: float) -> tuple[list[Reply], float, float]:
    """Clients generating while the GCS is killed for OUTAGE_S and started again (its Redis
    emptied first when `wipe`), until `until(replies, restarted_at)` or `bound_s` after the restart."""
    with Load(app, L4_MODEL, clients=3) as load:
        time.sleep(3)
        saved = app.cluster.kill_gcs()
        down_at = time.monotonic()
        if wipe:
            assert app.cluster.redis.command("FLUSHALL") == b"+OK"
        time.sleep(OUTAGE_S)
        app.cluster.start_gcs(saved)
        up_at = time.monotonic()
        wait_for("the scenario's end", lambda: until(list(load.replies), up_at), bound_s, 1)
    return load.replies, down_at, up_at


def replica_ids(app: ClusterApp) -> dict[str, list[str]]:
    deployments = app.cluster.serve_applications()["artserve"]["deployments"]
    return {name: sorted(r["replica_id"] for r in d["replicas"]) for name, d in deployments.items()}


@pytest.mark.timeout(300)
def test_a_gcs_restart_with_redis_loses_no_generation(app):
    app.wait_serving(L4_MODEL)
    before = replica_ids(app)
    replies, down_at, up_at = under_load(
        app, wipe=False, bound_s=60,
        until=lambda replies, up_at: sum(r.status == 200 and r.sent_s > up_at for r in replies) >= 3)
    failed = [r for r in replies if r.status != 200]
    assert not failed, failed
    during = [r for r in replies if down_at <= r.sent_s < up_at]
    assert during, "no request was sent while the GCS was down"
    after = wait_for("the dashboard reading the restarted GCS", lambda: replica_ids(app), 60, 1)
    assert after == before  # same replicas: nothing was restarted or rescheduled
    print(f"\n[cluster] GCS down {OUTAGE_S}s under 3 clients (Redis-backed): {len(during)} requests sent during "
          f"the outage, all 200 (slowest {max(r.took_s for r in during):.1f}s), {len(replies)} in all, 0 failed; "
          "same replicas after")


@pytest.mark.timeout(300)
def test_control_a_gcs_restart_without_its_stored_state_loses_the_cluster(app):
    app.wait_serving(L4_MODEL)

    def lost(replies: list[Reply], up_at: float) -> bool:
        return any(r.status != 200 and r.sent_s > up_at for r in replies)

    replies, down_at, up_at = under_load(app, wipe=True, until=lost, bound_s=120)
    # Answered while the GCS was down (a request takes seconds here: most span the kill or the restart).
    during = [r for r in replies if down_at <= r.sent_s + r.took_s < up_at]
    assert during and all(r.status == 200 for r in during), replies  # serving needs no GCS while it is down
    lost_after_s = min(r.sent_s + r.took_s for r in replies if r.status != 200 and r.sent_s > up_at) - up_at
    # What is lost: the head's raylet (and with it the proxy the clients use) and the Serve app.
    wait_for("the head's raylet exited", lambda: not [
        p for p in app.cluster.processes() if p.name() == "raylet" and f"--node_id={HEAD_NODE}" in p.cmdline()], 60)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{app.base_url}/v1/models", timeout=10).raise_for_status()
    print(f"\n[cluster] control, the GCS restarted without its stored state: {len(during)} requests served during "
          f"the {OUTAGE_S}s outage, then {lost_after_s:.1f}s after the restart the cluster was gone (head raylet "
          f"exited, {sum(r.status is None for r in replies)} requests without an answer); the app must be redeployed")
