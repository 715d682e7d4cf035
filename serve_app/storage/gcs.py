"""Production storage: images in a Google Cloud Storage bucket, handed out as V4 signed
GET URLs that work with no other credentials until they expire.

Uploads use application-default credentials (Workload Identity on GKE, a key file through
`GOOGLE_APPLICATION_CREDENTIALS`, or the VM's service account). Signing takes one of two paths:
- **key**: the credentials are a service-account key, which signs locally;
- **signBlob**: anything else (no private key: Workload Identity, GCE): the IAM Credentials
  API signs for a service account, with the caller's access token, cached and refreshed before
  it expires. Google only guarantees URLs signed this way for 12 hours.

`STORAGE_EMULATOR_HOST` (honoured by google-cloud-storage) points uploads and the signed
URLs at an emulator; `ARTSERVE_IAM_ENDPOINT` does the same for the IAM Credentials API.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
from datetime import timedelta

import google.auth
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry
from google.auth import credentials as auth_credentials
from google.auth.transport.requests import AuthorizedSession, Request
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2 import service_account

from serve_app.storage import CONTENT_TYPES, new_object_key

logger = logging.getLogger("ray.serve")

MAX_V4_TTL_S = 7 * 24 * 3600  # the V4 signing limit
SIGNBLOB_GUARANTEED_TTL_S = 12 * 3600
BUCKET_URL = re.compile(r"^gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(?:/(.*))?$")
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]  # devstorage + iam signBlob
IAM_ENDPOINT = "https://iamcredentials.googleapis.com"
UPLOAD_TIMEOUT_S = (5, 30)  # (connect, read) per attempt; Retry bounds the whole


def parse_bucket_url(url: str) -> tuple[str, str]:
    """`gs://bucket/some/prefix` → ("bucket", "some/prefix/"); ValueError when malformed."""
    match = BUCKET_URL.match(url)
    if not match:
        raise ValueError(f"storage {url!r} is not gs://BUCKET[/PREFIX] with a valid bucket name")
    prefix = (match[2] or "").strip("/")
    return match[1], f"{prefix}/" if prefix else ""


class IamSigner(auth_credentials.Signing):
    """Signs bytes with the IAM Credentials API's `signBlob` for `signer_email`, authorised
    by `credentials` (which have no private key of their own)."""

    def __init__(self, credentials, signer_email: str, *, endpoint: str | None = None, retry: Retry = DEFAULT_RETRY):
        self._session = AuthorizedSession(credentials)  # caches the token; refreshes it before expiry
        self._email = signer_email
        self._url = f"{(endpoint or IAM_ENDPOINT).rstrip('/')}/v1/projects/-/serviceAccounts/{signer_email}:signBlob"
        self._retry = retry

    @property
    def signer_email(self) -> str:
        return self._email

    @property
    def signer(self):
        return None  # no local key; sign_bytes goes over the network

    def sign_bytes(self, message: bytes) -> bytes:
        return self._retry(self._sign_once)(message)

    def _sign_once(self, message: bytes) -> bytes:
        response = self._session.post(
            self._url, json={"payload": base64.b64encode(message).decode()}, timeout=UPLOAD_TIMEOUT_S
        )
        if response.status_code != 200:
            raise api_exceptions.from_http_status(response.status_code, f"IAM signBlob: {response.text[:200]}")
        return base64.b64decode(response.json()["signedBlob"])


class GcsImageStore:
    def __init__(
        self,
        url: str,
        *,
        url_ttl_s: int,
        retry_s: float = 20.0,
        signer_email: str | None = None,
        credentials=None,
    ):
        if url_ttl_s > MAX_V4_TTL_S:
            raise ValueError(f"url_ttl_s {url_ttl_s} is over the 7-day limit of V4 signed URLs ({MAX_V4_TTL_S})")
        self.bucket_name, self.prefix = parse_bucket_url(url)
        self.url_ttl_s = url_ttl_s
        # 5xx, 429, connection errors: exponential backoff from 0.25 s, up to retry_s in all.
        self._retry = DEFAULT_RETRY.with_delay(initial=0.25, maximum=4.0, multiplier=2.0).with_timeout(retry_s)
        if credentials is None:
            credentials, _ = google.auth.default(scopes=SCOPES)
        self.bucket = gcs_client(credentials).bucket(self.bucket_name)
        if isinstance(credentials, service_account.Credentials):
            self.signing_path, self.signer = "key", credentials
        else:
            email = signer_email or _service_account_email(credentials)
            self.signing_path = "signBlob"
            self.signer = IamSigner(
                credentials, email, endpoint=os.environ.get("ARTSERVE_IAM_ENDPOINT"), retry=self._retry
            )
            if url_ttl_s > SIGNBLOB_GUARANTEED_TTL_S:
                logger.warning(
                    "image links last %d s, but Google only guarantees signBlob-signed URLs for %d s: "
                    "links may stop working early. Set ARTSERVE_URL_TTL_S<=%d, or sign with a "
                    "service-account key (GOOGLE_APPLICATION_CREDENTIALS).",
                    url_ttl_s, SIGNBLOB_GUARANTEED_TTL_S, SIGNBLOB_GUARANTEED_TTL_S,
                )
        logger.info("images go to gs://%s/%s, links signed by %s (%s), valid %d s",
                    self.bucket_name, self.prefix, self.signer.signer_email, self.signing_path, url_ttl_s)

    def put(self, data: bytes, output_format: str, base_url: str) -> str:
        blob = self.upload(data, output_format)
        return self.signed_url(blob)

    def upload(self, data: bytes, output_format: str) -> storage.Blob:
        blob = self.bucket.blob(self.prefix + new_object_key(output_format))
        blob.cache_control = f"private, max-age={self.url_ttl_s}, immutable"
        # if_generation_match=0: create only, so a retry never overwrites; a 412 on a retry means an
        # earlier attempt landed (the key is random and ours alone).
        with contextlib.suppress(api_exceptions.PreconditionFailed):
            blob.upload_from_string(
                data, content_type=CONTENT_TYPES[output_format], if_generation_match=0,
                retry=self._retry, timeout=UPLOAD_TIMEOUT_S,
            )
        return blob

    def signed_url(self, blob: storage.Blob) -> str:
        return blob.generate_signed_url(
            version="v4", method="GET", expiration=timedelta(seconds=self.url_ttl_s), credentials=self.signer
        )


def gcs_client(credentials=None) -> storage.Client:
    """A storage client on application-default credentials, or anonymous on an emulator."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return storage.Client(project="artserve-emulator", credentials=auth_credentials.AnonymousCredentials())
    if credentials is None:
        credentials, _ = google.auth.default(scopes=SCOPES)
    return storage.Client(credentials=credentials)


def _service_account_email(credentials) -> str:
    """The service account behind keyless credentials (GCE / GKE metadata server)."""
    email = getattr(credentials, "service_account_email", None)
    if email in (None, "default") and hasattr(credentials, "refresh"):
        credentials.refresh(Request())
        email = getattr(credentials, "service_account_email", None)
    if not email or email == "default":
        raise ValueError(
            "the credentials have no private key and name no service account to sign image links with: "
            "set ARTSERVE_SIGNING_SERVICE_ACCOUNT (or signing_service_account) to the service account's email"
        )
    return email
