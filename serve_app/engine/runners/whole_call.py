"""The whole-call path: one `pipeline(...)` call per batch, behind the same runner contract
(one "step" runs every denoising step). For `generic` pipelines, whose loop ArtServe does not
own, and for models configured with `batching.policy: call`."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from PIL import Image

from serve_app.engine.pipeline import DiffusersEngine, PipelineInputs
from serve_app.engine.runners.base import ImageSpec


@dataclass(eq=False)
class CallState:
    spec: ImageSpec
    image: Image.Image | None = None

    @property
    def done(self) -> bool:
        return self.image is not None

    @property
    def remaining(self) -> int:
        return 0 if self.done else self.spec.steps


class WholeCallRunner:
    whole_call = True

    def __init__(self, engine: DiffusersEngine):
        self.engine = engine

    def batch_key(self, spec: ImageSpec) -> Hashable:
        # One call runs one step count and one guidance for every image in it.
        return (spec.width, spec.height, spec.steps, spec.guidance)

    def prepare(self, specs: list[ImageSpec]) -> list[CallState]:
        if any(spec.image is not None for spec in specs):
            raise ValueError(f"model {self.engine.model.id!r} cannot edit images: its pipeline runs as whole calls "
                             "(generic family or batching.policy: call); edits need a step runner")
        return [CallState(spec) for spec in specs]

    def step(self, states: list[CallState]) -> None:
        first = states[0].spec
        images = self.engine.generate(PipelineInputs(
            width=first.width, height=first.height, num_inference_steps=first.steps, guidance_scale=first.guidance,
            prompts=[s.spec.prompt for s in states], negative_prompts=[s.spec.negative_prompt for s in states],
            seeds=[s.spec.seed for s in states],
        ))
        for state, image in zip(states, images, strict=True):
            state.image = image

    def finish(self, states: list[CallState]) -> list[Image.Image]:
        return [s.image for s in states]  # type: ignore[misc]
