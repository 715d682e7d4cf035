"""Masked edits keep the unmasked pixels: the input's own pixels over the region the mask
keeps, the model's output where it repaints, and a short feathered band between them.

Diffusers' Inpaint pipelines (and our runners, which match them) return the VAE's
reconstruction of the kept region, never its pixels: close with real weights, noise with the
tiny ones. Users of an edit API expect what they did not mask back unchanged, so after the
final decode the kept region is pasted back. The band lies inside the repainted area: every
pixel the mask keeps is exactly the input's, and over the first `feather_px` pixels of the
repainted area (chessboard distance from the kept region) the output blends linearly from the
input to the model's, so the border shows no seam. Pixels farther in are the model's own.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def repaint_weights(mask: Image.Image, feather_px: int) -> np.ndarray:
    """Per pixel, the model output's share (H x W, float32 in [0, 1]): 0 where the mask keeps
    (< 128, as the runners binarize it), min(d, N + 1) / (N + 1) at distance d inside the
    repainted area, N = `feather_px`."""
    kept = np.asarray(mask.convert("L")) < 128
    # Pixels at distance > k from the kept region are those outside its k-times 3x3 dilation;
    # summing that over k = 0..N counts min(d, N + 1).
    outside = np.zeros(kept.shape, np.float32)
    for _ in range(feather_px + 1):
        outside += ~kept
        kept = _dilated(kept)
    return outside / (feather_px + 1)


def _dilated(kept: np.ndarray) -> np.ndarray:
    """One step of 3x3 (chessboard) dilation, as two separable passes."""
    rows = kept.copy()
    rows[:, 1:] |= kept[:, :-1]
    rows[:, :-1] |= kept[:, 1:]
    both = rows.copy()
    both[1:] |= rows[:-1]
    both[:-1] |= rows[1:]
    return both


def keep_unmasked(original: Image.Image, mask: Image.Image, output: Image.Image, feather_px: int) -> Image.Image:
    """`output` with `original`'s pixels where `mask` (L, 255 = repaint) keeps them, feathered."""
    weights = repaint_weights(mask, feather_px)[..., None]
    source = np.asarray(original.convert("RGB"), dtype=np.float32)
    made = np.asarray(output.convert("RGB"), dtype=np.float32)
    blended = np.rint(source + weights * (made - source))  # weight 0: exactly the input; 1: the output
    return Image.fromarray(blended.astype(np.uint8), "RGB")
