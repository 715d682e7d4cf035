"""`ModelServer`: one Serve deployment per model. Loads its pipeline once and runs the step
engine: every image of every request is a ticket in the pure scheduler; the step loop
(steploop.py, its own thread) admits, steps and retires them at step boundaries; finished
images are encoded and stored on a separate pool while the loop goes on. A request that is
cancelled (client gone, ingress timeout) leaves the batch at the next step boundary and
never reaches storage."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from ray import serve

from serve_app.config import AppConfig, ModelConfig
from serve_app.engine.threads import run_on_own_thread
from serve_app.errors import ArtServeError, GenerationError, InvalidRequestError, ServiceUnavailableError
from serve_app.job import GenerationJob, GenerationResult, ImageResult, PartialImage
from serve_app.metrics import ModelMetrics
from serve_app.readiness import deployment_name
from serve_app.replica.encoding import encode_image
from serve_app.replica.routing import ROUTER_PATH
from serve_app.replica.scheduler import StepScheduler, Ticket
from serve_app.replica.steploop import StepLoop, Work
from serve_app.storage import ImageStore, open_store

logger = logging.getLogger("ray.serve")


def deployment_options(model: ModelConfig) -> dict[str, Any]:
    """Class defaults, overridden key by key by the model's `deployment:` section."""
    batch = model.batching.max_batch_size
    defaults: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 1},
        # Requests inside the replica: enough to fill the running batch and the next one.
        "max_ongoing_requests": 2 * batch + 2,
        # Beyond this many waiting requests, callers get 429 + Retry-After, never a hang.
        "max_queued_requests": 8 * batch,
        "backpressure_config": {"status_code": 429, "retry_after_s": 2},
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 120,
        # Prefer a replica that holds the request's LoRA adapter, unless it is a batch busier (routing.py).
        "request_router_config": {"request_router_class": ROUTER_PATH, "request_router_kwargs": {"imbalance": batch},
                                  "request_routing_stats_period_s": 2},
    }
    return {**defaults, **model.deployment, "name": deployment_name(model.id)}


