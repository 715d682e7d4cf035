"""One model replica in virtual time: the real step scheduler (serve_app/replica/scheduler.py)
and the real cost model (serve_app/replica/costmodel.py), driven by a cost curve instead of
a denoiser and by a seeded arrival trace instead of clients. No torch, no Ray, no clock:
deterministic, 10,000 requests in seconds.

    .venv/bin/python benchmarks/simulate.py --curve tiny-flux-cpu --load 0.9 --policy cost
    .venv/bin/python benchmarks/simulate.py --cost "1:0.0365,2:0.073,4:0.146" --prepare-s 0.004 \\
        --finish-s 0.012 --steps standard=28,hd=50,low=12 --mix standard=0.5,hd=0.3,low=0.2 --load 0.7 --json
    .venv/bin/python benchmarks/simulate.py --compare          # every curve x scenario x policy (docs/capacity.md)

The replica it models is the one serve_app runs: requests beyond `max_ongoing_requests`
(Serve's default here: 2 x cap + 2) wait in Serve's first-come-first-served queue outside
the scheduler, beyond `max_queued_requests` (8 x cap) they are refused (429); admitted
images are prepared (text encoding: the images admitted at a boundary in one call, of
`prepare_s` seconds an image, or of the curve's measured seconds by number of images),
stepped (one call of the curve's cost at the batch's size) and finished (VAE decode: those
that finish together in one call, `finish_s` likewise) on one device, in the order the
scheduler says. Whole calls (`call`) run prepare, every step and finish in one
call. `--load` is a fraction of capacity, defined once for both this and the HTTP benchmark:
the requests per second whole calls (first come first served, batches up to the cap) serve
in a closed loop of 8 clients for the same mix.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from serve_app.replica.costmodel import CostModel, interpolate
from serve_app.replica.costpolicy import calls
from serve_app.replica.scheduler import StepScheduler, Ticket

CURVES = Path(__file__).with_name("curves.yaml")
POLICIES = ("call", "fixed", "cost")
CAPACITY_CLIENTS = 8


@dataclass(frozen=True)
class Curve:
    """A device's cost of one denoiser call by batch size, with prepare/finish per image or per call by size."""

    name: str
    points: tuple[tuple[int, float], ...]  # (batch size, seconds per denoiser call)
    prepare_s: float | dict[int, float] = 0.0  # seconds an image, or images -> seconds of one call
    finish_s: float | dict[int, float] = 0.0
    steps: dict[str, int] = field(default_factory=lambda: {"standard": 28})  # preset -> steps
    cap: int = 4
    kind: str = "given"  # measured | published | derived
    source: str = ""

    def step_s(self, size: int) -> float:
        return interpolate(list(self.points), size)

    def prepare(self, images: int) -> float:
        """Seconds of one prepare call over `images` images."""
        return per_call_s(self.prepare_s, images)

    def finish(self, images: int) -> float:
        return per_call_s(self.finish_s, images)

    def service_s(self, steps: int, n: int = 1, cap: int | None = None) -> float:
        """One request alone: its images in calls of at most `cap`."""
        sizes = calls(n, cap or self.cap)
        return sum(steps * self.step_s(size) + self.prepare(size) + self.finish(size) for size in sizes)


def per_call_s(cost: float | dict[int, float], images: int) -> float:
    return interpolate(sorted(cost.items()), images) if isinstance(cost, dict) else cost * images


@dataclass(frozen=True)
class Request:
    at_s: float
    preset: str
    n: int = 1


@dataclass
class Result:
    latencies_s: list[float]  # per served request, in arrival order
    waits_s: list[float]  # latency minus the request's own service time alone
    images: int
    makespan_s: float
    batch_sizes: list[int]  # images per denoiser call (per whole call for `call`)
    rejected: int = 0
    presets: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.latencies_s)
        return {"p50_s": percentile(ordered, 0.5), "p99_s": percentile(ordered, 0.99),
                "mean_s": statistics.fmean(ordered), "images_per_s": self.images / self.makespan_s,
                "mean_batch": statistics.fmean(self.batch_sizes), "longest_wait_s": max(self.waits_s),
                "rejected": self.rejected, "requests": len(ordered)}


def percentile(ordered: list[float], p: float) -> float:
    """Nearest rank, as benchmarks/step_engine.py computes it."""
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else math.nan


def poisson(rate_per_s: float, requests: int, mix: dict[str, float], seed: int,
            n_mix: dict[int, float] | None = None) -> list[Request]:
    rng, at, out = random.Random(seed), 0.0, []
    presets, weights = list(mix), list(mix.values())
    sizes, size_weights = list(n_mix or {1: 1.0}), list((n_mix or {1: 1.0}).values())
    for _ in range(requests):
        at += rng.expovariate(rate_per_s)
        out.append(Request(at, rng.choices(presets, weights)[0], rng.choices(sizes, size_weights)[0]))
    return out


