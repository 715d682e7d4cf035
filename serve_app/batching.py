"""Pure batching logic: one slot per image; images that can share a pipeline call (same
size, steps and guidance) are grouped in arrival order and cut to the batch size; results
go back to their request in order. No Ray, no torch."""

from __future__ import annotations

from dataclasses import dataclass, replace

from serve_app.job import GenerationJob


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
class Slot:
    """Image `image` of job `job` in the batch."""

    job: int
    image: int


@dataclass(frozen=True)
class PipelineCall:
    key: ShapeKey
    slots: tuple[Slot, ...]


def plan_calls(jobs: list[GenerationJob], max_batch_size: int) -> list[PipelineCall]:
    groups: dict[ShapeKey, list[Slot]] = {}
    for j, job in enumerate(jobs):
        groups.setdefault(ShapeKey.of(job), []).extend(Slot(j, i) for i in range(job.n))
    return [
        PipelineCall(key, tuple(slots[start : start + max_batch_size]))
        for key, slots in groups.items()
        for start in range(0, len(slots), max_batch_size)
    ]


def scatter(jobs: list[GenerationJob], calls: list[PipelineCall], outputs: list[list]) -> list[list]:
    """Put each call's outputs (one per slot) back into per-job lists, in image order."""
    per_job: list[list] = [[None] * job.n for job in jobs]
    for call, results in zip(calls, outputs, strict=True):
        for slot, result in zip(call.slots, results, strict=True):
            per_job[slot.job][slot.image] = result
    return per_job


def split_job(job: GenerationJob, max_batch_size: int) -> list[GenerationJob]:
    """A request for more images than one batch holds becomes several batch items (Serve
    refuses an item bigger than the batch); their results are concatenated in order."""
    if job.n <= max_batch_size:
        return [job]
    return [
        replace(job, seeds=job.seeds[start : start + max_batch_size])
        for start in range(0, job.n, max_batch_size)
    ]
