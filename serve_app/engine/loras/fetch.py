"""An adapter's file on this node: a local path as it is, `gs://` objects copied into the cache
once (write, then rename: never half a file), Hub files through huggingface_hub's own cache at
the pinned revision. Runs on a loader thread."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from serve_app.config import LoraSource

logger = logging.getLogger("ray.serve")


class AdapterUnavailable(RuntimeError):
    """The file cannot be fetched right now (storage, network): not the request's fault."""


def cache_dir() -> Path:
    from serve_app.engine.tiny import default_cache_dir

    return default_cache_dir().parent / "loras"


def local_file(source: LoraSource) -> Path:
    kind = source.kind()
    if kind == "local":
        return Path(source.source).expanduser()
    if kind == "gcs":
        return _from_gcs(source.source)
    return _from_hub(source)


def _from_gcs(url: str) -> Path:
    from serve_app.storage.gcs import gcs_client, parse_bucket_url

    bucket, name = parse_bucket_url(url)
    target = cache_dir() / "gcs" / bucket / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".part-", dir=target.parent)
    os.close(fd)
    try:
        logger.info("LoRA: copying %s to %s", url, target)
        gcs_client().bucket(bucket).blob(name).download_to_filename(partial)
        os.replace(partial, target)
    except Exception as exc:
        raise AdapterUnavailable(f"cannot copy {url}: {type(exc).__name__}: {exc}") from exc
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def _from_hub(source: LoraSource) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source.source, source.weight_name, revision=source.revision,
                                    token=os.environ.get("HF_TOKEN") or None,
                                    cache_dir=os.environ.get("ARTSERVE_HF_CACHE") or None))
    except Exception as exc:
        raise AdapterUnavailable(f"cannot fetch {source.source}/{source.weight_name}@{source.revision} from the "
                                 f"Hugging Face Hub: {type(exc).__name__}: {exc}") from exc
