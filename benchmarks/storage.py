"""Upload and signing time per image for the GCS store, against gcp-storage-emulator on this
machine, with the local-disk store as the in-run baseline.

    .venv/bin/python benchmarks/storage.py [--images 200] [--iam-delay-ms 30] [--size 1024]

Paths: `key` (service-account key signs locally) and `signBlob` (a local IAM server that
waits --iam-delay-ms before answering, standing in for the round trip to Google). The image
is a real WebP of --size pixels. The emulator is a single-threaded Python server on the same
2 cores, so absolute upload times say little about GCS; signing times and the ratios do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.replica.encoding import encode_image  # noqa: E402
from serve_app.storage.gcs import GcsImageStore  # noqa: E402
from serve_app.storage.local import LocalImageStore  # noqa: E402
from tests.gcs import BUCKET, SERVICE_ACCOUNT, Emulator, FakeGoogle, service_account_key  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: connections, token
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def row(name: str, times: list[float], baseline: float | None) -> str:
    p50, p95 = statistics.median(times), statistics.quantiles(times, n=20)[-1]
    ratio = f"{p50 / baseline:.1f}x" if baseline else "1.0x"
    return f"| {name} | {p50:.2f} | {p95:.2f} | {ratio} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--iam-delay-ms", type=float, default=30.0)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()

    import os

    rng = np.random.default_rng(0)
    pixels = (rng.random((args.size, args.size, 3)) * 255).astype("uint8")
    data = encode_image(Image.fromarray(pixels), "webp", 90)
    work = Path(tempfile.mkdtemp(prefix="artserve-bench-"))
    emulator = Emulator(work / "gcs").start()
    fake = FakeGoogle()
    fake.delay_s = args.iam_delay_ms / 1000
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.host
        service_account_key(work / "key.json")
        os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(work / "key.json")
        key = GcsImageStore(f"gs://{BUCKET}/bench", url_ttl_s=86400)
        os.environ["ARTSERVE_IAM_ENDPOINT"] = fake.url
        keyless = GcsImageStore(f"gs://{BUCKET}/bench", url_ttl_s=43200, signer_email=SERVICE_ACCOUNT,
                                credentials=fake.credentials())
        local = LocalImageStore(str(work / "local"), url_ttl_s=86400)
        blob = key.upload(data, "webp")

        results = [
            ("local disk: write + HMAC link (baseline)", timed(lambda: local.put(data, "webp", "x"), args.images)),
            ("gcs: upload to the emulator", timed(lambda: key.upload(data, "webp"), args.images)),
            ("gcs: sign, key path", timed(lambda: key.signed_url(blob), args.images)),
            (f"gcs: sign, signBlob (+{args.iam_delay_ms:g} ms round trip)",
             timed(lambda: keyless.signed_url(blob), args.images)),
            ("gcs: upload + sign, key path (what a request pays)", timed(lambda: key.put(data, "webp", ""),
                                                                        args.images)),
        ]
    finally:
        emulator.stop()
        fake.close()
    baseline = statistics.median(results[0][1])
    print(f"{args.images} images of {len(data) / 1024:.0f} KiB (WebP {args.size}x{args.size}); "
          f"token fetches for signBlob: {fake.tokens_issued}\n")
    print("| step | p50 ms | p95 ms | p50 vs local |\n|---|---|---|---|")
    for name, times in results:
        print(row(name, times, None if name.startswith("local") else baseline))


if __name__ == "__main__":
    main()
