"""Where a model's weights come from, and loading them: `tiny:NAME` (built locally), a local
diffusers pipeline directory, `gs://bucket/prefix` (copied to the local cache once), or a
Hugging Face Hub repo id (downloaded and cached by diffusers, with `HF_TOKEN` for gated repos).

Any failure is a `WeightsUnavailable` that names the model, the source and what to do; the
replica fails to start with it and the ingress answers 503 for that model."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from serve_app.config import ModelConfig
from serve_app.engine.tiny import default_cache_dir, ensure_tiny_model

logger = logging.getLogger(__name__)
PROGRESS_EVERY_S = 10.0


class WeightsUnavailable(RuntimeError):
    pass


def load_pipeline(model: ModelConfig, dtype):
    from diffusers import DiffusionPipeline

    from serve_app.engine.qwen_vl import pipeline_overrides

    source = resolve_source(model)
    hub = source == model.source and not Path(source).is_absolute()
    try:
        return DiffusionPipeline.from_pretrained(
            source, torch_dtype=dtype, revision=model.revision if hub else None,
            token=os.environ.get("HF_TOKEN") or None, cache_dir=os.environ.get("ARTSERVE_HF_CACHE") or None,
            **pipeline_overrides(model, source, hub),
        )
    except Exception as exc:
        if not hub:
            raise WeightsUnavailable(f"model {model.id}: cannot load the pipeline in {source}: {exc}") from exc
        raise WeightsUnavailable(_hub_advice(model, exc)) from exc


def _hub_advice(model: ModelConfig, exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    where = f"model {model.id}: cannot load {model.source}" + (f"@{model.revision}" if model.revision else "")
    if "Gated" in text or "401" in text or "403" in text:
        return (f"{where} from the Hugging Face Hub: the repo is gated or private. Accept its license on "
                f"huggingface.co with the account whose token is in HF_TOKEN, and set HF_TOKEN for the replicas.")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in text.lower() or "connect" in text.lower():
        return (f"{where}: the Hugging Face Hub is unreachable (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}) "
                f"and the weights are not in the cache. Download them where the Hub is reachable "
                f"(huggingface-cli download {model.source}) into HF_HOME, or copy the pipeline directory to "
                f"gs:// or local disk and point `source` at it.")
    return f"{where}: {text[:500]}"


def resolve_source(model: ModelConfig) -> str:
    """A local directory to load from, or the Hub repo id."""
    source = model.source
    if source.startswith("tiny:"):
        return str(ensure_tiny_model(source.removeprefix("tiny:")))
    if source.startswith("gs://"):
        return str(copy_from_gcs(model))
    path = Path(source).expanduser()
    if path.is_absolute() or source.startswith("."):
        if not (path / "model_index.json").exists():
            raise WeightsUnavailable(
                f"model {model.id}: {source} is not a diffusers pipeline directory (no model_index.json); "
                "point `source` at a directory written by save_pretrained()"
            )
        return str(path.resolve())
    return source  # a Hub repo id


def copy_from_gcs(model: ModelConfig, cache_dir: Path | None = None, retry_s: float = 60.0) -> Path:
    """Copy the pipeline directory under a gs:// prefix into the local cache, once (a marker
    file is written last, so an interrupted copy is redone, never half-used). Transient
    errors are retried with backoff for up to `retry_s` per call."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    from serve_app.storage.gcs import gcs_client, parse_bucket_url

    retry = DEFAULT_RETRY.with_timeout(retry_s)
    bucket, prefix = parse_bucket_url(model.source)
    target = (cache_dir or default_cache_dir().parent / "weights") / "gcs" / bucket / prefix
    if (target / ".complete").exists():
        return target
    try:
        blobs = [b for b in gcs_client().list_blobs(bucket, prefix=prefix, retry=retry) if not b.name.endswith("/")]
    except Exception as exc:
        raise WeightsUnavailable(
            f"model {model.id}: cannot list {model.source}: {exc}. Check the bucket name and that the replica's "
            "service account can read it (roles/storage.objectViewer)"
        ) from exc
    if not any(b.name == f"{prefix}model_index.json" for b in blobs):
        raise WeightsUnavailable(
            f"model {model.id}: {model.source} holds no diffusers pipeline (no model_index.json among "
            f"{len(blobs)} objects); upload one with: gcloud storage cp -r PIPELINE_DIR/* {model.source.rstrip('/')}/"
        )
    total = sum(b.size or 0 for b in blobs)
    logger.info("model %s: copying %d files (%.2f GB) from %s to %s", model.id, len(blobs), total / 1e9,
                model.source, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".copy-", dir=target.parent))
    started = last_report = time.monotonic()
    done = 0
    try:
        for index, blob in enumerate(blobs, 1):
            path = tmp / blob.name.removeprefix(prefix)
            path.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(path), retry=retry)
            done += blob.size or 0
            if time.monotonic() - last_report > PROGRESS_EVERY_S or index == len(blobs):
                last_report = time.monotonic()
                logger.info("model %s: copied %d/%d files, %.2f/%.2f GB, %.0f s", model.id, index, len(blobs),
                            done / 1e9, total / 1e9, last_report - started)
        (tmp / ".complete").write_text(model.source)
        shutil.rmtree(target, ignore_errors=True)  # a copy interrupted before its marker
        try:
            tmp.rename(target)
        except OSError:  # another replica on this node finished first; its copy is the same
            if not (target / ".complete").exists():
                raise
    except Exception as exc:
        raise WeightsUnavailable(f"model {model.id}: copying {model.source} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
