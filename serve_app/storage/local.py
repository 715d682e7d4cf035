"""The development default: images on the local disk, served by the ingress itself behind
HMAC-signed expiring links (`/v1/files/images/<key>?expires=…&signature=…`).

The signature covers the object key and the expiry, not the host, so a link works through
whatever address reached the service. The signing key comes from `ARTSERVE_URL_SIGNING_KEY`
or is generated once into the storage directory, so links survive a restart.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import re
import time
from pathlib import Path
from urllib.parse import urlencode

from serve_app.errors import PermissionDeniedError
from serve_app.storage import new_object_key

ROUTE_PREFIX = "/v1/files/images/"
KEY_PATTERN = re.compile(r"^\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.(png|jpeg|webp)$")
_SECRET_FILE = ".url-signing-key"
# A `.part` file older than this is left over from a crash mid-write: no writer takes minutes.
STALE_PART_S = 3600
logger = logging.getLogger("ray.serve")


def load_signing_key(directory: Path) -> bytes:
    configured = os.environ.get("ARTSERVE_URL_SIGNING_KEY")
    if configured:
        return configured.encode()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _SECRET_FILE
    try:  # O_EXCL: exactly one process creates it, the others read the winner's key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):
            key = path.read_bytes().strip()
            if key:
                return key
            time.sleep(0.02)  # the creator is between open() and write()
        raise RuntimeError("URL signing key file is empty") from None
    key = base64.urlsafe_b64encode(os.urandom(32))
    with os.fdopen(fd, "wb") as file:
        file.write(key)
    return key


class LocalImageStore:
    def __init__(self, directory: str, *, url_ttl_s: int, public_url: str | None = None):
        self.root = Path(directory)
        self.url_ttl_s = url_ttl_s
        self.public_url = public_url.rstrip("/") if public_url else None
        self._key = load_signing_key(self.root)

    def _sign(self, key: str, expires: int) -> str:
        digest = hmac.new(self._key, f"{key}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def put(self, data: bytes, output_format: str, base_url: str) -> str:
        key = new_object_key(output_format)
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.rename(path)  # readers never see a half-written image
        return self.signed_url(key, base_url)

    def signed_url(self, key: str, base_url: str, now_s: float | None = None) -> str:
        expires = int(now_s if now_s is not None else time.time()) + self.url_ttl_s
        query = urlencode({"expires": expires, "signature": self._sign(key, expires)})
        return f"{self.public_url or base_url.rstrip('/')}{ROUTE_PREFIX}{key}?{query}"

    def open_signed(self, key: str, expires: str | None, signature: str | None) -> Path:
        """The file behind a link, or PermissionDeniedError: one message for every refusal,
        so the answer does not tell a forger which part was wrong."""
        denied = PermissionDeniedError("This image link is invalid or has expired.")
        if not (KEY_PATTERN.match(key) and expires and expires.isdigit() and signature):
            raise denied
        if not hmac.compare_digest(self._sign(key, int(expires)), signature):
            raise denied
        if int(expires) < time.time():
            raise denied
        path = self.root / key
        if not path.is_file():
            raise denied
        return path

    def sweep(self, now_s: float | None = None) -> int:
        """The janitor: delete images whose links have all expired (a link lives `url_ttl_s`
        from the write, so the file's mtime says when), stale `.part` files, and the empty
        day directories left behind. Returns how many files went. Safe to run from several
        processes at once: a file someone else deleted first is skipped."""
        now = time.time() if now_s is None else now_s
        removed = 0
        for path in self.root.glob("[0-9][0-9][0-9][0-9]/[0-9][0-9]/[0-9][0-9]/*"):
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            expired = path.suffix == ".part" and age > STALE_PART_S
            expired |= KEY_PATTERN.match(path.relative_to(self.root).as_posix()) is not None and age > self.url_ttl_s
            if expired:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        today = time.strftime("%Y/%m/%d", time.gmtime(now))
        for day in sorted(self.root.glob("[0-9][0-9][0-9][0-9]/[0-9][0-9]/[0-9][0-9]"), reverse=True):
            if day.relative_to(self.root).as_posix() < today:
                for empty in (day, day.parent, day.parent.parent):  # rmdir refuses non-empty ones
                    with contextlib.suppress(OSError):
                        empty.rmdir()
        if removed:
            logger.info("janitor: deleted %d expired image file(s) from %s", removed, self.root)
        return removed
