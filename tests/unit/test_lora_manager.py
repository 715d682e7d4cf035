"""A replica's adapters (engine/loras/manager.py) with the real tiny-sd pipeline and step loop:
loads happen off the loop while the running batch goes on, at most max_loaded_loras stay (LRU,
never one in use), a replaced file is a new adapter, and bad files are refused with a clear 4xx
that names the request field, never the path."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from serve_app.config import load_model_config
from serve_app.engine.loras.loading import AdapterReader, AdapterRefused, sha256_of
from serve_app.engine.loras.manager import LoraManager
from serve_app.errors import InvalidRequestError, ModelNotFoundError
from serve_app.job import LoraChoice
from serve_app.lora_catalog import LoraCatalog
from tests.loras import MODELS, fresh_pipeline, save_adapters


class Metrics:
    """Counts what the manager reports (ModelMetrics' LoRA methods) and ignores the rest."""

    def __init__(self):
        self.hits = self.misses = self.evictions = 0
        self.loads: list[float] = []
        self.in_memory = 0

    def lora_lookup(self, *, hit: bool) -> None:
        self.hits += hit
        self.misses += not hit

    def lora_loaded(self, seconds: float) -> None:
        self.loads.append(seconds)

    def lora_evicted(self) -> None:
        self.evictions += 1

    def loras_in_memory(self, count: int) -> None:
        self.in_memory = count

    def __getattr__(self, name):  # the step loop's metrics
        return lambda *args, **kwargs: None


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("made")
    made = save_adapters("tiny-sd", folder, {"a": 1, "b": 2, "c": 3}, text_encoder=False)
    made.update(save_adapters("tiny-flux", folder / "flux", {"flux": 4}, text_encoder=False))
    return made


@pytest.fixture(scope="module")
def pipeline():
    return fresh_pipeline("tiny-sd")


def manager_for(pipeline, loras_dir: Path, files: dict[str, Path], names: list[str], max_loaded: int = 2):
    (loras_dir / "tiny-sd").mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(files[name], loras_dir / "tiny-sd" / f"{name}.safetensors")
    model = load_model_config(MODELS / "tiny-sd.yaml").model_copy(update={"max_loaded_loras": max_loaded})
    metrics = Metrics()
    return LoraManager(pipeline, model, LoraCatalog(str(loras_dir), {model.id: model}, rescan_s=0), metrics), metrics


def choice(name: str, scale: float = 1.0, index: int = 0) -> LoraChoice:
    return LoraChoice(name, scale, f"loras[{index}].name")


def test_lru_keeps_at_most_max_loaded_and_never_evicts_one_in_use(pipeline, files, tmp_path):
    manager, metrics = manager_for(pipeline, tmp_path, files, ["a", "b", "c"])

    async def scenario():
        first = await manager.acquire([choice("a")])
        again = await manager.acquire([choice("a", 0.5)])
        assert (metrics.misses, metrics.hits) == (1, 1) and first.spec[0][0] == again.spec[0][0]
        first.release(), again.release()
        held_b = await manager.acquire([choice("b")])
        (await manager.acquire([choice("c")])).release()  # a is the least recently used: out
        assert manager.loaded() == ["b", "c"] and metrics.evictions == 1
        # a comes back from retirement (no denoiser call ran since its eviction: not yet freed, no reload);
        # c is now the least recently used one that is free, since b is held.
        (await manager.acquire([choice("a")])).release()
        assert manager.loaded() == ["a", "b"] and metrics.evictions == 2
        held_b.release()
        return held_b

    lease = asyncio.run(scenario())
    assert metrics.in_memory == 2 and len(metrics.loads) == 3  # a, b, c
    assert lease.applied[0].sha256 == sha256_of(files["b"])


def test_a_load_runs_off_the_step_loop_and_the_image_joins_the_running_batch(pipeline, files, tmp_path):
    from serve_app.engine.runners import STEP_RUNNERS
    from serve_app.engine.runners.base import ImageSpec
    from serve_app.replica.scheduler import StepScheduler, Ticket
    from serve_app.replica.steploop import StepLoop, Work

    manager, metrics = manager_for(pipeline, tmp_path, files, ["a"])
    model = manager.model
    runner = STEP_RUNNERS[model.family](pipeline, model, "cpu")
    runner.loras = manager.rows
    loop = StepLoop(runner, StepScheduler(4), metrics, lambda exc: exc)
    read = manager.reader.read

    def slow_read(*args):  # a slow disk: the load ends only once the loop has run two more steps
        begin, deadline = loop.stats.steps, time.monotonic() + 120
        while loop.stats.steps < begin + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        return read(*args)

    manager.reader.read = slow_read
    done: dict[str, threading.Event] = {"long": threading.Event(), "lora": threading.Event()}
    batches: dict[str, int] = {}

    def work(name: str, steps: int, loras=()) -> Work:
        spec = ImageSpec("a fox", None, 64, 64, steps, 7.5, 1, loras=loras)

        def deliver(image, largest_batch: int) -> None:
            batches[name] = largest_batch if not isinstance(image, BaseException) else -1
            done[name].set()

        return Work(Ticket(name, 0, runner.batch_key(spec), time.monotonic()), spec, deliver)

    async def scenario():
        loop.submit([work("long", 60)])
        while loop.stats.steps < 2:
            await asyncio.sleep(0.01)
        steps_before = loop.stats.steps
        lease = await manager.acquire([choice("a")])
        steps_during = loop.stats.steps - steps_before
        loop.submit([work("lora", 3, lease.spec)])
        await asyncio.to_thread(done["lora"].wait, 60)
        lease.release()
        return steps_during

    try:
        steps_during = asyncio.run(scenario())
        assert done["long"].wait(120)
    finally:
        loop.stop()
    print(f"denoiser steps run while the adapter loaded: {steps_during}; load {metrics.loads[0]:.2f}s")
    assert steps_during >= 2  # the batch went on during the load
    assert batches == {"long": 2, "lora": 2}  # the adapter's image joined the running batch


def test_a_replaced_file_is_a_new_adapter_and_the_old_one_retires_safely(pipeline, files, tmp_path):
    manager, _ = manager_for(pipeline, tmp_path, files, ["a"])
    target = tmp_path / "tiny-sd" / "a.safetensors"

    async def scenario():
        old = await manager.acquire([choice("a")])
        shutil.copy(files["b"], target)  # same name, new content
        os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
        new = await manager.acquire([choice("a")])
        return old, new

    old, new = asyncio.run(scenario())
    assert old.spec[0][0] != new.spec[0][0] and new.applied[0].sha256 == sha256_of(files["b"])
    old.release()  # an image of the old lease may still run the step in progress: still resolvable
    assert manager.rows._resolve(old.spec[0][0]).sha256 == sha256_of(files["a"])
    with manager.rows.batch([new.spec]):  # a denoiser call without it: now it is gone
        pass
    with pytest.raises(RuntimeError, match="not loaded"):
        manager.rows._resolve(old.spec[0][0])


def test_bad_files_are_refused_with_the_field_and_stay_refused(pipeline, files, tmp_path):
    manager, _ = manager_for(pipeline, tmp_path, files, ["flux"])
    (tmp_path / "tiny-sd" / "junk.safetensors").write_bytes(os.urandom(300))
    reads: list[str] = []
    read = manager.reader.read
    manager.reader.read = lambda path, name, sha256: (reads.append(name), read(path, name, sha256))[1]

    async def refused(name: str, param_index: int):
        with pytest.raises(InvalidRequestError) as caught:
            await manager.acquire([choice("a"), choice(name, index=param_index)])
        return caught.value

    shutil.copy(files["a"], tmp_path / "tiny-sd" / "a.safetensors")
    error = asyncio.run(refused("flux", 1))
    assert error.param == "loras[1].name" and error.code == "invalid_lora" and error.status_code == 400
    assert "another model family" in error.message and str(tmp_path) not in error.message
    assert "not a readable safetensors" in asyncio.run(refused("junk", 1)).message
    assert "not a readable safetensors" in asyncio.run(refused("junk", 1)).message
    assert reads == ["a", "flux", "junk"]  # a refused file is not read again (until it changes)
    assert manager.loaded() == ["a"]  # the good one stays usable; nothing held after the refusal
    with pytest.raises(ModelNotFoundError):
        asyncio.run(manager.acquire([LoraChoice("nope", 1.0, "model")]))


@pytest.mark.parametrize("damage,reason", [
    ("truncated", "not a readable safetensors"),
    ("other shapes", "do not fit"),
    ("dora", "DoRA"),
    ("stray component", "do not fit"),
    ("norm weights", "replaces weights of the base model"),
])
def test_what_does_not_fit_is_refused(pipeline, files, tmp_path, damage, reason):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(files["a"]))
    path = tmp_path / "bad.safetensors"
    if damage == "truncated":
        path.write_bytes(files["a"].read_bytes()[:2000])
    else:
        key = next(k for k in tensors if "lora_A" in k)
        if damage == "other shapes":
            tensors[key] = tensors[key][:, :-1].contiguous()
        elif damage == "dora":
            tensors[key.replace("lora_A.weight", "lora_magnitude_vector")] = tensors[key][0].clone()
        elif damage == "stray component":
            tensors["controlnet." + key.partition(".")[2]] = tensors[key].clone()
        else:
            tensors["unet.conv_in.weight"] = pipeline.unet.conv_in.weight.detach().clone()
        save_file(tensors, str(path))
    with pytest.raises(AdapterRefused, match=reason):
        AdapterReader(pipeline).read(path, "bad", sha256_of(path))


def test_a_model_with_fused_attention_refuses_adapters_it_would_silently_skip(files):
    """engine.fuse_qkv: the fused processors call to_qkv, never the to_q/to_k/to_v layers the adapter adapts."""
    fused = fresh_pipeline("tiny-sd")
    fused.unet.fuse_qkv_projections()
    with pytest.raises(AdapterRefused, match="fuse_qkv"):
        AdapterReader(fused).read(files["a"], "a", sha256_of(files["a"]))
