"""Soak: hold ~50 % of measured capacity for a long time and watch for drift.

    .venv/bin/python benchmarks/soak.py [--duration-s 1200] [--load 0.5]

Starts its own `serve run` (application `soak`: one tiny model, `url` responses so the
local store and its janitor are exercised), measures capacity (closed loop, concurrency 4),
then sends Poisson arrivals at `--load` x capacity for `--duration-s`. Every `--sample-s`
it records each Serve replica's resident memory (psutil, on the processes under the
`serve run`), and per minute the p50/p99 latency and the errors. Reports memory growth per
replica, p99 drift (first vs last minutes) and the error count; writes JSON + Markdown to
benchmarks/results/soak-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "tiny-sd"
BODY = {"model": MODEL, "prompt": "a lighthouse at dusk", "size": "256x256", "num_inference_steps": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path, port: int) -> subprocess.Popen:
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "soak", "route_prefix": "/", "import_path": "serve_app.app:build_app",
            "args": {"models": [MODEL], "models_dir": str(ROOT / "models"), "storage": str(work / "images"),
                     "janitor_period_s": 60},
        }],
    }
    path = work / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "ARTSERVE_API_KEYS": ""}
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run", str(path)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def replicas(root_pid: int) -> dict[int, tuple[str, psutil.Process]]:
    """Serve's processes under `serve run`, by pid, named by their Ray process title."""
    found = {}
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for proc in children:
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        for marker in ("ServeReplica:", "ServeController", "ProxyActor"):
            if marker in title:
                name = title.split("ray::", 1)[-1].split()[0]
                # Drop the method being run (".handle_request...", ".listen_for_change").
                name = name.split(".handle", 1)[0] if marker == "ServeReplica:" else name.split(".", 1)[0]
                found[proc.pid] = (name, proc)
    return found


async def one(client: httpx.AsyncClient, log: list, started_at: float) -> None:
    t0 = time.monotonic()
    try:
        r = await client.post("/v1/images/generations", json=BODY)
        status = r.status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    log.append((t0 - started_at, time.monotonic() - t0, status))


async def wait_ready(client: httpx.AsyncClient, server: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("serve run exited")
        try:
            if (await client.post("/v1/images/generations", json=BODY)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(2)
    raise RuntimeError("server not ready")


async def capacity(client: httpx.AsyncClient, seconds: float, concurrency: int = 4) -> float:
    log: list = []
    start = time.monotonic()

    async def worker():
        while time.monotonic() - start < seconds:
            await one(client, log, start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    ok = sum(1 for _, _, s in log if s == 200)
    return ok / (time.monotonic() - start)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


async def soak(args, server: subprocess.Popen, client: httpx.AsyncClient) -> dict:
    await wait_ready(client, server)
    cap = await capacity(client, args.capacity_s)
    rate = args.load * cap
    print(f"capacity {cap:.2f} req/s; holding {rate:.2f} req/s for {args.duration_s:.0f}s", flush=True)
    log: list = []
    memory: dict[str, list] = {}
    names: dict[int, str] = {}  # the title gains the method being run (".handle_request..."): keep the first
    start = time.monotonic()
    tasks: set[asyncio.Task] = set()
    next_sample = 0.0
    while (now := time.monotonic() - start) < args.duration_s:
        if now >= next_sample:
            for pid, (title, proc) in replicas(server.pid).items():
                name = names.setdefault(pid, f"{title} (pid {pid})")
                with contextlib.suppress(psutil.Error):
                    memory.setdefault(name, []).append((round(now), proc.memory_info().rss / 2**20))
            next_sample += args.sample_s
            done = len(log)
            print(f"{now:6.0f}s  done {done}  in flight {len(tasks)}  errors "
                  f"{sum(1 for _, _, s in log if s != 200)}", flush=True)
        task = asyncio.create_task(one(client, log, start))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        await asyncio.sleep(random.expovariate(rate))
    await asyncio.gather(*tasks)
    minutes = []
    for m in range(int(args.duration_s // 60) or 1):
        window = [(lat, s) for t, lat, s in log if m * 60 <= t < (m + 1) * 60]
        ok = [lat for lat, s in window if s == 200]
        minutes.append({"minute": m, "requests": len(window), "errors": len(window) - len(ok),
                        "p50_s": pct(ok, 0.5), "p99_s": pct(ok, 0.99)})
    statuses: dict[str, int] = {}
    for _, _, s in log:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    head = [lat for t, lat, s in log if s == 200 and t < 120]
    tail = [lat for t, lat, s in log if s == 200 and t >= args.duration_s - 120]
    return {
        "capacity_req_per_s": cap, "rate_req_per_s": rate, "duration_s": args.duration_s,
        "requests": len(log), "statuses": statuses,
        "p99_first_2min_s": pct(head, 0.99), "p99_last_2min_s": pct(tail, 0.99),
        "p50_all_s": pct([lat for _, lat, s in log if s == 200], 0.5),
        "minutes": minutes,
        "memory_mib": {name: {"first": series[0][1], "last": series[-1][1], "max": max(v for _, v in series),
                              "series": series} for name, series in memory.items()},
    }


def markdown(result: dict) -> str:
    lines = [
        f"capacity {result['capacity_req_per_s']:.2f} req/s, held {result['rate_req_per_s']:.2f} req/s "
        f"for {result['duration_s']:.0f} s: {result['requests']} requests, statuses {result['statuses']}",
        f"p50 {result['p50_all_s']:.3f} s; p99 first 2 min {result['p99_first_2min_s']:.3f} s, "
        f"last 2 min {result['p99_last_2min_s']:.3f} s",
        "", "| process | RSS first (MiB) | last | max |", "|---|---|---|---|",
    ]
    for name, m in sorted(result["memory_mib"].items()):
        lines.append(f"| {name} | {m['first']:.0f} | {m['last']:.0f} | {m['max']:.0f} |")
    lines += ["", "| minute | requests | errors | p50 s | p99 s |", "|---|---|---|---|---|"]
    for m in result["minutes"]:
        lines.append(f"| {m['minute']} | {m['requests']} | {m['errors']} | {m['p50_s']:.3f} | {m['p99_s']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=1200)
    parser.add_argument("--load", type=float, default=0.5, help="fraction of measured capacity")
    parser.add_argument("--capacity-s", type=float, default=60)
    parser.add_argument("--sample-s", type=float, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="artserve-soak-"))
    port = free_port()
    server = start_server(work, port)
    try:
        async def run() -> dict:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120,
                                         limits=httpx.Limits(max_connections=200)) as client:
                return await soak(args, server, client)

        result = asyncio.run(run())
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (RESULTS / f"soak-{stamp}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (RESULTS / f"soak-{stamp}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
