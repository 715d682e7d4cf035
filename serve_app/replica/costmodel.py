"""What a step costs on this replica, learned from the step loop's own timings. Pure Python
(no torch, no Ray, no clock): the loop reports seconds, the scheduler asks for estimates.

Per batch key (size, CFG on/off) and batch size, the median of the last `WINDOW` seconds
one denoiser call took; per key and number of images, the seconds one `prepare` (text
encoding, first latents) and one `finish` (VAE decode) over that many images took, the same
way: the loop prepares the images it admits at a boundary in one call and decodes those that
finish together in one call, and where that is sublinear (a launch-bound encoder or VAE on a
GPU; on this CPU it is about linear) a newcomer admitted beside others costs less than alone.
A median, not a moving average: on a shared machine a step's wall time has a long tail
(another process took the core), and over HTTP here a moving average of the batch-2 steps
read 41.6 ms where their median was 22.3 and their mean 25.8 (a few recent outliers): two
images looked 3.8x one, not 1.7x, and the cost policy served about one image at a time
(benchmarks/README.md, "Medians, and the noise guard under load"). An estimate for a batch
size not measured yet is linear from the nearest measured size (the pessimistic guess:
batching saves nothing until it is seen to), and interpolated between measured sizes
(prepares and decodes likewise); no size is estimated dearer than a bigger one measured
(`monotone`). A key never measured borrows the per-image cost of the keys that were.

The first sample of every (key, size) is dropped (of prepares and decodes, only the key's
first: `observe_call`): the first call at a new shape pays for allocation, kernel autotuning
or compilation (seconds, under torch.compile) and would make a size look ruinous forever. A
size is `trusted` once it has `TRUSTED_SAMPLES` samples and was measured recently (within
`STALE_AFTER` of the key's other observations): the cost policy probes sizes that are not, so
the curve is measured by running it, and re-measured when the machine's speed drifts (a noisy
neighbour slows batch 1 while batch 2's old figure would make sharing look cheap): a stale
size's old samples are forgotten.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

WINDOW = 20  # the samples a size's median is taken over
TRUSTED_SAMPLES = 2  # samples after the dropped warm-up one before a size's estimate is used
STALE_AFTER = 300  # observations of a key's other sizes after which a size is re-measured
MAX_KEYS = 32  # keys remembered (the least recently seen are forgotten): sizes are open-ended
DEFAULT_STEP_S = 1.0  # before anything is measured: only the ratios between requests matter


@dataclass
class Recent:
    """The median of the last `WINDOW` samples; the first sample ever offered is dropped."""

    value: float = 0.0
    error: float = 0.0  # standard error of the median, from the samples' median absolute deviation
    samples: int = 0  # kept since the last reset (after the dropped one)
    seen: int = 0  # offered, including the dropped one
    at: int = 0  # the key's observation count when last updated (staleness)
    window: deque = field(default_factory=lambda: deque(maxlen=WINDOW))

    def add(self, seconds: float, at: int, stale_after: float = math.inf) -> None:
        self.seen += 1
        if at - self.at > stale_after:  # measured long ago: the machine may have changed since
            self.window.clear()
            self.samples, self.error = 0, 0.0
        self.at = at
        if self.seen == 1:
            return
        self.window.append(seconds)
        self.samples += 1
        self.value = statistics.median(self.window)
        if len(self.window) > 1:
            spread = statistics.median(abs(s - self.value) for s in self.window) * 1.4826  # ~ sigma
            self.error = 1.2533 * spread / math.sqrt(len(self.window))  # a median's, for normal noise


@dataclass
class KeyCosts:
    steps: dict[int, Recent]  # batch size -> one denoiser call
    prepare: dict[int, Recent] = field(default_factory=dict)  # images -> one prepare call over them
    finish: dict[int, Recent] = field(default_factory=dict)  # images -> one decode over them
    observations: int = 0
    curve: list[tuple[int, float]] | None = None  # measured (size, seconds), sorted; None: recompute
    estimates: dict[int, float] = field(default_factory=dict)  # step_s by size, from `curve`


class CostModel:
    """Implements the scheduler's `Costs` protocol from measurements."""

    def __init__(self, *, max_keys: int = MAX_KEYS):
        self._keys: OrderedDict[Hashable, KeyCosts] = OrderedDict()
        self._max_keys = max_keys

    # -- what the step loop reports -------------------------------------------------
    def observe_step(self, key: Hashable, size: int, seconds: float) -> None:
        costs = self._entry(key)
        costs.observations += 1
        costs.steps.setdefault(size, Recent()).add(seconds, costs.observations, STALE_AFTER)
        costs.curve = None
        costs.estimates.clear()

    def observe_prepare(self, key: Hashable, images: int, seconds: float) -> None:
        observe_call(self._entry(key).prepare, images, seconds)

    def observe_finish(self, key: Hashable, images: int, seconds: float) -> None:
        observe_call(self._entry(key).finish, images, seconds)

    # -- what the scheduler asks ------------------------------------------------------
    def step_s(self, key: Hashable, size: int) -> float:
        """Estimated seconds of one denoiser call over `size` images of this key."""
        costs = self._keys.get(key)
        if costs is None:
            return size * self._borrowed_per_image()
        estimate = costs.estimates.get(size)
        if estimate is None:
            if costs.curve is None:
                costs.curve = monotone(sorted((s, a.value) for s, a in costs.steps.items() if a.samples))
            estimate = interpolate(costs.curve, size) if costs.curve else size * self._borrowed_per_image()
            costs.estimates[size] = estimate
        return estimate

    def measured_s(self, key: Hashable, size: int) -> float | None:
        """The median at exactly this size, None before a sample was kept."""
        costs = self._keys.get(key)
        recent = costs.steps.get(size) if costs else None
        return recent.value if recent is not None and recent.samples else None

    def step_error_s(self, key: Hashable, size: int) -> float:
        """How uncertain `step_s` is: the standard error of a measured size, a tenth of the
        estimate for one that is not."""
        costs = self._keys.get(key)
        recent = costs.steps.get(size) if costs else None
        if recent is None or recent.samples < TRUSTED_SAMPLES:
            return 0.1 * self.step_s(key, size)
        return recent.error

    def trusted(self, key: Hashable, size: int) -> bool:
        costs = self._keys.get(key)
        recent = costs.steps.get(size) if costs else None
        if recent is None or recent.samples < TRUSTED_SAMPLES:
            return False
        return costs.observations - recent.at <= STALE_AFTER  # type: ignore[union-attr]

    def prepare_s(self, key: Hashable, images: int = 1) -> float:
        """Estimated seconds of one prepare over `images` images of this key (0 before any)."""
        costs = self._keys.get(key)
        return per_call(costs.prepare, images) if costs else 0.0

    def finish_s(self, key: Hashable, images: int = 1) -> float:
        """Estimated seconds of one decode over `images` images of this key (0 before any)."""
        costs = self._keys.get(key)
        return per_call(costs.finish, images) if costs else 0.0

    # -- what operators see -----------------------------------------------------------
    def snapshot(self) -> list[dict[str, Any]]:
        """Per key: measured step seconds by batch size (with sample counts), the estimated
        prepare and finish seconds of one image, and what one prepare / decode call measured by
        its number of images. For the replica's stats and the benchmarks."""
        return [
            {"key": describe_key(key), "step_s": measured(c.steps),
             "samples": {size: a.samples for size, a in sorted(c.steps.items()) if a.samples},
             "prepare_s": round(per_call(c.prepare, 1), 6), "finish_s": round(per_call(c.finish, 1), 6),
             "prepare_calls_s": measured(c.prepare), "finish_calls_s": measured(c.finish)}
            for key, c in self._keys.items()
        ]

    def _entry(self, key: Hashable) -> KeyCosts:
        costs = self._keys.get(key)
        if costs is None:
            costs = self._keys[key] = KeyCosts({})
            if len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
        self._keys.move_to_end(key)
        return costs

    def _borrowed_per_image(self) -> float:
        per_image = [a.value / s for c in self._keys.values() for s, a in c.steps.items() if a.samples]
        return sum(per_image) / len(per_image) if per_image else DEFAULT_STEP_S


