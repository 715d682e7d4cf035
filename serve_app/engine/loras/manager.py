"""A replica's adapters: which are loaded, loading the rest off the step loop, and lending them to
requests.

- `acquire` (the replica's event loop) resolves a request's adapters by name, loads any that is
  not in memory on a loader thread (one load at a time, each on a thread that ends with it:
  engine/threads.py), and returns a `Lease`: the (key, scale) pairs its images
  carry, and what the response reports. A request is submitted to the step loop only once its
  lease is granted, so the loop never waits for a load; the running batch goes on meanwhile.
- At most `max_loaded_loras` adapters stay loaded, least recently used out; one that a request
  holds is never evicted. Evicted adapters retire: they stay resolvable until a denoiser call ran
  without them, since a cancelled request's images may still run the step in progress.
- A file is identified by its content (sha256): a file replaced under the same name is a new
  adapter, never a stale one. A file that was refused stays refused until it changes."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from serve_app.config import ModelConfig
from serve_app.engine.loras.fetch import AdapterUnavailable, local_file
from serve_app.engine.loras.loading import Adapter, AdapterReader, AdapterRefused, sha256_of
from serve_app.engine.loras.rows import LoraRows, RowLoras
from serve_app.engine.threads import on_own_thread
from serve_app.errors import ArtServeError, InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from serve_app.job import AppliedLora, LoraChoice
from serve_app.lora_catalog import CatalogEntry, LoraCatalog

logger = logging.getLogger("ray.serve")
Fingerprint = tuple


@dataclass
class Lease:
    """A request's hold on its adapters, until `release()`."""

    spec: RowLoras  # ImageSpec.loras: (key, scale), adapters at scale 0 left out
    applied: tuple[AppliedLora, ...]  # the response's report, every adapter asked for
    _release: Callable[[], None] = field(repr=False)
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release()


@dataclass(eq=False)
class _Entry:
    adapter: Adapter
    fingerprint: Fingerprint
    users: int = 0


