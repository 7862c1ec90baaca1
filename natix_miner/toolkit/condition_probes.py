"""Synthetic conditions that the training augmentations do not make (glare), for the tests and the
conditions benchmark (`scripts/bench_conditions.py`). numpy + PIL only."""

from __future__ import annotations

import numpy as np
from PIL import Image


def glare(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A low sun or a headlight in the frame: a clipped disc (1.5-3 % of the diagonal) and a
    Gaussian bloom (sigma 5-10 % of the diagonal, strength 0.7-0.95) that washes out the scene
    around it, centred in the middle band of the frame where a low sun or a headlight sits."""
    x = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w = x.shape[:2]
    cy, cx = rng.uniform(0.25, 0.6) * h, rng.uniform(0.2, 0.8) * w
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot(yy - cy, xx - cx) / np.hypot(h, w)
    bloom = np.exp(-0.5 * (d / rng.uniform(0.05, 0.10)) ** 2)[..., None]
    a = rng.uniform(0.7, 0.95)
    x = x * (1 - a * bloom) + 255.0 * a * bloom
    x[d < rng.uniform(0.015, 0.03)] = 255.0
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")
