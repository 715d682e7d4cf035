"""PIL image -> encoded bytes. Pure CPU work that releases the GIL, run off the pipeline."""

from __future__ import annotations

import io

from PIL import Image


def encode_image(image: Image.Image, output_format: str, compression: int = 100) -> bytes:
    """`compression` follows OpenAI's `output_compression`: 0-100, higher is better quality;
    100 gives lossless webp and jpeg quality 100. PNG is always lossless."""
    buffer = io.BytesIO()
    rgb = image.convert("RGB")
    if output_format == "png":
        rgb.save(buffer, format="PNG", compress_level=6)
    elif output_format == "jpeg":
        rgb.save(buffer, format="JPEG", quality=max(1, compression), optimize=True)
    elif output_format == "webp":
        if compression >= 100:
            rgb.save(buffer, format="WEBP", lossless=True, quality=80, method=2)
        else:
            rgb.save(buffer, format="WEBP", quality=compression, method=4)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buffer.getvalue()