class LoraManager:
    def __init__(self, pipeline: Any, model: ModelConfig, catalog: LoraCatalog, metrics: Any,
                 on_change: Callable[[list[str]], None] = lambda names: None):
        self.model = model
        self.catalog = catalog
        self.metrics = metrics
        self.reader = AdapterReader(pipeline)
        self.rows = LoraRows(self._resolve, self._after_batch)
        self._on_change = on_change  # the names loaded now (routing prefers replicas that hold one)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # key → entry, least recently used first
        self._keys: dict[Fingerprint, str] = {}
        self._retiring: dict[str, Adapter] = {}
        self._refused: dict[Fingerprint, AdapterRefused] = {}
        self._loading: dict[Fingerprint, asyncio.Future] = {}
        self._names: list[str] = []
        self._lock = threading.Lock()  # the loop thread resolves while the event loop leases
        self._loading_lock = threading.Lock()  # one load at a time, each on a thread of its own (threads.py)

    def loaded(self) -> list[str]:
        """The names of the adapters in memory."""
        with self._lock:
            return list(self._names)

    async def acquire(self, choices: Sequence[LoraChoice]) -> Lease:
        held: list[_Entry] = []
        try:
            for choice in choices:
                held.append(await self._use(choice))
        except BaseException:
            self._release(held)
            raise
        spec = tuple((e.adapter.key, c.scale) for e, c in zip(held, choices, strict=True) if c.scale != 0)
        applied = tuple(AppliedLora(c.name, c.scale, e.adapter.sha256) for e, c in zip(held, choices, strict=True))
        return Lease(spec, applied, lambda: self._release(held))

    async def _use(self, choice: LoraChoice) -> _Entry:
        entry = self.catalog.get(self.model.id, choice.name)
        fingerprint = entry and _fingerprint(entry)
        if entry is None or fingerprint is None:
            raise self._unknown(choice)
        with self._lock:
            held = self._pin(self._keys.get(fingerprint))
        if held is not None:
            self.metrics.lora_lookup(hit=True)
            return held
        self.metrics.lora_lookup(hit=False)
        while True:  # a fresh load can be evicted and freed before this waiter wakes: then again
            if fingerprint in self._refused:
                raise self._refusal(choice, self._refused[fingerprint])
            future = self._loading.get(fingerprint)
            if future is None:
                future = on_own_thread(self._load, entry, fingerprint, name="lora-load")
                self._loading[fingerprint] = future
                future.add_done_callback(lambda _: self._loading.pop(fingerprint, None))
            try:
                key = await asyncio.shield(future)  # a request that leaves does not cancel a shared load
            except AdapterRefused as exc:
                raise self._refusal(choice, exc) from None
            except AdapterUnavailable as exc:
                logger.warning("model %s: LoRA adapter %r unavailable: %s", self.model.id, choice.name, exc)
                raise ServiceUnavailableError(f"LoRA adapter '{choice.name}' cannot be fetched right now; "
                                              "try again later.") from None
            except FileNotFoundError:
                raise self._unknown(choice) from None
            with self._lock:
                held = self._pin(key)
            if held is not None:
                return held

    def _load(self, entry: CatalogEntry, fingerprint: Fingerprint) -> str:
        """On a loader thread: fetch, hash, build; then make it the name's current adapter."""
        with self._loading_lock:
            return self._load_one(entry, fingerprint)

    def _load_one(self, entry: CatalogEntry, fingerprint: Fingerprint) -> str:
        started = time.monotonic()
        path = local_file(entry.source)
        try:
            sha256 = sha256_of(path)
            adapter = self.reader.read(path, entry.name, sha256)
        except AdapterRefused as exc:
            logger.warning("model %s: LoRA adapter %r refused (%s): %s", self.model.id, entry.name, path, exc)
            self._refused[fingerprint] = exc
            raise
        if _fingerprint(entry) != fingerprint:  # replaced while we read it: the next request loads it anew
            logger.info("model %s: LoRA file %s changed while loading", self.model.id, path)
        seconds = time.monotonic() - started
        self.metrics.lora_loaded(seconds)
        logger.info("model %s: LoRA adapter %r loaded in %.2fs (%d layers, %.1f MB, sha256 %s)", self.model.id,
                    entry.name, seconds, len(adapter.layers), adapter.nbytes / 1e6, sha256[:16])
        with self._lock:
            for old_fingerprint, old_key in list(self._keys.items()):  # an older file of the same name
                if old_key.split("@")[0] == entry.name and old_key != adapter.key:
                    del self._keys[old_fingerprint]
                    old = self._entries.get(old_key)
                    if old is not None and old.users == 0:
                        self._retire(old_key)
            self._keys[fingerprint] = adapter.key
            if adapter.key not in self._entries:
                self._entries[adapter.key] = _Entry(adapter, fingerprint)
            self._evict(keep=adapter.key)
        return adapter.key

    def _pin(self, key: str | None) -> _Entry | None:
        """Under the lock: one more user, most recently used; None when `key` is not in memory. (A
        load's result may have been evicted before its waiter woke: from retirement it comes back.)"""
        if key is not None and key not in self._entries and key in self._retiring:
            self._entries[key] = _Entry(self._retiring.pop(key), ())
        entry = self._entries.get(key) if key is not None else None
        if entry is None:
            return None
        entry.users += 1
        self._entries.move_to_end(key)
        self._evict(keep=key)
        return entry

    def _release(self, held: list[_Entry]) -> None:
        with self._lock:
            for entry in held:
                entry.users -= 1
                if entry.adapter.key not in self._keys.values() and entry.users == 0:
                    self._retire(entry.adapter.key)  # superseded by a newer file of its name
            self._evict()

    def _evict(self, keep: str | None = None) -> None:
        """Under the lock: least recently used first, down to the bound; never one in use."""
        for key in list(self._entries):
            if len(self._entries) <= self.model.max_loaded_loras:
                break
            if key != keep and self._entries[key].users == 0:
                self._retire(key)
                self.metrics.lora_evicted()
        names = sorted(e.adapter.name for e in self._entries.values())
        if names != self._names:
            self._names = names
            self.metrics.loras_in_memory(len(names))
            self._on_change(names)

    def _retire(self, key: str) -> None:
        self._retiring[key] = self._entries.pop(key).adapter

    def _resolve(self, key: str) -> Adapter:
        """On the loop thread, for the images' (key, scale) pairs."""
        with self._lock:
            entry = self._entries.get(key)
            adapter = entry.adapter if entry is not None else self._retiring.get(key)
        if adapter is None:
            raise RuntimeError(f"LoRA adapter {key} is not loaded")  # a bug: images carry only leased keys
        return adapter

    def _after_batch(self, keys: set[str]) -> None:
        if not self._retiring:  # the common case, read without the lock (one just retired waits a step)
            return
        with self._lock:
            for key in [k for k in self._retiring if k not in keys]:
                del self._retiring[key]  # the memory goes with the last reference

    def _unknown(self, choice: LoraChoice) -> ArtServeError:
        if choice.param == "model":
            return ModelNotFoundError(f"{self.model.id}:{choice.name}")
        return InvalidRequestError(f"Model '{self.model.id}' has no LoRA adapter '{choice.name}'.",
                                   param=choice.param, code="lora_not_found")

    def _refusal(self, choice: LoraChoice, exc: AdapterRefused) -> ArtServeError:
        return InvalidRequestError(f"LoRA adapter '{choice.name}' cannot be used with model '{self.model.id}': "
                                   f"{exc.reason}.", param=choice.param, code="invalid_lora")


def _fingerprint(entry: CatalogEntry) -> Fingerprint | None:
    """What changes when the file does: local files by (path, inode, size, mtime); gs:// and Hub
    files by their name (read once per replica; the docs say to give a new version a new name)."""
    source = entry.source
    if source.kind() != "local":
        return (source.source, source.weight_name, source.revision)
    path = os.path.expanduser(source.source)
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
