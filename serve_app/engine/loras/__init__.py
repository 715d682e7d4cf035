"""Per-request LoRA adapters (docs/loras.md): `loading` turns a file into LoRA layers for this
pipeline, `rows` applies them per batch row inside one forward, `manager` keeps the loaded ones
(LRU, pinned while in use) and loads the rest off the step loop."""

from serve_app.engine.loras.loading import Adapter, AdapterRefused
from serve_app.engine.loras.manager import Lease, LoraManager
from serve_app.engine.loras.rows import LoraRows

__all__ = ["Adapter", "AdapterRefused", "Lease", "LoraManager", "LoraRows"]
