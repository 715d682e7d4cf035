"""Where a model's weights come from: `tiny:NAME` (built locally), a local directory, or a
Hugging Face Hub repo id (downloaded and cached by `from_pretrained`, honouring HF_TOKEN)."""

from __future__ import annotations

from pathlib import Path

from serve_app.config import ModelConfig
from serve_app.engine.tiny import ensure_tiny_model


class WeightsUnavailable(RuntimeError):
    pass


def resolve_source(model: ModelConfig) -> str:
    source = model.source
    if source.startswith("tiny:"):
        return str(ensure_tiny_model(source.removeprefix("tiny:")))
    if source.startswith("gs://"):
        raise WeightsUnavailable(
            f"model {model.id}: gs:// weight sources are not supported yet ({source}); "
            "copy the pipeline directory to local disk and point `source` at it"
        )
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith("."):
        if not (path / "model_index.json").exists():
            raise WeightsUnavailable(
                f"model {model.id}: {source} is not a diffusers pipeline directory "
                "(no model_index.json)"
            )
        return str(path)
    return source  # a Hub repo id
