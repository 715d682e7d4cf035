"""The head survives a GCS restart. With the GCS's tables in Redis (what k8s/ sets up with
`gcsFaultToleranceOptions`), its GCS server killed for 15 s under load costs no generation and
keeps every replica. The control is the same restart with the stored tables gone — what a head
without Redis always restarts with: its GCS comes back empty, and the cluster is lost.
The control runs last on the shared cluster (conftest.py orders the tests): it ends it."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.cluster.conftest import L4_MODEL, ClusterApp, Load, Reply
from tests.cluster.harness import wait_for

pytestmark = pytest.mark.cluster
OUTAGE_S = 15
CONTROL_OUTAGE_S = 5
HEAD_NODE = "f" * 51 + "00000"  # the fake provider's fixed id for the head


def under_load(app: ClusterApp, *, until: Callable[[list[Reply], float], bool],
               bound_s: float) -> tuple[list[Reply], float, float]:
    """Clients generating while the GCS is killed for OUTAGE_S and started again, until
    `until(replies, restarted_at)` or `bound_s` after the restart."""
    with Load(app, L4_MODEL, clients=3) as load:
        time.sleep(3)
        saved = app.cluster.kill_gcs()
        down_at = time.monotonic()
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
        app, bound_s=60,
        until=lambda replies, up_at: sum(r.status == 200 and r.sent_s > up_at for r in replies) >= 3)
    failed = [r for r in replies if r.status != 200]
    assert not failed, failed
    # In flight at some point of the outage (one sent before the kill may wait it out: a request
    # can stall until the GCS is back, so whether one is also *sent* during it is chance).
    during = [r for r in replies if r.sent_s < up_at and r.sent_s + r.took_s > down_at]
    assert during, "no request was in flight while the GCS was down"
    sent_during = sum(down_at <= r.sent_s for r in during)
    after = wait_for("the dashboard reading the restarted GCS", lambda: replica_ids(app), 60, 1)
    assert after == before  # same replicas: nothing was restarted or rescheduled
    print(f"\n[cluster] GCS down {OUTAGE_S}s under 3 clients (Redis-backed): {len(during)} requests in flight during "
          f"the outage ({sent_during} sent during it), all 200 (slowest {max(r.took_s for r in during):.1f}s), "
          f"{len(replies)} in all, 0 failed; "
          "same replicas after")


@pytest.mark.timeout(180)
def test_control_a_gcs_restart_without_its_stored_state_loses_the_cluster(app):
    """Serving through the outage itself needs no GCS (the test above); what its stored state
    keeps is the cluster: restarted empty, the GCS knows no node, and the head goes with it."""
    assert app.models()  # the app answers through the head's proxy
    saved = app.cluster.kill_gcs()
    assert app.cluster.redis.command("FLUSHALL") == b"+OK"
    time.sleep(CONTROL_OUTAGE_S)  # how long makes no difference here: the state is gone
    app.cluster.start_gcs(saved)
    up_at = time.monotonic()
    # What is lost: the head's raylet (and with it the proxy the clients use) and the Serve app.
    wait_for("the head's raylet exited", lambda: not app.cluster.find("raylet", f"--node_id={HEAD_NODE}"), 120)
    lost_after_s = time.monotonic() - up_at
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{app.base_url}/v1/models", timeout=10).raise_for_status()
    print(f"\n[cluster] control, the GCS restarted without its stored state: {lost_after_s:.1f}s after the "
          "restart the head's raylet exited and the app no longer answers; the cluster is lost and the app must "
          "be redeployed")
