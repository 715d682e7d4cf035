"""The GCS store against a real emulator over HTTP, signing with a key generated here, or
keyless through a local IAM Credentials server."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography.exceptions import InvalidSignature

from serve_app.storage.gcs import GcsImageStore, parse_bucket_url
from tests.gcs import BUCKET, SERVICE_ACCOUNT, FakeGoogle, service_account_key, verify_v4_url

WEBP = b"RIFF\x1a\x00\x00\x00WEBPVP8L fake image bytes"


@pytest.fixture
def key_store(gcs_env, tmp_path, monkeypatch):
    public_key = service_account_key(tmp_path / "key.json")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "key.json"))
    return GcsImageStore(f"gs://{BUCKET}/images", url_ttl_s=86400, retry_s=2), public_key


@pytest.fixture
def fake_google():
    fake = FakeGoogle()
    yield fake
    fake.close()


def keyless_store(fake: FakeGoogle, monkeypatch, **kwargs) -> GcsImageStore:
    monkeypatch.setenv("ARTSERVE_IAM_ENDPOINT", fake.url)
    return GcsImageStore(
        f"gs://{BUCKET}/keyless", signer_email=SERVICE_ACCOUNT, retry_s=5, credentials=fake.credentials(), **kwargs
    )


@pytest.mark.parametrize(
    ("url", "parsed"),
    [("gs://b-1/x/y/", ("b-1", "x/y/")), ("gs://bucket", ("bucket", "")), ("gs://my.bucket/p", ("my.bucket", "p/"))],
)
def test_bucket_urls(url, parsed):
    assert parse_bucket_url(url) == parsed


@pytest.mark.parametrize("url", ["gs://", "gs://UPPER/x", "s3://bucket/x", "gs://-bad/x", "gs://a/x"])
def test_bad_bucket_urls(url):
    with pytest.raises(ValueError, match="gs://BUCKET"):
        parse_bucket_url(url)


def test_ttl_over_seven_days_is_refused():
    with pytest.raises(ValueError, match="7-day limit"):
        GcsImageStore(f"gs://{BUCKET}", url_ttl_s=7 * 86400 + 1, credentials=object())


def test_key_path_uploads_and_signs_a_v4_url_that_fetches_the_image(key_store, emulator):
    store, public_key = key_store
    assert store.signing_path == "key"
    url = store.put(WEBP, "webp", "http://ignored")
    assert url.startswith(f"{emulator.host}/{BUCKET}/images/")
    assert re.search(r"/images/\d{4}/\d{2}/\d{2}/[0-9a-f]{32}\.webp\?", url)
    query = verify_v4_url(url, public_key)
    assert query["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
    assert query["X-Goog-Expires"] == "86400"
    assert query["X-Goog-Credential"].startswith(f"{SERVICE_ACCOUNT}/")
    response = httpx.get(url)  # a plain GET, no credentials
    assert response.status_code == 200
    assert response.content == WEBP
    blob = store.bucket.get_blob(url.split(f"/{BUCKET}/")[1].split("?")[0])
    assert (blob.content_type, blob.cache_control) == ("image/webp", "private, max-age=86400, immutable")


def test_a_tampered_url_does_not_verify(key_store):
    store, public_key = key_store
    url = store.put(WEBP, "png", "")
    with pytest.raises(InvalidSignature):
        verify_v4_url(url.replace("X-Goog-Expires=86400", "X-Goog-Expires=604800"), public_key)


def test_keyless_path_signs_through_iam_signblob(gcs_env, fake_google, monkeypatch):
    store = keyless_store(fake_google, monkeypatch, url_ttl_s=3600)
    assert store.signing_path == "signBlob"
    url = store.put(WEBP, "jpeg", "")
    [request] = fake_google.sign_requests
    assert request["path"] == f"/v1/projects/-/serviceAccounts/{SERVICE_ACCOUNT}:signBlob"
    assert request["authorization"] == "Bearer token-1"
    assert set(request["body"]) == {"payload"}
    query = verify_v4_url(url, fake_google.public_key)  # the IAM server's signature is the URL's
    assert query["X-Goog-Expires"] == "3600"
    assert query["X-Goog-Credential"].startswith(f"{SERVICE_ACCOUNT}/")
    assert httpx.get(url).content == WEBP
    store.put(WEBP, "jpeg", "")
    assert fake_google.tokens_issued == 1  # the access token is cached


def test_keyless_token_is_refreshed_before_it_expires(gcs_env, fake_google, monkeypatch):
    fake_google.token_lifetime_s = 120  # inside google-auth's refresh margin (225 s): always "expiring"
    store = keyless_store(fake_google, monkeypatch, url_ttl_s=3600)
    store.put(WEBP, "png", "")
    store.put(WEBP, "png", "")
    assert fake_google.tokens_issued == 2
    assert [r["authorization"] for r in fake_google.sign_requests] == ["Bearer token-1", "Bearer token-2"]


def test_signblob_errors_are_retried(gcs_env, fake_google, monkeypatch):
    store = keyless_store(fake_google, monkeypatch, url_ttl_s=3600)
    fake_google.fail_next = 2
    verify_v4_url(store.put(WEBP, "png", ""), fake_google.public_key)
    assert len(fake_google.sign_requests) == 3


def test_keyless_ttl_over_twelve_hours_warns(gcs_env, fake_google, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        keyless_store(fake_google, monkeypatch, url_ttl_s=86400)
    assert "only guarantees signBlob-signed URLs for 43200 s" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        keyless_store(fake_google, monkeypatch, url_ttl_s=43200)
    assert "signBlob" not in caplog.text


def test_keyless_credentials_without_a_service_account_are_a_clear_error(gcs_env, fake_google, monkeypatch):
    with pytest.raises(ValueError, match="ARTSERVE_SIGNING_SERVICE_ACCOUNT"):
        GcsImageStore(f"gs://{BUCKET}", url_ttl_s=3600, credentials=fake_google.credentials())


def test_outage_fails_within_the_retry_budget_then_recovers(key_store, emulator, monkeypatch):
    from google.auth.transport.requests import AuthorizedSession

    store, _ = key_store
    tries, send = [], AuthorizedSession.request
    monkeypatch.setattr(AuthorizedSession, "request", lambda self, *a, **k: tries.append(1) or send(self, *a, **k))
    emulator.stop()
    try:
        started = time.monotonic()
        with pytest.raises(Exception) as raised:  # whatever the transport raises
            store.put(WEBP, "webp", "")
        elapsed = time.monotonic() - started
        # Retried (the first backoff is at most 0.25 s, inside the 2 s budget), then given up within
        # the budget. Not a lower bound on the time: the backoff is jittered from 0 (google.api_core
        # gives up early when the next draw would pass the budget).
        assert len(tries) >= 2 and elapsed < 8, (len(tries), elapsed)
        assert "Connection" in type(raised.value).__name__ + str(raised.value)
    finally:
        emulator.start()
    assert httpx.get(store.put(WEBP, "webp", "")).content == WEBP  # same store, no restart


KEYLESS_SCRIPT = """
from serve_app.storage.gcs import GcsImageStore
store = GcsImageStore("gs://artserve-test/wi", url_ttl_s=3600)
print(store.signing_path, store.signer.signer_email)
print(store.put(b"image bytes", "png", ""))
"""


def test_workload_identity_discovers_its_service_account_and_signs_keyless(emulator, fake_google, tmp_path):
    """As in a GKE pod: no key file, credentials and the account's email from the metadata
    server, links signed by signBlob. A fresh interpreter: google-auth reads the metadata
    server's address when it is imported."""
    host = fake_google.url.removeprefix("http://")
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    env.update(HOME=str(tmp_path), GCE_METADATA_HOST=host, GCE_METADATA_IP=host, STORAGE_EMULATOR_HOST=emulator.host,
               ARTSERVE_IAM_ENDPOINT=fake_google.url, CLOUDSDK_CONFIG=str(tmp_path / "gcloud"))
    result = subprocess.run([sys.executable, "-c", KEYLESS_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    path_line, url = result.stdout.strip().splitlines()
    assert path_line == f"signBlob {SERVICE_ACCOUNT}"
    verify_v4_url(url, fake_google.public_key)
    assert httpx.get(url).content == b"image bytes"
    assert fake_google.sign_requests[0]["authorization"].startswith("Bearer token-")
