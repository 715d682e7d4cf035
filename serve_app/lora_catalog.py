"""Which LoRA adapters each model offers: the operator's `loras:` block in the model YAML, and the
files in `<loras_dir>/<model id>/<name>.safetensors`, rescanned every few seconds so that a file
dropped in is usable, and a removed one unlisted, without a restart. Plain Python (no torch): the
ingress lists and checks adapters with it, and each replica finds the file it loads.

Requests only ever name an adapter; where its file lives is the operator's business, so a
request can never point the server at a path or a URL."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serve_app.config import LoraSource, ModelConfig, valid_lora_name

logger = logging.getLogger("ray.serve")
RESCAN_S = 2.0
SUFFIX = ".safetensors"


@dataclass(frozen=True)
class CatalogEntry:
    """One adapter a model offers."""

    model_id: str
    name: str
    source: LoraSource
    origin: str  # "config" (the model YAML) or "directory" (loras_dir)
    created: int  # Unix seconds: the file's mtime (directory), the model's (config)

    @property
    def id(self) -> str:
        """The adapter as a model id of its own: `<base>:<name>`."""
        return f"{self.model_id}:{self.name}"


class LoraCatalog:
    def __init__(self, loras_dir: str | None, models: dict[str, ModelConfig], *, rescan_s: float = RESCAN_S,
                 clock: Callable[[], float] = time.monotonic):
        self._dir = Path(loras_dir).expanduser() if loras_dir else None
        # Adapters only for models whose loop ArtServe runs (the per-row application lives there).
        self._models = {m.id: m for m in models.values() if m.family != "generic" and m.batching.policy != "call"}
        self._rescan_s = rescan_s
        self._clock = clock
        self._scanned: dict[str, tuple[float, dict[str, CatalogEntry]]] = {}
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def supports(self, model_id: str) -> bool:
        return model_id in self._models

    def entries(self, model_id: str) -> dict[str, CatalogEntry]:
        """Every adapter of the model by name: the YAML's, then the directory's (the YAML wins a name)."""
        model = self._models.get(model_id)
        if model is None:
            return {}
        found = dict(self._directory(model_id))
        for name, source in model.loras.items():
            if name in found:
                self._warn_once(f"{model_id}:{name}", "model %s: adapter %r is in the YAML and in %s; the YAML's wins",
                                model_id, name, self._dir)
            found[name] = CatalogEntry(model_id, name, source, "config", model.created)
        return dict(sorted(found.items()))

    def get(self, model_id: str, name: str) -> CatalogEntry | None:
        entry = self.entries(model_id).get(name)
        gone = entry is not None and entry.origin == "directory" and not os.path.exists(entry.source.source)
        if (entry is None or gone) and self._dir is not None and model_id in self._models:
            # Another process (an ingress replica, a model replica) may have seen the change already:
            # look again now instead of answering from this process's last listing.
            with self._lock:
                self._scanned.pop(model_id, None)
            entry = self.entries(model_id).get(name)
        return entry

    def _directory(self, model_id: str) -> dict[str, CatalogEntry]:
        if self._dir is None:
            return {}
        now = self._clock()
        with self._lock:
            cached = self._scanned.get(model_id)
            if cached is not None and now - cached[0] < self._rescan_s:
                return cached[1]
        entries = self._scan(self._dir / model_id)
        with self._lock:
            self._scanned[model_id] = (now, entries)
        return entries

    def _scan(self, folder: Path) -> dict[str, CatalogEntry]:
        entries: dict[str, CatalogEntry] = {}
        try:
            listing = list(os.scandir(folder))
        except FileNotFoundError:
            return entries
        except OSError as exc:
            self._warn_once(str(folder), "LoRA directory %s cannot be read: %s", folder, exc)
            return entries
        for item in listing:
            name = item.name.removesuffix(SUFFIX)
            # Dot files are copies in progress (docs/loras.md: copy, then rename into place).
            if item.name.startswith(".") or not item.name.endswith(SUFFIX) or not item.is_file():
                continue
            if not valid_lora_name(name):
                self._warn_once(item.path, "LoRA file %s ignored: %r is not a valid adapter name", item.path, name)
                continue
            source = LoraSource(source=str(Path(item.path).resolve()))
            entries[name] = CatalogEntry(folder.name, name, source, "directory", int(item.stat().st_mtime))
        return entries

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)
