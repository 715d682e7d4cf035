"""The cost models of a running `serve run`'s replicas, read from Ray's Prometheus endpoints
(the ones Ray lists in <RAY_TMPDIR>/ray/session_latest/prom_metrics_service_discovery.json):
what each replica measured a denoiser call to cost at each batch size, in place, under the
load it was serving. benchmarks/step_engine.py hands them to the simulator."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx

SAMPLE = re.compile(r"^ray_(artserve_cost_\w+?)\{(.*)\}\s+(\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def endpoints(ray_tmp: Path) -> list[str]:
    discovery = ray_tmp / "ray" / "session_latest" / "prom_metrics_service_discovery.json"
    return [f"http://{target}/metrics" for group in json.loads(discovery.read_text()) for target in group["targets"]]


def parse(text: str) -> dict[str, dict[str, dict]]:
    """model -> key -> {"step_s": {batch size: s}, "prepare_s": s, "finish_s": s}."""
    out: dict[str, dict[str, dict]] = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match[1], dict(LABEL.findall(match[2])), float(match[3])
        entry = out.setdefault(labels["model"], {}).setdefault(labels["key"], {"step_s": {}})
        if name == "artserve_cost_step_seconds":
            entry["step_s"][int(labels["batch_size"])] = value
        elif name in ("artserve_cost_prepare_seconds", "artserve_cost_finish_seconds"):
            entry[name.removeprefix("artserve_cost_").replace("_seconds", "_s")] = value
    return out


def scrape(ray_tmp: Path, wanted: list[str] = (), timeout_s: float = 90) -> dict[str, dict[str, dict]]:
    """Every model's cost model; waits (Ray's agent reports every few seconds) until the
    `wanted` models are there or `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        merged: dict[str, dict[str, dict]] = {}
        for url in endpoints(ray_tmp):
            try:
                text = httpx.get(url, timeout=20).text
            except httpx.HTTPError:
                continue
            for model, keys in parse(text).items():
                merged.setdefault(model, {}).update(keys)
        if set(wanted) <= set(merged) or time.monotonic() > deadline:
            return merged
        time.sleep(5)