def simulate(requests: list[Request], curve: Curve, policy: str, *, cap: int | None = None,
             max_wait_factor: float = 2.0, max_wait_s: float | None = None, max_ongoing: int | None = None,
             max_queued: int | None = None, noise: float = 0.0, seed: int = 0, overhead_s: float = 0.0) -> Result:
    """Serve `requests` (sorted by arrival) on one simulated replica. `noise`: the sigma of a
    log-normal factor on every measured call (the cost model learns from noisy timings)."""
    cap = cap or curve.cap
    max_ongoing = max_ongoing or 2 * cap + 2
    max_queued = math.inf if max_queued is None else max_queued
    scheduler = StepScheduler(cap, policy, max_wait_factor=max_wait_factor, max_wait_s=max_wait_s)  # type: ignore[arg-type]
    costs, rng = CostModel(), random.Random(seed)
    whole = policy == "call"
    left: dict[str, int] = {}  # request id -> images not finished
    outside: deque[int] = deque()  # Serve's queue in front of the replica
    latencies, waits, batches, served = [], [], [], []
    t, arrived, ongoing, rejected, images = 0.0, 0, 0, 0, 0

    def jitter(seconds: float) -> float:
        return seconds * math.exp(rng.gauss(0.0, noise)) if noise else seconds

    def enter(index: int) -> None:
        request, steps = requests[index], curve.steps[requests[index].preset]
        key = steps if whole else "image"  # whole calls batch one step count; steps share any
        left[str(index)] = request.n
        scheduler.submit([Ticket(str(index), i, key, t, steps=steps) for i in range(request.n)])

    while arrived < len(requests) or ongoing or outside:
        while arrived < len(requests) and requests[arrived].at_s <= t:
            if len(outside) >= max_queued:
                rejected += 1
            else:
                outside.append(arrived)
            arrived += 1
        while outside and ongoing < max_ongoing:
            enter(outside.popleft())
            ongoing += 1
        if scheduler.idle():
            t = max(t, requests[arrived].at_s)
            continue
        plan = scheduler.plan(t, costs)
        batch = plan.batch
        if plan.admit and not whole:
            seconds = jitter(curve.prepare(len(plan.admit)))
            costs.observe_prepare(plan.admit[0].key, len(plan.admit), seconds)
            t += seconds
        size = len(batch)
        steps = batch[0].steps if whole else 1
        seconds = jitter(steps * curve.step_s(size) + (curve.prepare(size) + curve.finish(size) if whole else 0))
        costs.observe_step(batch[0].key, size, seconds)
        scheduler.stepped(batch)
        t += seconds
        batches.append(size)
        finished = batch if whole else [ticket for ticket in batch if ticket.done >= ticket.steps]
        if not finished:
            continue
        if not whole:
            seconds = jitter(curve.finish(len(finished)))
            costs.observe_finish(finished[0].key, len(finished), seconds)
            t += seconds
        scheduler.finished(finished)
        images += len(finished)
        for ticket in finished:
            left[ticket.request_id] -= 1
            if left[ticket.request_id] == 0:
                request = requests[int(ticket.request_id)]
                latency = t - request.at_s + overhead_s
                latencies.append(latency)
                waits.append(latency - overhead_s - curve.service_s(curve.steps[request.preset], request.n, cap))
                served.append(request.preset)
                ongoing -= 1
    return Result(latencies, waits, images, t - requests[0].at_s, batches, rejected, served)


def capacity_rps(curve: Curve, mix: dict[str, float], *, cap: int | None = None, requests: int = 2000,
                 seed: int = 1, policy: str = "call", clients: int = CAPACITY_CLIENTS,
                 n_mix: dict[int, float] | None = None) -> float:
    """Requests per second served by a closed loop of `clients` (each sends its next request
    when the last one is answered): every request arrives at once and Serve lets `clients`
    into the replica at a time."""
    trace = [Request(0.0, r.preset, r.n) for r in poisson(1.0, requests, mix, seed, n_mix)]
    result = simulate(trace, curve, policy, cap=cap, max_ongoing=clients)
    return len(result.latencies_s) / result.makespan_s


def run(curve: Curve, mix: dict[str, float], policy: str, *, load: float | None = None, rate: float | None = None,
        requests: int = 10_000, seed: int = 1, n_mix: dict[int, float] | None = None, **options) -> dict:
    capacity = capacity_rps(curve, mix, cap=options.get("cap"), n_mix=n_mix)
    rate = rate if rate is not None else (load or 0.9) * capacity
    result = simulate(poisson(rate, requests, mix, seed, n_mix), curve, policy, seed=seed, **options)
    return {"curve": curve.name, "policy": policy, "rate_per_s": rate, "capacity_rps": capacity,
            "load": rate / capacity, **result.summary()}


# -- curves and the command line -----------------------------------------------------
def load_curves(path: Path = CURVES) -> dict[str, Curve]:
    import yaml

    data = yaml.safe_load(path.read_text())
    return {name: Curve(name, tuple(sorted((int(b), float(s)) for b, s in c["step_s"].items())),
                        per_image_or_calls(c.get("prepare_s", 0.0)), per_image_or_calls(c.get("finish_s", 0.0)),
                        dict(c["steps"]), c.get("cap", 4),
                        c["kind"], c["source"])
            for name, c in data["curves"].items()}


