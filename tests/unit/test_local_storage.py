import time
from urllib.parse import parse_qs, urlsplit

import pytest

from serve_app.errors import PermissionDeniedError
from serve_app.storage.local import ROUTE_PREFIX, LocalImageStore


def split(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    return parts.path.removeprefix(ROUTE_PREFIX), query["expires"][0], query["signature"][0]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("ARTSERVE_URL_SIGNING_KEY", raising=False)
    return LocalImageStore(str(tmp_path), url_ttl_s=3600)


def test_put_then_open(store):
    url = store.put(b"image-bytes", "png", "http://127.0.0.1:8000/")
    assert url.startswith("http://127.0.0.1:8000" + ROUTE_PREFIX)
    key, expires, signature = split(url)
    assert abs(int(expires) - (time.time() + 3600)) < 5
    assert store.open_signed(key, expires, signature).read_bytes() == b"image-bytes"


def test_public_url_wins_over_request_host(tmp_path):
    store = LocalImageStore(str(tmp_path), url_ttl_s=60, public_url="https://img.example.com/")
    assert store.put(b"x", "webp", "http://10.0.0.1:8000/").startswith("https://img.example.com/v1/")


def test_expired_link_is_refused(store):
    key, _, _ = split(store.put(b"x", "png", "http://h/"))
    old = store.signed_url(key, "http://h/", now_s=time.time() - 3601)
    with pytest.raises(PermissionDeniedError):
        store.open_signed(*split(old))


@pytest.mark.parametrize("part", ["key", "expires", "signature"])
def test_tampered_link_is_refused(store, part):
    key, expires, signature = split(store.put(b"x", "png", "http://h/"))
    other_key, _, _ = split(store.put(b"y", "png", "http://h/"))
    tampered = {
        "key": (other_key, expires, signature),
        "expires": (key, str(int(expires) + 86400), signature),
        "signature": (key, expires, signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")),
    }[part]
    with pytest.raises(PermissionDeniedError):
        store.open_signed(*tampered)


def test_foreign_link_from_another_secret_is_refused(tmp_path, store, monkeypatch):
    monkeypatch.setenv("ARTSERVE_URL_SIGNING_KEY", "someone-else")
    foreign = LocalImageStore(str(tmp_path), url_ttl_s=3600)
    with pytest.raises(PermissionDeniedError):
        store.open_signed(*split(foreign.put(b"x", "png", "http://h/")))


@pytest.mark.parametrize("key", ["../../etc/passwd", "2026/01/01/../../../x.png", "/etc/passwd",
                                 ".url-signing-key", "2026/01/01/abc.png"])
def test_path_traversal_and_odd_keys_are_refused(store, key):
    with pytest.raises(PermissionDeniedError):
        store.open_signed(key, str(int(time.time()) + 60), store._sign(key, int(time.time()) + 60))


def test_missing_fields_are_refused(store):
    key, expires, signature = split(store.put(b"x", "png", "http://h/"))
    for args in [(key, None, signature), (key, expires, None), (key, "soon", signature)]:
        with pytest.raises(PermissionDeniedError):
            store.open_signed(*args)


def test_signing_key_is_generated_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("ARTSERVE_URL_SIGNING_KEY", raising=False)
    first = LocalImageStore(str(tmp_path), url_ttl_s=60)
    url = first.put(b"x", "png", "http://h/")
    restarted = LocalImageStore(str(tmp_path), url_ttl_s=60)
    assert restarted.open_signed(*split(url)).read_bytes() == b"x"
    assert (tmp_path / ".url-signing-key").stat().st_mode & 0o077 == 0
