"""`ModelServer`: one Serve deployment per model. Loads its pipeline once, batches images
from concurrent requests into shared pipeline calls, and encodes/stores them on a separate
thread pool so the pipeline never waits for PNG/WebP encoding or uploads."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from serve_app.batching import Slot, split_job, take_call
from serve_app.config import AppConfig, ModelConfig
from serve_app.encoding import encode_image
from serve_app.errors import ArtServeError, GenerationError, ServiceUnavailableError
from serve_app.job import GenerationJob, ImageResult
from serve_app.metrics import ModelMetrics
from serve_app.readiness import deployment_name
from serve_app.storage import ImageStore, open_store

logger = logging.getLogger("ray.serve")
# Serve's batch layer may hold many small batches at once: they only feed `_pipeline_loop`,
# which runs one pipeline call at a time. Serve warns that batch x concurrency exceeds
# max_ongoing_requests as if each were a pipeline call; for this design it is noise.
BATCH_CONCURRENCY = 64


class _QuietBatchConcurrencyWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "`max_concurrent_batches`" not in record.getMessage()
Arrival = tuple[GenerationJob, float]  # a job and when it reached this replica (monotonic s)


def deployment_options(model: ModelConfig) -> dict[str, Any]:
    """Class defaults, overridden key by key by the model's `deployment:` section."""
    batch = model.batching.max_batch_size
    defaults: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 1},
        # Enough requests inside the replica to fill the next call while one runs.
        "max_ongoing_requests": 2 * batch + 2,
        # Beyond this many waiting requests, callers get 429 + Retry-After, never a hang.
        "max_queued_requests": 8 * batch,
        "backpressure_config": {"status_code": 429, "retry_after_s": 2},
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 120,
    }
    options = {**defaults, **model.deployment, "name": deployment_name(model.id)}
    if options["max_ongoing_requests"] < batch:
        raise ValueError(f"model {model.id}: max_ongoing_requests must be >= max_batch_size ({batch})")
    return options


def _images_in(arrivals: list[Arrival]) -> int:
    return sum(job.n for job, _ in arrivals)


@serve.deployment
class ModelServer:
    def __init__(self, model: ModelConfig, app: AppConfig):
        from serve_app.engine.pipeline import DiffusersEngine  # torch: replica side only

        logger.addFilter(_QuietBatchConcurrencyWarning())
        self.model = model
        self.metrics = ModelMetrics(model.id)
        self.store: ImageStore = open_store(app)  # first: a storage mistake fails in seconds, not after the weights
        started = time.monotonic()
        self.engine = DiffusersEngine(model)
        logger.info("model %s loaded in %.1fs", model.id, time.monotonic() - started)
        self._pipeline_thread = ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        self._encoders = ThreadPoolExecutor(4, thread_name_prefix="encode")  # encoding + uploads
        self._fatal: str | None = None
        self._pending: list[Slot[asyncio.Future]] = []  # images waiting for the pipeline, oldest first
        self._work = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._batch.set_max_batch_size(model.batching.max_batch_size)
        self._batch.set_batch_wait_timeout_s(model.batching.batch_wait_timeout_s)

    async def generate(self, job: GenerationJob) -> list[ImageResult]:
        if self._scheduler is None:  # needs the replica's running event loop
            self._scheduler = asyncio.create_task(self._pipeline_loop())
        arrived = time.monotonic()
        parts = split_job(job, self.model.batching.max_batch_size)
        results = await asyncio.gather(*(self._batch((part, arrived)) for part in parts))
        error = _first_error(results)
        if error:
            raise error
        return [image for part in results for image in part]

    def check_health(self) -> None:
        # A CUDA context that hit a fatal error stays broken: let Serve replace the replica.
        if self._fatal:
            raise RuntimeError(f"replica unusable after: {self._fatal}")
        if self._scheduler is not None and self._scheduler.done():
            raise RuntimeError("the pipeline scheduler stopped")

    # Serve's batcher groups bursts and counts images as slots. It forms a batch as soon as
    # a request waits, even while the pipeline is busy, so the accumulating happens in
    # `_pipeline_loop`: each pipeline call takes every waiting same-shape image.
    @serve.batch(max_concurrent_batches=BATCH_CONCURRENCY, batch_size_fn=_images_in)
    async def _batch(self, arrivals: list[Arrival]) -> list[list[ImageResult] | BaseException]:
        loop = asyncio.get_running_loop()
        per_job = []
        for job, arrived in arrivals:
            images = [Slot(job, i, loop.create_future(), arrived) for i in range(job.n)]
            self._pending.extend(images)
            per_job.append(images)
        self._work.set()
        results = await asyncio.gather(
            *(asyncio.gather(*(self._finish(slot) for slot in images), return_exceptions=True)
              for images in per_job)
        )
        return [_first_error(images) or images for images in results]

    async def _pipeline_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._work.wait()
            # Slots of cancelled requests (client gone) are dropped, not generated.
            call = [s for s in take_call(self._pending, self.model.batching.max_batch_size) if not s.handle.done()]
            if not self._pending:
                self._work.clear()
            if not call:
                continue
            try:
                images = await loop.run_in_executor(self._pipeline_thread, self._run, call)
            except Exception as exc:
                error = self._failed(call, exc)
                for slot in call:
                    if not slot.handle.done():
                        slot.handle.set_exception(error)
                continue
            for slot, image in zip(call, images, strict=True):
                if not slot.handle.done():
                    slot.handle.set_result((image, len(call)))

    def _run(self, call: list[Slot]):
        from serve_app.engine.pipeline import PipelineInputs

        key = call[0].key
        started = time.monotonic()
        for slot in call:
            self.metrics.queue_wait(started - slot.arrived_s)
        images = self.engine.generate(
            PipelineInputs(
                width=key.width,
                height=key.height,
                num_inference_steps=key.num_inference_steps,
                guidance_scale=key.guidance_scale,
                prompts=[slot.job.prompt for slot in call],
                negative_prompts=[slot.job.negative_prompt for slot in call],
                seeds=[slot.job.seeds[slot.image] for slot in call],
            )
        )
        self.metrics.pipeline_call(len(call), time.monotonic() - started)
        return images

    def _failed(self, call: list[Slot], exc: Exception) -> ArtServeError:
        ids = sorted({slot.job.request_id for slot in call})
        logger.error("model %s: generation failed for %s", self.model.id, ids, exc_info=exc)
        text = str(exc)
        if "CUDA error" in text and "out of memory" not in text:
            self._fatal = text.splitlines()[0][:200]
        return GenerationError("Image generation failed.")

    async def _finish(self, slot: Slot) -> ImageResult:
        """Wait for the slot's image, then encode and store it on the encoder pool, so the
        pipeline thread goes straight on to the next call."""
        image, batch_size = await slot.handle
        return await asyncio.get_running_loop().run_in_executor(
            self._encoders, self._encode_store, slot.job, slot.image, image, batch_size
        )

    def _encode_store(self, job: GenerationJob, index: int, image, batch_size: int) -> ImageResult:
        started = time.monotonic()
        data = encode_image(image, job.output_format, job.output_compression)
        seed = job.seeds[index]
        if job.response_format == "b64_json":
            result = ImageResult(seed=seed, batch_size=batch_size, b64_json=base64.b64encode(data).decode())
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


def _first_error(results: list) -> BaseException | None:
    return next((r for r in results if isinstance(r, BaseException)), None)