@serve.deployment
class ModelServer:
    def __init__(self, model: ModelConfig, app: AppConfig):
        from serve_app.engine.pipeline import DiffusersEngine  # torch: replica side only
        from serve_app.engine.runners import make_runner

        self.model = model
        self.metrics = ModelMetrics(model.id)
        self.store: ImageStore = open_store(app)  # first: a storage mistake fails in seconds, not after the weights
        started = time.monotonic()

        def build() -> tuple[Any, Any]:
            engine = DiffusersEngine(model)
            return engine, make_runner(engine)

        # On a thread that ends here: the step loop's is to be the only live one that ran torch (threads.py).
        self.engine, self.runner = run_on_own_thread(build, name="model-load")
        batching = model.batching
        policy = "call" if getattr(self.runner, "whole_call", False) else batching.policy
        logger.info("model %s loaded in %.1fs (policy %s, up to %d images per step)", model.id,
                    time.monotonic() - started, policy, batching.max_batch_size)
        self._encoders = ThreadPoolExecutor(4, thread_name_prefix="encode")  # encoding + uploads
        self._fatal: str | None = None
        scheduler = StepScheduler(batching.max_batch_size, policy, max_wait_factor=batching.max_wait_factor,
                                  max_wait_s=batching.max_wait_s)
        self.loop = StepLoop(self.runner, scheduler, self.metrics, self._engine_error)
        self.adapters = None  # LoRA adapters: only where ArtServe runs the loop (per-row application)
        if not getattr(self.runner, "whole_call", False):
            from serve_app.engine.loras import LoraManager
            from serve_app.lora_catalog import LoraCatalog

            self.adapters = LoraManager(self.engine.pipeline, model, LoraCatalog(app.loras_dir, {model.id: model}),
                                        self.metrics)
            self.runner.loras = self.adapters.rows

    async def generate(self, job: GenerationJob) -> GenerationResult:
        return await self._run(job, None)

    async def generate_stream(self, job: GenerationJob) -> AsyncIterator[PartialImage | GenerationResult]:
        """Serve streams what this yields to the ingress: the previews as they are decoded,
        then the result. Closing the stream (the client left) cancels the generation."""
        previews: asyncio.Queue = asyncio.Queue()
        run = asyncio.ensure_future(self._run(job, previews))
        try:
            while True:
                preview = asyncio.ensure_future(previews.get())
                await asyncio.wait({preview, run}, return_when=asyncio.FIRST_COMPLETED)
                if not preview.done():
                    preview.cancel()
                    break
                yield await self._encode_preview(job, *preview.result())
            while not previews.empty():
                yield await self._encode_preview(job, *previews.get_nowait())
            yield run.result()
        finally:
            run.cancel()

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve for the router (replica/routing.py): which adapters this replica holds."""
        return {"loras": self.adapters.loaded() if self.adapters is not None else []}

    async def _run(self, job: GenerationJob, previews: asyncio.Queue | None) -> GenerationResult:
        """The job's adapters are leased (loaded off the step loop if need be) before any of its
        images reaches the loop, and held until they have all left it."""
        if not job.loras:
            return await self._images(job, previews, ())
        if self.adapters is None:
            raise InvalidRequestError(f"Model '{self.model.id}' does not take LoRA adapters.", param="loras")
        lease = await self.adapters.acquire(job.loras)
        try:
            result = await self._images(job, previews, lease.spec)
        finally:
            lease.release()
        return replace(result, loras=lease.applied)

    async def _images(self, job: GenerationJob, previews: asyncio.Queue | None,
                      loras: tuple[tuple[str, float], ...]) -> GenerationResult:
        from serve_app.engine.runners import ImageSpec

        loop = asyncio.get_running_loop()
        arrived = time.monotonic()
        cancelled = threading.Event()  # read by the encoder threads: no upload after a cancel
        futures = [loop.create_future() for _ in range(job.n)]
        works = []
        images, mask = tuple(_decoded(png) for png in job.images), _decoded(job.mask)
        for index, seed in enumerate(job.seeds):
            spec = ImageSpec(prompt=job.prompt, negative_prompt=job.negative_prompt, width=job.width,
                             height=job.height, steps=job.num_inference_steps, guidance=job.guidance_scale, seed=seed,
                             images=images, mask=mask, strength=1.0 if job.strength is None else job.strength,
                             loras=loras, preserve_unmasked=job.preserve_unmasked)
            key = self.runner.batch_key(spec)
            ticket = Ticket(job.request_id, index, ("alone", job.request_id, index) if job.deterministic else key,
                            arrived, steps=math.ceil(spec.steps * spec.strength), cost_key=key)
            work = Work(ticket, spec, _deliverer(loop, futures[index]))
            if previews is not None and job.partial_images:
                work.previews = job.partial_images
                work.on_preview = _preview_sink(loop, previews)
            works.append(work)
        self.loop.submit(works)
        decoded: list[float] = []  # when each image left the step loop
        finishing = [asyncio.ensure_future(self._finish(job, i, future, cancelled, decoded))
                     for i, future in enumerate(futures)]
        try:
            images = list(await asyncio.gather(*finishing))
        except BaseException:  # cancelled (client gone, timeout) or one image failed: stop the rest
            cancelled.set()
            self.loop.cancel(job.request_id)
            for task in finishing:
                task.cancel()
            raise
        tokens, done = self.engine.count_tokens(job.prompt), time.monotonic()
        timings_ms = {"engine": 1000 * (max(decoded) - arrived), "encode": 1000 * (done - max(decoded))}
        return GenerationResult(images, tokens, timings_ms)

    async def _encode_preview(self, job: GenerationJob, index: int, image) -> PartialImage:
        data = await asyncio.get_running_loop().run_in_executor(
            self._encoders, encode_image, image, job.output_format, job.output_compression
        )
        return PartialImage(index, base64.b64encode(data).decode())

    def stats(self) -> dict[str, Any]:
        """The step loop's counters and the cost model's estimates (benchmarks, operators)."""
        return {"policy": self.loop.scheduler.policy, "loop": dataclasses.asdict(self.loop.stats),
                "costs": self.loop.costs.snapshot()}

    def check_health(self) -> None:
        # A CUDA context that hit a fatal error stays broken: let Serve replace the replica.
        if self._fatal:
            raise RuntimeError(f"replica unusable after: {self._fatal}")
        if not self.loop.alive():
            raise RuntimeError("the step loop stopped")

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()

    def _engine_error(self, exc: Exception) -> ArtServeError:
        """Runs on the step loop's thread when prepare/step/decode raised."""
        logger.error("model %s: generation failed", self.model.id, exc_info=exc)
        text = str(exc)
        if "CUDA error" in text and "out of memory" not in text:
            self._fatal = text.splitlines()[0][:200]
        return GenerationError("Image generation failed.")

    async def _finish(self, job: GenerationJob, index: int, future: asyncio.Future,
                      cancelled: threading.Event, decoded: list[float]) -> ImageResult:
        """Wait for the image, then encode and store it on the encoder pool while the step
        loop goes on: an image leaves as soon as its own last step is decoded."""
        image, batch_size = await future
        decoded.append(time.monotonic())
        return await asyncio.get_running_loop().run_in_executor(
            self._encoders, self._encode_store, job, index, image, batch_size, cancelled
        )

    def _encode_store(self, job: GenerationJob, index: int, image, batch_size: int,
                      cancelled: threading.Event) -> ImageResult:
        started = time.monotonic()
        data = encode_image(image, job.output_format, job.output_compression)
        seed = job.seeds[index]
        if job.response_format == "b64_json":
            result = ImageResult(seed=seed, batch_size=batch_size, b64_json=base64.b64encode(data).decode())
        elif cancelled.is_set():  # the client is gone: nothing to store
            raise asyncio.CancelledError
        else:
            result = ImageResult(seed=seed, batch_size=batch_size, url=self._store(data, job))
        self.metrics.encode_store(time.monotonic() - started)
        return result

    def _store(self, data: bytes, job: GenerationJob) -> str:
        try:
            return self.store.put(data, job.output_format, job.base_url)
        except ArtServeError:
            raise
        except Exception:
            logger.exception("model %s: storing an image failed (%s)", self.model.id, job.request_id)
            raise ServiceUnavailableError("Image storage is unavailable; try again later.") from None


def _deliverer(loop: asyncio.AbstractEventLoop, future: asyncio.Future):
    """A callback for the step loop's thread that resolves `future` on the event loop."""

    def settle(outcome: Any, batch_size: int) -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result((outcome, batch_size))

    return lambda outcome, batch_size: loop.call_soon_threadsafe(settle, outcome, batch_size)


def _decoded(png: bytes | None):
    """An edit's input image or mask (validated and normalised by the ingress), as PIL."""
    if png is None:
        return None
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.load()
    return image


def _preview_sink(loop: asyncio.AbstractEventLoop, previews: asyncio.Queue):
    count = iter(range(1_000_000))
    return lambda image: loop.call_soon_threadsafe(previews.put_nowait, (next(count), image))
