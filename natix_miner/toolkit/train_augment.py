"""Training-time image distortions: the validators' own pipeline plus conditions they may send.

Why: the head is fitted on frozen features of a few hundred images; showing it each training
image again as the validators would send it (augmented / letterboxed 224 crops, raw re-encoded
frames; natix_miner.toolkit.challenge) and under conditions the dev data lacks (night, rain and fog,
motion blur, real JPEG loss, occluders) makes the features it learns from cover what it meets.

Every function is deterministic given the `numpy.random.Generator`; the photometric ones keep the
image's size and mode (RGB in, RGB out). The condition distortions here are numpy + PIL; the
validator eras are `challenge.apply_era` itself (its arithmetic, OpenCV included), never a copy,
so training sees exactly what `local`, `eval` and `calibrate` score.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from natix_miner.toolkit import challenge


def _arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _img(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def night(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Dusk/night: gamma darkening, a blue cast and sensor noise that grows as light falls."""
    x = _arr(image) / 255.0
    gamma = rng.uniform(1.6, 3.0)
    gain = rng.uniform(0.35, 0.75)
    x = gain * np.power(x, gamma)
    tint = np.array([rng.uniform(0.75, 0.9), rng.uniform(0.85, 0.95), 1.0], dtype=np.float32)
    x = x * tint
    x = x + rng.normal(0.0, rng.uniform(0.01, 0.035), size=x.shape).astype(np.float32)
    return _img(x * 255.0)


def fog(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Haze: blend towards a light grey that is denser towards the top (the far field)."""
    x = _arr(image)
    h = x.shape[0]
    density = rng.uniform(0.25, 0.6)
    ramp = np.linspace(1.0, 0.4, h, dtype=np.float32)[:, None, None]
    veil = rng.uniform(170, 230)
    alpha = density * ramp
    return _img(x * (1 - alpha) + veil * alpha)


def rain(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rain: light haze, darker scene and slanted bright streaks."""
    x = _arr(fog(image, rng)) * rng.uniform(0.75, 0.95)
    h, w = x.shape[:2]
    layer = np.zeros((h, w), dtype=np.float32)
    n = int(rng.integers(150, 500) * (h * w) / (640 * 480))
    length = max(4, int(rng.uniform(0.02, 0.05) * h))
    slant = rng.uniform(-0.4, 0.4)
    ys = rng.integers(0, h, size=n)
    xs = rng.integers(0, w, size=n)
    for t in range(length):
        yy = np.clip(ys + t, 0, h - 1)
        xx = np.clip((xs + slant * t).astype(int), 0, w - 1)
        layer[yy, xx] = 1.0
    streaks = np.asarray(Image.fromarray((layer * 255).astype(np.uint8)).filter(ImageFilter.BoxBlur(1)),
                         dtype=np.float32) / 255.0
    x = x + streaks[..., None] * rng.uniform(60, 120)
    return _img(x)


def motion_blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Camera or vehicle motion: a line kernel (horizontal, vertical or diagonal) of 3-9 px,
    scaled with the image so a full-resolution frame blurs like a small one."""
    w, h = image.size
    k = int(rng.choice([3, 5, 7, 9]))
    direction = int(rng.integers(0, 4))
    kernel = np.zeros((k, k), dtype=np.float32)
    c = k // 2
    if direction == 0:
        kernel[c, :] = 1
    elif direction == 1:
        kernel[:, c] = 1
    elif direction == 2:
        np.fill_diagonal(kernel, 1)
    else:
        np.fill_diagonal(np.fliplr(kernel), 1)
    # PIL kernels are at most 5x5: apply a larger one as repeated 5x5 passes on a shrunk image.
    scale = max(1.0, min(w, h) / 480.0)
    small = image.convert("RGB")
    if scale > 1.0:
        small = small.resize((max(1, int(w / scale)), max(1, int(h / scale))), Image.Resampling.BILINEAR)
    if k <= 5:
        kk = np.zeros((5, 5), dtype=np.float32)
        o = (5 - k) // 2
        kk[o:o + k, o:o + k] = kernel
        out = small.filter(ImageFilter.Kernel((5, 5), kk.ravel().tolist(), scale=float(kk.sum())))
    else:
        arr = np.asarray(small, dtype=np.float32)
        pad = np.pad(arr, ((c, c), (c, c), (0, 0)), mode="edge")
        acc = np.zeros_like(arr)
        for dy, dx in zip(*np.nonzero(kernel)):
            acc += pad[dy:dy + arr.shape[0], dx:dx + arr.shape[1]]
        out = _img(acc / kernel.sum())
    return out.resize((w, h), Image.Resampling.BILINEAR) if out.size != (w, h) else out


def jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Real JPEG loss at a random quality in [30, 90]."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=int(rng.integers(30, 91)))
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def occlusion(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """1-3 random flat-coloured rectangles (wipers, vehicles, poles), each 5-20 % of a side."""
    x = _arr(image)
    h, w = x.shape[:2]
    for _ in range(int(rng.integers(1, 4))):
        rh = max(1, int(h * rng.uniform(0.05, 0.2)))
        rw = max(1, int(w * rng.uniform(0.05, 0.2)))
        top = int(rng.integers(0, max(1, h - rh)))
        left = int(rng.integers(0, max(1, w - rw)))
        x[top:top + rh, left:left + rw] = rng.uniform(0, 255, size=3)
    return _img(x)


PHOTOMETRIC: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "night": night, "fog": fog, "rain": rain, "motion_blur": motion_blur, "jpeg": jpeg,
    "occlusion": occlusion,
}


def random_training_view(image: Image.Image, rng: np.random.Generator, *,
                         p_condition: float = 0.6, p_validator: float = 0.7) -> Image.Image:
    """One augmented copy of a training image.

    With probability `p_condition`, one or two of the condition distortions above; then with
    probability `p_validator`, a validator era (augmented levels 0-3, letterbox or raw, uniform),
    and always a JPEG q75 round trip, since every image a miner receives went through one.
    """
    out = image.convert("RGB")
    if rng.random() < p_condition:
        names = sorted(PHOTOMETRIC)
        for name in rng.choice(names, size=int(rng.integers(1, 3)), replace=False):
            out = PHOTOMETRIC[str(name)](out, rng)
    if rng.random() < p_validator:
        out, _ = challenge.apply_era(out, "mixed", rng)
    return challenge.jpeg_roundtrip(out)
