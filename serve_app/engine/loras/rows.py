"""Adapters applied per batch row inside one forward.

A forward hook on each live layer an adapter touches adds, after the base layer ran,

    output[rows of a] += scale_row * scaling_a * B_a(A_a(x[rows of a]))     for each adapter a in the batch

so one denoiser call serves images with different adapters, different scales and up to four
stacked adapters each, and an image without adapters gets exactly the base layer's output. The
runner says which adapters each row carries for the duration of one call (`batch`, `prompt`);
outside such a call the hooks do nothing. The mechanism is the one PEFT uses for its mixed
batches (`_mixed_batch_forward`: sub-batches per adapter) with the scale per row instead of per
adapter, and it needs nothing from the runner family: any Linear/Conv2d an adapter names works.

Hooks are added on the thread that runs the forwards (the step loop), when an adapter is first
used, so the live modules' hook tables never change under a running forward."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from serve_app.engine.loras.loading import Adapter

# One row's adapters: (key, scale) pairs, as ImageSpec.loras holds them.
RowLoras = tuple[tuple[str, float], ...]


@dataclass(frozen=True, eq=False)
class Term:
    """One adapter in the current call: the rows it applies to (None: every row, one scale)."""

    adapter: Adapter
    rows: torch.Tensor | None  # row indices
    scales: torch.Tensor | float  # per listed row, or the one scale for every row
    batch: int


class LoraRows:
    """Applies adapters per row during the calls the runner wraps. `resolve(key)` gives the loaded
    adapter (the manager's); `after_batch(keys)` tells the manager which adapters a whole batch
    used, after its denoiser call."""

    def __init__(self, resolve: Callable[[str], Adapter], after_batch: Callable[[set[str]], None] = lambda _: None):
        self._resolve = resolve
        self._after_batch = after_batch
        self._hooked: set[nn.Module] = set()
        self._local = threading.local()

    @contextlib.contextmanager
    def batch(self, rows: Sequence[RowLoras]) -> Iterator[None]:
        """One denoiser call whose input row i carries the adapters `rows[i]`."""
        with self._applied(rows):
            yield
        self._after_batch({key for row in rows for key, _ in row})

    def prompt(self, loras: RowLoras) -> contextlib.AbstractContextManager[None]:
        """One prompt's encoding: every row the text encoders see carries `loras`."""
        return self._applied([loras])

    @contextlib.contextmanager
    def _applied(self, rows: Sequence[RowLoras]) -> Iterator[None]:
        if not any(rows):  # nothing to add: the hooks stay idle, the base layers' output is untouched
            yield
            return
        terms = self._terms(rows)
        for term in terms:
            self._hook(term.adapter)
        self._local.terms = terms
        try:
            yield
        finally:
            self._local.terms = None

    def _terms(self, rows: Sequence[RowLoras]) -> list[Term]:
        order: dict[str, dict[int, float]] = {}  # adapter key → {row: scale}, in order of first use
        for index, row in enumerate(rows):
            for key, scale in row:
                order.setdefault(key, {})[index] = scale
        terms = []
        for key, scales in order.items():
            adapter = self._resolve(key)
            values = list(scales.values())
            if len(scales) == len(rows) and len(set(values)) == 1:
                terms.append(Term(adapter, None, values[0], len(rows)))
                continue
            device = _device(adapter)
            dtype = next(iter(adapter.layers.values())).down.weight.dtype
            terms.append(Term(adapter, torch.tensor(list(scales), device=device),
                              torch.tensor(values, device=device, dtype=dtype), len(rows)))
        return terms

    def _hook(self, adapter: Adapter) -> None:
        for module in adapter.layers:
            if module not in self._hooked:
                module.register_forward_hook(self._add, with_kwargs=True)
                self._hooked.add(module)

    def _add(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        terms: list[Term] | None = getattr(self._local, "terms", None)
        if not terms:
            return None
        x = args[0] if args else kwargs["input"]
        result = output
        for term in terms:
            layer = term.adapter.layers.get(module)
            if layer is None:
                continue
            if term.rows is None:
                result = result + layer.delta(x) * (layer.scaling * term.scales)  # as PEFT: added, then cast
                continue
            if x.shape[0] != term.batch:
                raise RuntimeError(f"LoRA rows: a layer saw {x.shape[0]} rows for a batch of {term.batch} "
                                   f"(adapter {term.adapter.name}); this runner does not batch along dim 0")
            scales = term.scales.view(-1, *([1] * (x.ndim - 1))) * layer.scaling  # type: ignore[union-attr]
            delta = (layer.delta(x.index_select(0, term.rows)) * scales).to(result.dtype)
            if result.requires_grad:  # outside inference: autograd must see a new tensor
                result = result.index_add(0, term.rows, delta)
            else:  # as PEFT's mixed batches, in place: no second copy of a large activation
                result.index_add_(0, term.rows, delta)
        return result.to(output.dtype)


def _device(adapter: Adapter) -> torch.device:
    return next(iter(adapter.layers.values())).down.weight.device
