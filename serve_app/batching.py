"""Pure batching logic (no Ray, no torch): one slot per image; a pipeline call takes the
oldest waiting image and every other waiting image of the same shape (size, steps,
guidance), up to the batch size; requests larger than a batch are split."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from serve_app.job import GenerationJob

T = TypeVar("T")


@dataclass(frozen=True)
class ShapeKey:
    """Everything that must be equal for images to share one pipeline call."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float

    @classmethod
    def of(cls, job: GenerationJob) -> ShapeKey:
        return cls(job.width, job.height, job.num_inference_steps, job.guidance_scale)


@dataclass(frozen=True)
class Slot(Generic[T]):
    """One image waiting for the pipeline: its job, its index in the job, and a handle the
    caller uses to get the result back (a future)."""

    job: GenerationJob
    image: int
    handle: T
    arrived_s: float = 0.0  # when its request reached the replica (monotonic)

    @property
    def key(self) -> ShapeKey:
        return ShapeKey.of(self.job)


def take_call(pending: list[Slot[T]], max_batch_size: int) -> list[Slot[T]]:
    """Remove and return the next pipeline call from `pending` (kept in arrival order):
    the oldest slot and the next same-shape slots, up to `max_batch_size`. Older slots of
    other shapes go first in later calls, so no shape starves."""
    if not pending:
        return []
    key = pending[0].key
    chosen = [i for i, slot in enumerate(pending) if slot.key == key][:max_batch_size]
    call = [pending[i] for i in chosen]
    for i in reversed(chosen):
        del pending[i]
    return call


def split_job(job: GenerationJob, max_batch_size: int) -> list[GenerationJob]:
    """A request for more images than one batch holds becomes several batch items (Serve
    refuses an item bigger than the batch); their results are concatenated in order."""
    if job.n <= max_batch_size:
        return [job]
    return [
        replace(job, seeds=job.seeds[start : start + max_batch_size])
        for start in range(0, job.n, max_batch_size)
    ]
