"""The Grafana dashboard (deploy/grafana/artserve-dashboard.json) against a real Prometheus.

Prometheus (Debian's package, installed by `scripts/dev setup`) scrapes this session's
`serve run` through Ray's own service-discovery file, as docs/operations.md tells operators
to, while a short load runs (images from two models, client errors, a request the client
abandons). Every query of every panel must then return data.

Data-driven: a query that uses an `artserve_*` metric which serve_app/metrics.py does not
declare (yet) is queried and reported, not required; once the metric is declared, the same
query is required to return data. The report is written next to the test's temp files."""

from __future__ import annotations

import ast
import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time

import httpx
import pytest
import yaml

from tests.integration.conftest import API_KEY, ROOT

pytestmark = pytest.mark.integration
DASHBOARD = ROOT / "deploy" / "grafana" / "artserve-dashboard.json"
PROMETHEUS = shutil.which("prometheus")
RATE_WINDOW = "2m"  # what Grafana's $__rate_interval stands for here: the whole short load
DATA_TIMEOUT_S = 180


def declared_metrics() -> set[str]:
    """The names serve_app/metrics.py registers (`metrics.Counter("artserve_…", …)` etc.)."""
    tree = ast.parse((ROOT / "serve_app" / "metrics.py").read_text())
    return {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr in {"Counter", "Histogram", "Gauge"}
        and node.args and isinstance(node.args[0], ast.Constant)
    }


def artserve_metrics(expr: str) -> set[str]:
    """Our metric names in a query, as declared (Ray adds `ray_`, Prometheus the suffixes)."""
    return {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in re.findall(r"\bray_(artserve_\w+)", expr)}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, query as Prometheus gets it) for every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", RATE_WINDOW).replace("$model", ".*")
            queries.append((panel["title"], target["refId"], expr))
    return queries


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed (scripts/dev setup installs Debian's `prometheus` as root)")
    discovery = server.ray_tmp / "ray" / "session_latest" / "prom_metrics_service_discovery.json"
    deadline = time.monotonic() + 60
    while not discovery.exists():
        assert time.monotonic() < deadline, f"Ray wrote no {discovery}"
        time.sleep(1)
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "file_sd_configs": [{"files": [str(discovery)]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = open(work / "prometheus.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (work / "prometheus.log").read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready in 60 s"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _load(base_url: str, stop: threading.Event, counts: dict[int, int]) -> None:
    """Bounded: runs until `stop` or 200 rounds. Successes on two step-engine models (batched
    n=2), with LoRA adapters, and on a whole-call model (`tiny-pixart`: the pipeline-call panels), a 400, a 404,
    and now and then a request the client abandons mid-generation (on `tiny-sd-small`, its
    own replica: the cancelled-steps panel)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{base_url}/v1/images/generations"
    bodies = [
        {"model": "tiny-sd", "prompt": "a red fox", "n": 2, "num_inference_steps": 2, "response_format": "b64_json"},
        {"model": "tiny-flux", "prompt": "a blue bird", "num_inference_steps": 2, "response_format": "url"},
        {"model": "tiny-pixart", "prompt": "a green frog", "num_inference_steps": 2, "response_format": "b64_json"},
        # LoRA adapters (two in memory on tiny-sd-lora): a hit, then misses and evictions as three rotate.
        *({"model": f"tiny-sd-lora:{name}", "prompt": "a fox", "size": "64x64", "num_inference_steps": 2,
           "response_format": "b64_json"} for name in ("red", "red", "blue", "green")),
        {"model": "tiny-sd", "prompt": "bad size", "size": "100x100"},
        {"model": "no-such-model", "prompt": "x"},
    ]
    abandoned = {"model": "tiny-sd-small", "prompt": "left", "num_inference_steps": 100, "response_format": "b64_json"}
    with httpx.Client(headers=headers, timeout=60) as client:
        for round_ in range(200):
            for body in bodies + ([abandoned] if round_ % 5 == 1 else []):
                if stop.is_set():
                    return
                try:
                    status = client.post(url, json=body, timeout=0.3 if body is abandoned else 60).status_code
                except httpx.TimeoutException:
                    status = -1
                counts[status] = counts.get(status, 0) + 1
            time.sleep(0.2)


def _has_data(prometheus: str, expr: str) -> tuple[bool, str]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    if r.get("status") != "success":
        return False, f"query error: {r.get('error')}"
    values = [float(s["value"][1]) for s in r["data"]["result"]]
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite), f"{len(values)} series, {len(finite)} finite" + (f", e.g. {finite[0]:.4g}" if finite else "")


def test_every_dashboard_query_returns_data(server, prometheus, tmp_path):
    declared = declared_metrics()
    queries = dashboard_queries()
    assert len({title for title, _, _ in queries}) >= 12  # the panels the dashboard promises

    stop, counts = threading.Event(), {}
    load = threading.Thread(target=_load, args=(server.base_url, stop, counts), daemon=True)
    load.start()
    required = {(t, ref): e for t, ref, e in queries if artserve_metrics(e) <= declared}
    results: dict[tuple[str, str], tuple[bool, str]] = {}
    deadline = time.monotonic() + DATA_TIMEOUT_S
    try:
        while True:  # until every required query has data: Ray reports, Prometheus scrapes
            results = {(t, ref): _has_data(prometheus, e) for t, ref, e in queries}
            if all(results[key][0] for key in required) or time.monotonic() > deadline:
                break
            time.sleep(3)
    finally:
        stop.set()
        load.join(timeout=120)

    lines = []
    for title, ref, expr in queries:
        ok, detail = results[(title, ref)]
        undeclared = artserve_metrics(expr) - declared
        state = "DATA" if ok else ("not declared yet: " + ", ".join(sorted(undeclared)) if undeclared else "NO DATA")
        lines.append(f"{state:<12} | {title} [{ref}] | {detail} | {expr}")
    lines.append(f"load: responses by status {counts} (-1: abandoned by the client)")
    report = tmp_path / "dashboard-queries.txt"
    report.write_text("\n".join(lines) + "\n")
    print(f"\ndashboard query report: {report}\n" + "\n".join(lines))
    assert {200, 400, 404} <= counts.keys(), counts
    broken = [f"{t} [{ref}]: {detail}" for (t, ref), (_, detail) in results.items() if detail.startswith("query error")]
    assert not broken, "queries Prometheus rejects:\n" + "\n".join(broken)  # declared or not
    missing = [f"{t} [{ref}]: {results[(t, ref)][1]}" for (t, ref) in required if not results[(t, ref)][0]]
    assert not missing, "panels without data:\n" + "\n".join(missing)
