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

from serve_app.batching import PipelineCall, plan_calls, scatter, split_job
from serve_app.config import ModelConfig
from serve_app.encoding import encode_image
from serve_app.errors import ArtServeError, GenerationError, ServiceUnavailableError
from serve_app.job import GenerationJob, ImageResult
from serve_app.metrics import ModelMetrics
from serve_app.readiness import deployment_name
from serve_app.storage import ImageStore, open_store

logger = logging.getLogger("ray.serve")
Arrival = tuple[GenerationJob, float]  # a job and when it reached this replica (monotonic s)


def deployment_options(model: ModelConfig) -> dict[str, Any]:
    """Class defaults, overridden key by key by the model's `deployment:` section."""
    batch = model.batching.max_batch_size
    defaults: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 1},
        # Enough requests in flight to fill the next batch while one runs.
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
    def __init__(self, model: ModelConfig, storage: str, url_ttl_s: int, public_url: str | None):
        from serve_app.engine.pipeline import DiffusersEngine  # torch: replica side only

        self.model = model
        self.metrics = ModelMetrics(model.id)
        started = time.monotonic()
        self.engine = DiffusersEngine(model)
        logger.info("model %s loaded in %.1fs", model.id, time.monotonic() - started)
        self.store: ImageStore = open_store(storage, url_ttl_s, public_url)
        self._pipeline_thread = ThreadPoolExecutor(1, thread_name_prefix="pipeline")
        self._encoders = ThreadPoolExecutor(2, thread_name_prefix="encode")
        self._fatal: str | None = None
        self._batch.set_max_batch_size(model.batching.max_batch_size)
        self._batch.set_batch_wait_timeout_s(model.batching.batch_wait_timeout_s)

    async def generate(self, job: GenerationJob) -> list[ImageResult]:
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

    # Two batches in flight: the next batch's pipeline call overlaps this one's encoding.
    @serve.batch(max_concurrent_batches=2, batch_size_fn=_images_in)
    async def _batch(self, arrivals: list[Arrival]) -> list[list[ImageResult] | BaseException]:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        for _, arrived in arrivals:
            self.metrics.queue_wait(now - arrived)
        jobs = [job for job, _ in arrivals]
        calls = plan_calls(jobs, self.model.batching.max_batch_size)
        pending: list[list[asyncio.Future] | BaseException] = []
        for call in calls:
            try:
                images = await loop.run_in_executor(self._pipeline_thread, self._run, jobs, call)
            except Exception as exc:
                pending.append(self._failed(jobs, call, exc))
                continue
            pending.append([
                loop.run_in_executor(self._encoders, self._finish, jobs[slot.job], slot.image, image, len(call.slots))
                for slot, image in zip(call.slots, images, strict=True)
            ])
        outputs = []
        for call, futures in zip(calls, pending, strict=True):
            if isinstance(futures, BaseException):
                outputs.append([futures] * len(call.slots))
            else:
                outputs.append(await asyncio.gather(*futures, return_exceptions=True))
        return [_first_error(results) or results for results in scatter(jobs, calls, outputs)]

    def _run(self, jobs: list[GenerationJob], call: PipelineCall):
        from serve_app.engine.pipeline import PipelineInputs

        slots = [(jobs[s.job], s.image) for s in call.slots]
        started = time.monotonic()
        images = self.engine.generate(
            PipelineInputs(
                width=call.key.width,
                height=call.key.height,
                num_inference_steps=call.key.num_inference_steps,
                guidance_scale=call.key.guidance_scale,
                prompts=[job.prompt for job, _ in slots],
                negative_prompts=[job.negative_prompt for job, _ in slots],
                seeds=[job.seeds[i] for job, i in slots],
            )
        )
        self.metrics.pipeline_call(len(slots), time.monotonic() - started)
        return images

    def _failed(self, jobs: list[GenerationJob], call: PipelineCall, exc: Exception) -> ArtServeError:
        ids = sorted({jobs[s.job].request_id for s in call.slots})
        logger.error("model %s: generation failed for %s", self.model.id, ids, exc_info=exc)
        text = str(exc)
        if "CUDA error" in text and "out of memory" not in text:
            self._fatal = text.splitlines()[0][:200]
        return GenerationError("Image generation failed.")

    def _finish(self, job: GenerationJob, index: int, image, batch_size: int) -> ImageResult:
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
