"""What an idle Ray Serve instance costs a CPU denoiser beside it: no request, no hop.

    .venv/bin/python benchmarks/ray_ambient.py [--model tiny-sd3] [--requests 12] [--rounds 2]   # ~4 min

A probe process runs the real runner, scheduler (`fixed`) and step loop in process, one
`standard` request at a time (no HTTP, no Ray), and prints its p50 latency and ms per step. It
runs with no Serve instance on the machine, then beside an idle `serve run` of the same model,
then with that instance's processes frozen (SIGSTOP, all of them or one group at a time:
controller, replicas and proxy, GCS and raylet, dashboard and agents) and resumed (SIGCONT)
after each probe. Only processes this script started are frozen. What the probe loses beside
the idle instance is what Ray's own background work takes from torch's threads on this
machine, whatever ArtServe's path costs per request (http_path.py, serve_hops.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GROUPS = {  # pgrep -f patterns, matched among the descendants of our `serve run` only
    "controller": "ray::ServeController",
    "replicas and proxy": "ray::ServeReplica|ray::ProxyActor",
    "GCS and raylet": "gcs_server|raylet",
    "dashboard and agents": "dashboard|runtime_env|log_monitor|monitor.py|ray::Dash|ray-dashb",
}


class NoMetrics:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def probe(model_id: str, requests: int) -> None:
    """In this process: c=1 `standard` requests through the step loop; one line of results."""
    from serve_app.config import load_model_config
    from serve_app.engine.pipeline import DiffusersEngine
    from serve_app.engine.runners import ImageSpec, make_runner
    from serve_app.engine.threads import run_on_own_thread
    from serve_app.replica.scheduler import StepScheduler, Ticket
    from serve_app.replica.steploop import StepLoop, Work

    config = load_model_config(ROOT / "models" / f"{model_id}.yaml")
    runner = run_on_own_thread(make_runner, run_on_own_thread(DiffusersEngine, config))
    loop = StepLoop(runner, StepScheduler(config.batching.max_batch_size, "fixed"), NoMetrics(), lambda exc: exc)
    preset = config.quality["standard"]
    width, height = map(int, config.default_size.split("x"))

    def run(seed: int) -> float:
        spec = ImageSpec("a lighthouse at dusk", None, width, height, preset.num_inference_steps,
                         preset.guidance_scale, seed)
        done, started = threading.Event(), time.perf_counter()
        ticket = Ticket(f"r{seed}", 0, runner.batch_key(spec), time.monotonic(), steps=spec.steps)
        loop.submit([Work(ticket, spec, lambda image, batch: done.set())])
        done.wait()
        return time.perf_counter() - started

    for seed in range(3):  # warm-up
        run(seed)
    loop.stats.steps, loop.stats.step_s = 0, 0.0
    walls = [run(seed) for seed in range(requests)]
    print(f"p50 {1000 * statistics.median(walls):.1f} ms, {1000 * loop.stats.step_s / loop.stats.steps:.2f} ms a step")


def descendants(root: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for pid, ppid in zip(out[::2], out[1::2], strict=True):
        children.setdefault(int(ppid), []).append(int(pid))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def matching(pattern: str, ours: set[int]) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in out if int(pid) in ours]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-sd3")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.model, args.requests)
        return
    from benchmarks import serving

    def measure(label: str, frozen: list[int] = ()) -> None:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            line = subprocess.run([sys.executable, __file__, "--probe", "--model", args.model, "--requests",
                                   str(args.requests)], capture_output=True, text=True, check=True).stdout
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        print(f"| {label} | {line.strip().splitlines()[-1]} |", flush=True)
        time.sleep(2)  # let the resumed processes catch up before the next probe

    print("| Serve instance | in-process probe |\n|---|---|")
    measure("none on the machine")
    work, ray_tmp = Path(tempfile.mkdtemp(prefix="ambient-")), Path(tempfile.mkdtemp(prefix="ambient-ray-"))
    process, _ = serving.start(work, ray_tmp, [serving.variant(args.model, policy="fixed")])
    try:
        time.sleep(5)
        ours = set(descendants(process.pid))
        for _ in range(args.rounds):
            measure("idle")
            measure("idle, all of it frozen", sorted(ours))
            for name, pattern in GROUPS.items():
                measure(f"idle, {name} frozen", matching(pattern, ours))
    finally:
        serving.stop(process, ray_tmp)
    measure("none on the machine")


if __name__ == "__main__":
    main()
