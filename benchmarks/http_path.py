"""Where the milliseconds of the HTTP path go, for a near-empty generation.

    .venv/bin/python benchmarks/http_path.py [--requests 60] [--profile-s 20]       # ~4 min

Starts `serve run` with tiny-sd, sends 1-step requests (jpeg, b64_json) at concurrency 1 and
splits each one's latency with the `Server-Timing` header the service returns: `ingress`
(the ingress replica, from its middleware to its response), `handle` (its call to the model
replica and back), `engine` (arrival at the replica until the image left the step loop:
hand-off to the loop thread, prepare, the step, the decode) and `encode` (encode and b64 on
the encoder pool). The rest is the client and Serve's HTTP proxy. Beside them, the same
1-step pipeline call in process (the floor). Then py-spy samples the ingress and the model
replica (wall clock, idle included) during a second run and lists the frames that hold the
most time. benchmarks/serve_hops.py gives what Serve itself costs per hop.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import serving  # noqa: E402

BODY = {"model": "tiny-sd", "prompt": "a lighthouse at dusk", "num_inference_steps": 1, "output_format": "jpeg",
        "response_format": "b64_json"}


def timings(header: str) -> dict[str, float]:
    pairs = (part.strip().split(";") for part in header.split(","))
    return {name: float(dur.removeprefix("dur=")) for name, dur in pairs}


def sample(client: httpx.Client, requests: int) -> dict[str, list[float]]:
    parts: dict[str, list[float]] = collections.defaultdict(list)
    for _ in range(requests):
        started = time.perf_counter()
        response = client.post("/v1/images/generations", json=BODY)
        parts["client"].append(1000 * (time.perf_counter() - started))
        response.raise_for_status()
        for name, ms in timings(response.headers["server-timing"]).items():
            parts[name].append(ms)
    return parts


def in_process_ms(repeats: int = 20) -> float:
    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine, PipelineInputs

    engine = DiffusersEngine(load_model_config(ROOT / "models" / "tiny-sd.yaml"))
    inputs = PipelineInputs(256, 256, 1, 7.5, [BODY["prompt"]], [None], [0])
    engine.generate(inputs)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.generate(inputs)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def serve_pids(pattern: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:] if pattern in line and "ps -eo" not in line]


def profile(pid: int, seconds: float, out: Path) -> None:
    subprocess.run([str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(pid), "-d", str(int(seconds)),
                    "-r", "250", "--idle", "-f", "raw", "-o", str(out), "--nonblocking"],
                   capture_output=True, timeout=seconds + 60)


def hot_frames(raw: Path, top: int = 14) -> list[tuple[float, str]]:
    """Share of samples each frame appears in (inclusive), for frames of the serving path."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        for frame in set(stack.split(";")):
            counts[frame] += int(n)
    # The serving path's own code, not the threads and event loops that carry it.
    keep = ("serve_app/", "fastapi/", "starlette/", "pydantic/", "json/", "PIL/", "base64", "ray/serve/_private/",
            "cloudpickle", "diffusers/", "torch/nn/")
    idle = ("_run_user_code_event_loop", "_run_router_event_loop", "run_forever", "_run_once", "select")
    frames = [(100 * c / total, f) for f, c in counts.most_common()
              if any(k in f for k in keep) and not any(i in f for i in idle)]
    return frames[:top]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--profile-s", type=float, default=20)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work, ray_tmp = Path(tempfile.mkdtemp(prefix="artserve-path-")), Path(tempfile.mkdtemp(prefix="artserve-pr-"))
    process, base = serving.start(work, ray_tmp, [serving.variant("tiny-sd")])
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            sample(client, 10)  # warm-up
            parts = sample(client, args.requests)
            pids = {"ingress": serve_pids("ImageIngress"), "replica": serve_pids("ModelServer:tiny-sd")}
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    client.post("/v1/images/generations", json=BODY)

            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            threads = [threading.Thread(target=profile, args=(pid[0], args.profile_s, work / f"{name}.txt"))
                       for name, pid in pids.items() if pid]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            stop.set()
            loader.join(timeout=60)
    finally:
        serving.stop(process, ray_tmp)
    floor = in_process_ms()
    m = {name: statistics.median(v) for name, v in parts.items()}
    lines = [f"1-step tiny-sd, jpeg, b64_json, c=1, medians of {args.requests} (ms):", "",
             "| part | ms |", "|---|---|",
             f"| client total | {m['client']:.1f} |",
             f"| client + Serve's HTTP proxy (total - ingress) | {m['client'] - m['ingress']:.1f} |",
             f"| ingress own work (ingress - handle) | {m['ingress'] - m['handle']:.1f} |",
             f"| handle hop to the replica and back (handle - engine - encode) | "
             f"{m['handle'] - m['engine'] - m['encode']:.1f} |",
             f"| replica: arrival to the image out of the step loop (engine) | {m['engine']:.1f} |",
             f"| replica: encode + b64 (encode) | {m['encode']:.1f} |",
             f"| the same 1-step pipeline call in process | {floor:.1f} |",
             f"| **HTTP path over the in-process call** | **{m['client'] - floor:.1f}** |", ""]
    for name in ("ingress", "replica"):
        raw = work / f"{name}.txt"
        if raw.exists():
            lines += [f"py-spy, {name} process (share of wall-clock samples, inclusive):", ""]
            lines += [f"- {share:.0f} % {frame}" for share, frame in hot_frames(raw)] + [""]
    print("\n".join(lines))
    shutil.rmtree(ray_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