def measured(sizes: dict[int, Recent]) -> dict[int, float]:
    return {size: round(a.value, 6) for size, a in sorted(sizes.items()) if a.samples}


def observe_call(sizes: dict[int, Recent], images: int, seconds: float) -> None:
    """A prepare or decode over `images` images: the key's first one is warm-up (dropped); a
    new number of images after it is measured from its first call (a prepare's shapes follow
    its prompts anyway, and the loop's prepares come in many sizes: dropping each size's first
    would lose most of them)."""
    sizes.setdefault(images, Recent(seen=1 if sizes else 0)).add(seconds, 0)


def per_call(sizes: dict[int, Recent], images: int) -> float:
    """Seconds of one call over `images` images from the sizes measured (0 before any)."""
    curve = monotone(sorted((s, a.value) for s, a in sizes.items() if a.samples))
    return interpolate(curve, images) if curve else 0.0


def monotone(curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """No batch costs more than a bigger one measured: a call over more images is more work, so
    a size that measured dearer than a bigger one was measured in a bad moment (warm-up that
    outlasted the dropped sample, a neighbour); and a size that looks ruinous is one the policy
    would never run again to correct it. Each size is capped at the cheapest bigger one."""
    out, cheapest = [], math.inf
    for size, seconds in reversed(curve):
        cheapest = min(cheapest, seconds)
        out.append((size, cheapest))
    return out[::-1]


def interpolate(curve: list[tuple[int, float]], size: int) -> float:
    """Seconds at `size` from measured (size, seconds) points, sorted: interpolated between
    them, linear from the nearest one outside them."""
    at = bisect.bisect_left(curve, (size, -math.inf))
    if at < len(curve) and curve[at][0] == size:
        return curve[at][1]
    if 0 < at < len(curve):
        (s0, v0), (s1, v1) = curve[at - 1], curve[at]
        return v0 + (v1 - v0) * (size - s0) / (s1 - s0)
    s, v = curve[-1] if at else curve[0]
    return v * size / s


def describe_key(key: Hashable) -> str:
    """A metric label for a batch key: `256x256`, `256x256+cfg` (step runners' (w, h, cfg)),
    the tuple's text otherwise (whole-call keys carry steps and guidance too)."""
    if isinstance(key, tuple) and len(key) == 3 and all(isinstance(k, int) for k in key[:2]) \
            and isinstance(key[2], bool):
        return f"{key[0]}x{key[1]}" + ("+cfg" if key[2] else "")
    return "/".join(str(k) for k in key) if isinstance(key, tuple) else str(key)
