"""ArtServe against LitServe (Lightning's serving engine) on the same tiny SD3 pipeline, runs
interleaved on one machine.

    .venv/bin/python benchmarks/peer_litserve.py [--model tiny-sd3] [--requests 40]     # ~10 min

The peer is what a team would write with LitServe: one LitAPI holding the same diffusers
pipeline (serve_app's DiffusersEngine, the model's YAML: same weights, threads, presets),
LitServe's dynamic batching (max_batch_size 4, batch_timeout 20 ms), a batch run as one
`pipeline(...)` call per step count (a request-level batcher must run different step counts
apart), PNG as base64 in JSON both sides. ArtServe: `serve run` with the model under the `cost`
and `fixed` policies (`<id>-cost`, `<id>-fixed`), `response_format: b64_json`, `output_format: png`;
`--env-arm KEY=VALUE,...` adds `fixed` on a second ArtServe whose Ray runs with those variables.
Measured, alternating the servers request by request or run by run:
- c=1: p50 latency of `standard` requests (and of a 1-step request: the serving path);
- c=8: images/s and p99 of `standard` requests in a closed loop;
- c=8 on mixed presets (standard/hd/low = 50/30/20 %, the same sequence on every server).
Writes benchmarks/results/peer_litserve-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import litserve as ls

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import serving  # noqa: E402
from serve_app.ray_env import let_children_take_ctrl_c  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MIX = [("standard", 0.5), ("hd", 0.3), ("low", 0.2)]
PROMPT = "a lighthouse at dusk"


# -- the peer: LitServe -------------------------------------------------------------------
class DiffusionAPI(ls.LitAPI):
    """At module level: LitServe pickles it into its worker process."""

    def __init__(self, model_id: str, **options):
        super().__init__(**options)
        self.model_id = model_id

    def setup(self, device):
        from serve_app.config import load_model_config
        from serve_app.engine.pipeline import DiffusersEngine

        self.config = load_model_config(ROOT / "models" / f"{self.model_id}.yaml")
        self.engine = DiffusersEngine(self.config)

    def decode_request(self, request):
        preset = self.config.quality_preset(request.get("quality", "standard"))
        steps = request.get("num_inference_steps", preset.num_inference_steps)
        return request["prompt"], steps, preset.guidance_scale, request.get("seed", 0)

    def predict(self, batch):
        from serve_app.engine.pipeline import PipelineInputs

        width, height = map(int, self.config.default_size.split("x"))
        images: dict[int, object] = {}
        by_steps: dict[tuple, list[int]] = {}
        for index, (_, steps, guidance, _) in enumerate(batch):  # one call per step count
            by_steps.setdefault((steps, guidance), []).append(index)
        for (steps, guidance), indices in by_steps.items():
            out = self.engine.generate(PipelineInputs(
                width, height, steps, guidance, [batch[i][0] for i in indices], [None] * len(indices),
                [batch[i][3] for i in indices]))
            images.update(zip(indices, out, strict=True))
        return [images[i] for i in range(len(batch))]

    def encode_response(self, image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=6)
        return {"data": [{"b64_json": base64.b64encode(buffer.getvalue()).decode()}]}


def litserve_main(model_id: str, port: int) -> None:
    """Runs in its own process: `python benchmarks/peer_litserve.py --serve-litserve MODEL PORT`."""
    api = DiffusionAPI(model_id, max_batch_size=4, batch_timeout=0.02, api_path="/v1/images/generations")
    ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=600).run(port=port, generate_client_file=False)


def start_litserve(model_id: str, work: Path) -> tuple[subprocess.Popen, str]:
    port = serving.free_port()
    log = open(work / "litserve.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen([sys.executable, __file__, "--serve-litserve", model_id, str(port)], cwd=ROOT,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def start_artserve(model_id: str, work: Path, policies: tuple[str, ...] = ("cost", "fixed"),
                   env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, list[str]]:
    ids = [f"{model_id}-{policy}" for policy in policies]
    models = [serving.variant(model_id, new_id, policy=policy) for new_id, policy in zip(ids, policies, strict=True)]
    work.mkdir(exist_ok=True)
    process, base = serving.start(work, Path(tempfile.mkdtemp(prefix="artserve-peer-")), models, env=env)
    return process, base, ids


# -- the load -----------------------------------------------------------------------------
class Target:
    def __init__(self, name: str, base: str, model: str):
        self.name, self.model = name, model
        self.http = httpx.AsyncClient(base_url=base, timeout=600)

    async def generate(self, quality: str = "standard", **extra) -> float:
        body = {"model": self.model, "prompt": PROMPT, "quality": quality, "response_format": "b64_json",
                "output_format": "png", **extra}
        started = time.perf_counter()
        response = await self.http.post("/v1/images/generations", json=body)
        response.raise_for_status()
        assert response.json()["data"][0]["b64_json"]
        return time.perf_counter() - started

    async def closed(self, qualities: list[str], concurrency: int = 8) -> dict:
        queue, latencies = list(reversed(qualities)), []
        started = time.perf_counter()

        async def worker():
            while queue:
                latencies.append(await self.generate(queue.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        ordered = sorted(latencies)
        return {"images_per_s": len(latencies) / wall, "p50_s": statistics.median(latencies),
                "p99_s": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
                "mean_s": statistics.fmean(latencies)}


async def measure(targets: list[Target], requests: int, rounds: int) -> dict:
    out: dict = {t.name: {"c1_standard_s": [], "c1_one_step_s": [], "c8_standard": [], "c8_mixed": []}
                 for t in targets}
    for target in targets:  # warm-up
        await target.generate(num_inference_steps=2)
    rng = random.Random(3)
    mixed = [rng.choices([q for q, _ in MIX], [w for _, w in MIX])[0] for _ in range(requests)]
    for round_ in range(rounds):
        order = targets if round_ % 2 == 0 else targets[::-1]  # alternate who goes first
        for _ in range(5):
            for target in order:
                out[target.name]["c1_standard_s"].append(await target.generate())
                out[target.name]["c1_one_step_s"].append(await target.generate(num_inference_steps=1))
        for target in order:
            out[target.name]["c8_standard"].append(await target.closed(["standard"] * requests))
        for target in order:
            out[target.name]["c8_mixed"].append(await target.closed(mixed))
        print(f"round {round_ + 1}/{rounds} done", flush=True)
    summary = {}
    for name, runs in out.items():
        summary[name] = {
            "c1_standard_p50_s": statistics.median(runs["c1_standard_s"]),
            "c1_one_step_p50_s": statistics.median(runs["c1_one_step_s"]),
            **{f"{scenario}_{k}": statistics.median(r[k] for r in runs[scenario])
               for scenario in ("c8_standard", "c8_mixed") for k in ("images_per_s", "p50_s", "p99_s", "mean_s")},
        }
    return {"raw": out, "summary": summary}


def table(summary: dict, peer: str = "litserve") -> str:
    lines = ["| server | c=1 standard p50 s | c=1 1-step p50 s | c=8 standard images/s | p99 s | c=8 mixed images/s "
             "| p99 s | mean s |", "|---" * 8 + "|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['c1_standard_p50_s']:.3f} | {s['c1_one_step_p50_s']:.3f} | "
                     f"{s['c8_standard_images_per_s']:.2f} | {s['c8_standard_p99_s']:.2f} | "
                     f"{s['c8_mixed_images_per_s']:.2f} | {s['c8_mixed_p99_s']:.2f} | {s['c8_mixed_mean_s']:.2f} |")
    base = summary[peer]
    lines += ["", f"| vs {peer} | c=1 standard p50 | c=1 1-step p50 | c=8 standard images/s | p99 | "
              "c=8 mixed images/s | p99 | mean |", "|---" * 8 + "|"]
    for name, s in summary.items():
        if name == peer:
            continue
        lines.append(
            f"| {name} | {1000 * (s['c1_standard_p50_s'] - base['c1_standard_p50_s']):+.0f} ms | "
            f"{1000 * (s['c1_one_step_p50_s'] - base['c1_one_step_p50_s']):+.0f} ms | "
            f"{s['c8_standard_images_per_s'] / base['c8_standard_images_per_s']:.2f}x | "
            f"{s['c8_standard_p99_s'] / base['c8_standard_p99_s']:.2f}x | "
            f"{s['c8_mixed_images_per_s'] / base['c8_mixed_images_per_s']:.2f}x | "
            f"{s['c8_mixed_p99_s'] / base['c8_mixed_p99_s']:.2f}x | "
            f"{s['c8_mixed_mean_s'] / base['c8_mixed_mean_s']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-litserve":
        litserve_main(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-sd3")
    parser.add_argument("--requests", type=int, default=40, help="per closed-loop run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--env-arm", default="", metavar="KEY=VALUE,...",
                        help="also run the fixed policy on a second ArtServe whose Ray gets these variables "
                             "(e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1), interleaved with the rest")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    let_children_take_ctrl_c()  # the servers are stopped with SIGINT
    processes = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            lit, lit_base = start_litserve(args.model, work)
            processes.append(lit)
            art, art_base, ids = start_artserve(args.model, work / "artserve")
            processes.append(art)
            targets = [Target("litserve", lit_base, args.model), Target("artserve (cost)", art_base, ids[0]),
                       Target("artserve (fixed)", art_base, ids[1])]
            if args.env_arm:
                env = dict(pair.split("=", 1) for pair in args.env_arm.split(","))
                other, other_base, other_ids = start_artserve(args.model, work / "artserve-env", ("fixed",), env)
                processes.append(other)
                targets.append(Target(f"artserve (fixed, {args.env_arm})", other_base, other_ids[0]))
            serving.wait_ready(lit_base, [args.model], timeout_s=900)
            results = asyncio.run(measure(targets, args.requests, args.rounds))
        finally:
            for process in processes:
                os.killpg(process.pid, signal.SIGINT)
            for process in processes:
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
    text = table(results["summary"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"peer_litserve-{stamp}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"peer_litserve-{stamp}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