def per_image_or_calls(cost) -> float | dict[int, float]:
    """curves.yaml: seconds an image, or {images: seconds of one call} where measured by size."""
    return {int(k): float(v) for k, v in cost.items()} if isinstance(cost, dict) else float(cost)


def seconds_or_calls(text: str) -> float | dict[int, float]:
    return parse_pairs(text, int) if ":" in text else float(text)


def parse_pairs(text: str, key=str, value=float) -> dict:
    pairs = (item.split(":" if ":" in item else "=") for item in text.split(",") if item)
    return {key(k.strip()): value(v) for k, v in pairs}


SCENARIOS = {  # name -> (mix, load)
    "one preset 50%": ({"standard": 1.0}, 0.5),
    "one preset 90%": ({"standard": 1.0}, 0.9),
    "mixed 70%": ({"standard": 0.5, "hd": 0.3, "low": 0.2}, 0.7),
    "mixed 90%": ({"standard": 0.5, "hd": 0.3, "low": 0.2}, 0.9),
}


def compare(curves: dict[str, Curve], requests: int, seed: int, **options) -> tuple[list[dict], str]:
    rows, lines = [], ["| curve | scenario | rate req/s | policy | p50 s | p99 s | mean s | images/s | mean batch | "
                       "longest wait s | vs call: p50 | p99 | mean |", "|---" * 13 + "|"]
    for curve in curves.values():
        for scenario, (mix, load) in SCENARIOS.items():
            by_policy = {p: run(curve, mix, p, load=load, requests=requests, seed=seed, **options) for p in POLICIES}
            call = by_policy["call"]
            for policy, r in by_policy.items():
                r["scenario"] = scenario
                rows.append(r)
                ratio = (f"{r['p50_s'] / call['p50_s']:.2f}x | {r['p99_s'] / call['p99_s']:.2f}x | "
                         f"{r['mean_s'] / call['mean_s']:.2f}x")
                lines.append(f"| {curve.name} | {scenario} | {r['rate_per_s']:.2f} | {policy} | {r['p50_s']:.3f} | "
                             f"{r['p99_s']:.3f} | {r['mean_s']:.3f} | {r['images_per_s']:.2f} | "
                             f"{r['mean_batch']:.2f} | {r['longest_wait_s']:.2f} | {ratio} |")
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curve", help="a named curve of benchmarks/curves.yaml (default tiny-flux-cpu)")
    parser.add_argument("--cost", help='batch size:seconds per denoiser call, e.g. "1:0.0365,2:0.073,4:0.146"')
    parser.add_argument("--prepare-s", type=seconds_or_calls,
                        help='seconds to prepare one image (text encoding), or images:seconds of one call, '
                             'e.g. "1:0.01,4:0.02"')
    parser.add_argument("--finish-s", type=seconds_or_calls, help="seconds to finish one image (VAE decode), likewise")
    parser.add_argument("--steps", help="steps per preset, e.g. standard=28,hd=50,low=12")
    parser.add_argument("--mix", default="standard=1", help="preset shares, e.g. standard=0.5,hd=0.3,low=0.2")
    parser.add_argument("--n", default="1=1", help="images per request shares, e.g. 1=0.8,4=0.2")
    parser.add_argument("--load", type=float, help="fraction of whole calls' capacity (default 0.9)")
    parser.add_argument("--rate", type=float, help="requests per second (instead of --load)")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--policy", choices=POLICIES, default="cost")
    parser.add_argument("--cap", type=int, help="max_batch_size (default: the curve's)")
    parser.add_argument("--max-wait-factor", type=float, default=2.0)
    parser.add_argument("--max-wait-s", type=float)
    parser.add_argument("--noise", type=float, default=0.0, help="log-normal sigma on every measured call")
    parser.add_argument("--overhead-s", type=float, default=0.0, help="per request latency outside the replica")
    parser.add_argument("--compare", action="store_true", help="every curve x scenario x policy, as a table")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    options = {"max_wait_factor": args.max_wait_factor, "max_wait_s": args.max_wait_s, "noise": args.noise,
               "overhead_s": args.overhead_s, "cap": args.cap}
    curves = load_curves()
    if args.compare:
        chosen = {args.curve: curves[args.curve]} if args.curve else curves
        rows, table = compare(chosen, args.requests, args.seed, **options)
        print(json.dumps(rows, indent=2) if args.json else table)
        return
    curve = curves[args.curve or "tiny-flux-cpu"]
    if args.cost:
        curve = Curve("given", tuple(sorted(parse_pairs(args.cost, int).items())), curve.prepare_s, curve.finish_s,
                      curve.steps, curve.cap)
    changes = {"prepare_s": args.prepare_s, "finish_s": args.finish_s,
               "steps": parse_pairs(args.steps, value=int) if args.steps else None}
    curve = Curve(**{**curve.__dict__, **{k: v for k, v in changes.items() if v is not None}})
    result = run(curve, parse_pairs(args.mix), args.policy, load=args.load, rate=args.rate, requests=args.requests,
                 seed=args.seed, n_mix=parse_pairs(args.n, int), **options)
    print(json.dumps(result, indent=2) if args.json else
          "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
