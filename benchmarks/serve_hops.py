"""What Ray Serve itself costs per hop on this machine, with nothing of ArtServe in the way.

    .venv/bin/python benchmarks/serve_hops.py [--requests 200] [--payload-kb 100]      # ~3 min

One `serve run` of a two-deployment app, at concurrency 1, interleaved request by request:
- `/direct`: the HTTP proxy -> a FastAPI ingress replica that answers at once (one hop);
- `/handle`: the same, calling a second deployment through a handle (two hops), which
  returns a constant;
- `/payload`: two hops, the second returning a `--payload-kb` string (a 256² PNG as base64
  is ~100 KB), which the ingress puts in a JSON body: what moving an image back costs;
- the same FastAPI app under plain uvicorn in another process (no Serve: the floor).
Medians (and p90) in ms; the differences are the hops. Writes benchmarks/results/serve_hops-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from serve_app.ray_env import let_children_take_ctrl_c  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

APP = '''
import os
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from ray import serve

PAYLOAD = "x" * (int(os.environ.get("PAYLOAD_KB", "100")) * 1024)
api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Inner:
    def small(self) -> str:
        return "ok"

    def payload(self) -> str:
        return PAYLOAD


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Outer:
    def __init__(self, inner=None):
        self.inner = inner

    @api.post("/direct")
    async def direct(self) -> JSONResponse:
        return JSONResponse({"data": "ok"})

    @api.post("/handle")
    async def handle(self) -> JSONResponse:
        return JSONResponse({"data": await self.inner.small.remote()})

    @api.post("/payload")
    async def payload(self) -> JSONResponse:
        return JSONResponse({"data": [{"b64_json": await self.inner.payload.remote()}]})


app = Outer.bind(Inner.bind())

plain = FastAPI()


@plain.post("/direct")
async def plain_direct() -> JSONResponse:
    return JSONResponse({"data": "ok"})


@plain.post("/payload")
async def plain_payload() -> JSONResponse:
    return JSONResponse({"data": [{"b64_json": PAYLOAD}]})
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(url: str, deadline_s: float = 240) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if httpx.post(url, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--payload-kb", type=int, default=100)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    let_children_take_ctrl_c()  # the servers are stopped with SIGINT
    work = Path(tempfile.mkdtemp(prefix="artserve-hops-"))
    (work / "hops_app.py").write_text(APP)
    env = {**os.environ, "PYTHONPATH": str(work), "PAYLOAD_KB": str(args.payload_kb), "RAY_TMPDIR": str(work),
           "RAY_USAGE_STATS_ENABLED": "0"}
    serve_port, plain_port = free_port(), free_port()
    config = work / "serve.yaml"
    config.write_text(f"http_options: {{host: 127.0.0.1, port: {serve_port}}}\n"
                      "applications:\n  - name: hops\n    route_prefix: /\n    import_path: hops_app:app\n")
    bin_dir = Path(sys.executable).parent
    processes = [
        subprocess.Popen([str(bin_dir / "serve"), "run", str(config)], cwd=work, env=env, start_new_session=True,
                         stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT),  # noqa: SIM115
        subprocess.Popen([str(bin_dir / "uvicorn"), "hops_app:plain", "--port", str(plain_port), "--log-level",
                          "warning"], cwd=work, env=env, start_new_session=True,
                         stdout=open(work / "uvicorn.log", "wb"), stderr=subprocess.STDOUT),  # noqa: SIM115
    ]
    try:
        serve, plain = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{plain_port}"
        for url in (f"{serve}/direct", f"{serve}/handle", f"{serve}/payload", f"{plain}/direct"):
            wait(url)
        routes = {"uvicorn, no Serve": f"{plain}/direct", "uvicorn, payload": f"{plain}/payload",
                  "Serve: proxy -> ingress": f"{serve}/direct", "Serve: proxy -> ingress -> handle": f"{serve}/handle",
                  "Serve: ... -> handle, payload back": f"{serve}/payload"}
        times: dict[str, list[float]] = {name: [] for name in routes}
        with httpx.Client(timeout=30) as client:
            for _ in range(10):  # warm-up
                for url in routes.values():
                    client.post(url)
            for _ in range(args.requests):
                for name, url in routes.items():
                    started = time.perf_counter()
                    client.post(url).raise_for_status()
                    times[name].append(1000 * (time.perf_counter() - started))
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGINT)
        for process in processes:
            process.wait(timeout=60)
    summary = {name: {"p50_ms": statistics.median(v), "p90_ms": sorted(v)[int(0.9 * len(v))]}
               for name, v in times.items()}
    lines = ["| path (c=1) | p50 ms | p90 ms |", "|---|---|---|"]
    lines += [f"| {name} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} |" for name, s in summary.items()]
    p = {name: s["p50_ms"] for name, s in summary.items()}
    hop = p["Serve: proxy -> ingress -> handle"] - p["Serve: proxy -> ingress"]
    lines += ["", f"Serve's proxy hop: {p['Serve: proxy -> ingress'] - p['uvicorn, no Serve']:+.2f} ms over plain "
              f"uvicorn; a handle hop: {hop:+.2f} ms; "
              f"a {args.payload_kb} KB result back through it: "
              f"{p['Serve: ... -> handle, payload back'] - p['Serve: proxy -> ingress -> handle']:+.2f} ms "
              f"(plain uvicorn: {p['uvicorn, payload'] - p['uvicorn, no Serve']:+.2f} ms)."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"serve_hops-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
