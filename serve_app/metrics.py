"""Prometheus metrics through `ray.serve.metrics` (exported by Ray's metrics agent, next to
Serve's own `ray_serve_*` series). Every series carries the `model` tag. (Serve reserves
the `deployment`/`replica`/`application` tags and adds them itself.)"""

from __future__ import annotations

from ray.serve import metrics

SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
BATCH = [1, 2, 3, 4, 6, 8, 12, 16, 32]
MODEL = ("model",)


class ModelMetrics:
    """Recorded by a `ModelServer` replica's step loop and encoder pool."""

    def __init__(self, model_id: str):
        self._tags = {"model": model_id}
        self._images = metrics.Counter("artserve_images_generated", "Images generated.", tag_keys=MODEL)
        self._step_batch = metrics.Histogram(
            "artserve_step_batch_size", "Images in one denoiser call (a whole pipeline call in call mode).",
            boundaries=BATCH, tag_keys=MODEL,
        )
        self._step_s = metrics.Histogram(
            "artserve_step_seconds", "Seconds per denoiser step over the running batch (per whole call in call mode).",
            boundaries=SECONDS, tag_keys=MODEL,
        )
        self._image_steps = metrics.Counter(
            "artserve_denoising_steps", "Image-steps run (images x denoising steps).", tag_keys=MODEL
        )
        self._cancelled = metrics.Counter(
            "artserve_cancelled_steps", "Image-steps not run because their request was cancelled or timed out.",
            tag_keys=MODEL,
        )
        self._pipeline_batch = metrics.Histogram(
            "artserve_pipeline_batch_size", "Images per whole pipeline call (call mode only).",
            boundaries=BATCH, tag_keys=MODEL,
        )
        self._pipeline_s = metrics.Histogram(
            "artserve_pipeline_seconds", "Seconds per whole pipeline call (call mode only).",
            boundaries=SECONDS, tag_keys=MODEL,
        )
        self._queue_wait_s = metrics.Histogram(
            "artserve_queue_wait_seconds",
            "Seconds from arrival at the replica to joining the running batch, per image.",
            boundaries=SECONDS, tag_keys=MODEL,
        )
        self._finish_s = metrics.Histogram(
            "artserve_encode_store_seconds", "Seconds to encode and store one image.", boundaries=SECONDS,
            tag_keys=MODEL,
        )
        # The replica's cost model (serve_app/replica/costmodel.py): what the scheduler believes.
        self._cost_step_s = metrics.Gauge(
            "artserve_cost_step_seconds",
            "Cost model: estimated seconds of one denoiser call by batch key and batch size (whole calls: per call).",
            tag_keys=("model", "key", "batch_size"),
        )
        self._cost_prepare_s = metrics.Gauge(
            "artserve_cost_prepare_seconds", "Cost model: estimated seconds to prepare one image (text encoding).",
            tag_keys=("model", "key"),
        )
        self._cost_finish_s = metrics.Gauge(
            "artserve_cost_finish_seconds", "Cost model: estimated seconds to finish one image (VAE decode).",
            tag_keys=("model", "key"),
        )

        # LoRA adapters (serve_app/engine/loras/manager.py).
        self._loras = metrics.Gauge("artserve_loras_loaded", "LoRA adapters in memory on the replica.",
                                    tag_keys=MODEL)
        self._lora_load_s = metrics.Histogram(
            "artserve_lora_load_seconds", "Seconds to fetch, check and build one LoRA adapter (off the step loop).",
            boundaries=SECONDS, tag_keys=MODEL,
        )
        self._lora_hits = metrics.Counter(
            "artserve_lora_hits", "Adapter requests served from memory.", tag_keys=MODEL)
        self._lora_misses = metrics.Counter(
            "artserve_lora_misses", "Adapter requests that had to load (or wait for) the file.", tag_keys=MODEL)
        self._lora_evictions = metrics.Counter(
            "artserve_lora_evictions", "Adapters dropped from memory (least recently used, none in use).",
            tag_keys=MODEL)

    def step_cost(self, key: str, batch_size: int, seconds: float) -> None:
        self._cost_step_s.set(seconds, tags={**self._tags, "key": key, "batch_size": str(batch_size)})

    def image_costs(self, key: str, prepare_s: float, finish_s: float) -> None:
        tags = {**self._tags, "key": key}
        self._cost_prepare_s.set(prepare_s, tags=tags)
        self._cost_finish_s.set(finish_s, tags=tags)

    def step(self, images: int, seconds: float, *, whole_call: bool = False) -> None:
        self._step_batch.observe(images, tags=self._tags)
        self._step_s.observe(seconds, tags=self._tags)
        if whole_call:
            self._pipeline_batch.observe(images, tags=self._tags)
            self._pipeline_s.observe(seconds, tags=self._tags)
        else:
            self._image_steps.inc(images, tags=self._tags)

    def images(self, count: int) -> None:
        self._images.inc(count, tags=self._tags)

    def cancelled_steps(self, steps: int) -> None:
        self._cancelled.inc(steps, tags=self._tags)

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait_s.observe(seconds, tags=self._tags)

    def encode_store(self, seconds: float) -> None:
        self._finish_s.observe(seconds, tags=self._tags)

    def lora_lookup(self, *, hit: bool) -> None:
        (self._lora_hits if hit else self._lora_misses).inc(tags=self._tags)

    def lora_loaded(self, seconds: float) -> None:
        self._lora_load_s.observe(seconds, tags=self._tags)

    def lora_evicted(self) -> None:
        self._lora_evictions.inc(tags=self._tags)

    def loras_in_memory(self, count: int) -> None:
        self._loras.set(count, tags=self._tags)


class IngressMetrics:
    def __init__(self):
        self._responses = metrics.Counter(
            "artserve_responses", "Image generation responses by model and HTTP status.",
            tag_keys=("model", "status"),
        )

    def response(self, model: str, status: int) -> None:
        self._responses.inc(tags={"model": model, "status": str(status)})
