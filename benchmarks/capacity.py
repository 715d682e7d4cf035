"""Capacity planning from the simulator: how many replicas of each catalog model serve a rate
of images at a p99 target, per policy (the tables of docs/capacity.md).

    .venv/bin/python benchmarks/capacity.py [--rates 10 100 1000] [--requests 3000]     # ~2 min
    .venv/bin/python benchmarks/capacity.py --gpu h200     # every model with a curve measured on that GPU

Each replica is simulated (benchmarks/simulate.py, the real scheduler) with its model's curve
from benchmarks/curves.yaml, mixed presets (standard/hd/low = 50/30/20 %, one image each),
receiving an equal share of the Poisson arrivals: rate / replicas. That is pessimistic
against Serve's router, which sends each request to the less busy of two replicas. The
smallest count whose p99 meets the target is the answer (binary search: p99 falls as the
share does). With it, Little's law gives each replica's mean ongoing requests at that load
(share x mean latency): the `target_ongoing_requests` that holds that many replicas.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import simulate

MIX = {"standard": 0.5, "hd": 0.3, "low": 0.2}
# The catalog: model -> the curve of its YAML's accelerator.
CATALOG = {"flux-dev": "flux-dev-h100", "flux-schnell": "flux-schnell-h100", "sd3.5-large": "sd3.5-large-h100",
           "sdxl": "sdxl-l4", "sdxl-turbo": "sdxl-turbo-l4"}
TARGET_FACTOR = 4  # p99 target: this many times an `hd` image alone (an operator's budget, stated)


# The columns: (policy, max_wait_factor) -- the cost policy at its default bound and at 0
# (every request urgent on arrival: first come first served, sharing where it pays; p99 first).
ARMS = {"call": ("call", 1.0), "fixed": ("fixed", 1.0), "cost": ("cost", 1.0), "cost, max_wait_factor 0": ("cost", 0.0)}


def p99_at(curve: simulate.Curve, rate_per_s: float, replicas: int, arm: tuple[str, float],
           requests: int) -> tuple[float, float]:
    share = rate_per_s / replicas
    policy, factor = arm
    result = simulate.simulate(simulate.poisson(share, requests, MIX, seed=11), curve, policy,
                               max_wait_factor=factor).summary()
    return result["p99_s"], result["mean_s"]


def replicas_for(curve: simulate.Curve, images_per_min: float, target_s: float, policy: tuple[str, float],
                 requests: int) -> dict:
    rate = images_per_min / 60
    capacity = simulate.capacity_rps(curve, MIX, policy="call")
    low = max(1, math.ceil(rate / capacity))  # fewer cannot keep up at all
    high = low
    while p99_at(curve, rate, high, policy, requests)[0] > target_s:
        low, high = high + 1, high * 2
    while low < high:  # the smallest count in [low, high] that meets the target
        middle = (low + high) // 2
        if p99_at(curve, rate, middle, policy, requests)[0] <= target_s:
            high = middle
        else:
            low = middle + 1
    p99, mean = p99_at(curve, rate, high, policy, requests)
    return {"replicas": high, "p99_s": p99, "mean_s": mean, "ongoing_per_replica": rate / high * mean}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", nargs="+", type=float, default=[10, 100, 1000], help="images per minute")
    parser.add_argument("--requests", type=int, default=3000, help="simulated per point")
    parser.add_argument("--gpu", help="instead of each model's accelerator, the curves named <model>-<gpu>")
    args = parser.parse_args()
    curves = simulate.load_curves()
    catalog = CATALOG
    if args.gpu:
        suffix = f"-{args.gpu}"
        catalog = {name.removesuffix(suffix): name for name in curves if name.endswith(suffix)}
    lines = ["| model (curve) | p99 target s | images/min | replicas (p99 s / mean s): " + " | ".join(ARMS)
             + " | ongoing per replica (cost) |", "|---" * (4 + len(ARMS)) + "|"]
    for model, name in catalog.items():
        curve = curves[name]
        target_s = TARGET_FACTOR * curve.service_s(curve.steps["hd"])
        for rate in args.rates:
            cells, rows = [], {}
            for arm, spec in ARMS.items():
                rows[arm] = replicas_for(curve, rate, target_s, spec, args.requests)
                cells.append(f"{rows[arm]['replicas']} ({rows[arm]['p99_s']:.1f} / {rows[arm]['mean_s']:.1f})")
            lines.append(f"| {model} ({name}) | {target_s:.1f} | {rate:g} | {' | '.join(cells)} | "
                         f"{rows['cost']['ongoing_per_replica']:.1f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
