"""Where images go: `ImageStore.put` stores one encoded image and returns its link."""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from serve_app.config import AppConfig

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImageStore(Protocol):
    def put(self, data: bytes, output_format: str, base_url: str) -> str:
        """Store the image; return a link a plain GET can fetch until it expires."""
        ...


def new_object_key(output_format: str, now_s: float | None = None) -> str:
    """`YYYY/MM/DD/<128 random bits>.<ext>`: unguessable, and easy to expire by prefix."""
    day = time.strftime("%Y/%m/%d", time.gmtime(now_s))
    return f"{day}/{secrets.token_hex(16)}.{output_format}"


def open_store(config: AppConfig) -> ImageStore:
    if config.uses_gcs():
        from serve_app.storage.gcs import GcsImageStore  # google libraries: only when used

        return GcsImageStore(
            config.storage, url_ttl_s=config.url_ttl_s, retry_s=config.storage_retry_s,
            signer_email=config.signing_service_account,
        )
    from serve_app.storage.local import LocalImageStore

    return LocalImageStore(config.storage, url_ttl_s=config.url_ttl_s, public_url=config.public_url)
