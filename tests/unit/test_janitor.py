"""The local store's janitor: expired images and stale `.part` files go, fresh ones stay."""

from __future__ import annotations

import os
import time

from serve_app.storage.local import STALE_PART_S, LocalImageStore


def age(path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_sweep_deletes_expired_images_and_stale_parts_only(tmp_path, monkeypatch):
    monkeypatch.delenv("ARTSERVE_URL_SIGNING_KEY", raising=False)
    store = LocalImageStore(str(tmp_path), url_ttl_s=3600)
    fresh = store.root / store.put(b"fresh", "png", "http://h/").split("/v1/files/images/")[1].split("?")[0]
    old_dir = tmp_path / "2020" / "01" / "02"
    old_dir.mkdir(parents=True)
    expired = old_dir / ("a" * 32 + ".webp")
    expired.write_bytes(b"old")
    age(expired, 3601)
    nearly = fresh.with_name("b" * 32 + ".png")
    nearly.write_bytes(b"still linked")
    age(nearly, 3500)
    stale_part = fresh.with_name("c" * 32 + ".part")
    stale_part.write_bytes(b"crashed mid-write")
    age(stale_part, STALE_PART_S + 1)
    live_part = fresh.with_name("d" * 32 + ".part")
    live_part.write_bytes(b"being written")
    stranger = old_dir / "notes.txt"  # not ours: the janitor deletes only what the store writes
    stranger.write_text("keep")
    age(stranger, 10**6)

    assert store.sweep() == 2
    assert not expired.exists() and not stale_part.exists()
    assert fresh.exists() and nearly.exists() and live_part.exists() and stranger.exists()
    assert (tmp_path / ".url-signing-key").exists()

    stranger.unlink()
    store.sweep()
    assert not (tmp_path / "2020").exists()  # empty past days are removed too
    assert fresh.parent.exists()


def test_sweep_tolerates_a_missing_directory_and_a_concurrent_janitor(tmp_path, monkeypatch):
    monkeypatch.setenv("ARTSERVE_URL_SIGNING_KEY", "k")
    store = LocalImageStore(str(tmp_path / "images"), url_ttl_s=60)
    assert store.sweep() == 0
    other = LocalImageStore(str(tmp_path / "images"), url_ttl_s=60)
    url = store.put(b"x", "png", "http://h/")
    path = store.root / url.split("/v1/files/images/")[1].split("?")[0]
    age(path, 61)
    assert store.sweep() + other.sweep() == 1
