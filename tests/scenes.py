"""Synthetic street frames for tests (never the dev data): textured enough that image statistics
behave as on real frames, cheap to make."""

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def street(seed: int = 0, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """Sky, a dark tree line, a textured asphalt road with lane markings and shadows, a car, a pole."""
    rng = np.random.default_rng(seed)
    w, h = size
    horizon = int(h * rng.uniform(0.35, 0.45))
    x = np.zeros((h, w, 3), dtype=np.float32)
    sky_top, sky_low = np.array([110, 150, 210]), np.array([190, 210, 235])
    t = np.linspace(0, 1, horizon)[:, None, None]
    x[:horizon] = sky_top * (1 - t) + sky_low * t
    road = rng.uniform(85, 120)
    x[horizon:] = road + rng.normal(0, 12, (h - horizon, w, 1))          # asphalt grain
    im = Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(w / 12)):                                          # tree line
        cx, cy = rng.uniform(0, w), horizon - rng.uniform(0, h * 0.15)
        r = rng.uniform(h * 0.03, h * 0.08)
        g = int(rng.uniform(25, 70))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(g // 2, g, g // 3))
    for k in range(6):                                                    # dashed centre line
        y0 = horizon + (h - horizon) * k / 6
        y1 = y0 + (h - horizon) / 12
        xc = w / 2 + (y0 - horizon) * 0.05
        d.polygon([(xc - 2 - k, y0), (xc + 2 + k, y0), (xc + 3 + k, y1), (xc - 3 - k, y1)], fill=(235, 235, 230))
    for _ in range(3):                                                    # shadows
        sx, sy = rng.uniform(0, w), rng.uniform(horizon, h)
        d.ellipse([sx, sy, sx + rng.uniform(40, 120), sy + rng.uniform(10, 30)], fill=(25, 25, 30))
    cx, cy = rng.uniform(w * 0.2, w * 0.7), horizon + (h - horizon) * rng.uniform(0.2, 0.5)
    cw = w * 0.12
    d.rectangle([cx, cy, cx + cw, cy + cw * 0.6], fill=tuple(int(v) for v in rng.integers(40, 200, 3)))
    d.rectangle([cx + cw * 0.1, cy + cw * 0.05, cx + cw * 0.9, cy + cw * 0.25], fill=(30, 35, 45))
    for wx in (cx + cw * 0.1, cx + cw * 0.75):
        d.rectangle([wx, cy + cw * 0.55, wx + cw * 0.15, cy + cw * 0.7], fill=(8, 8, 8))
    px = rng.uniform(w * 0.75, w * 0.95)
    d.rectangle([px, horizon - h * 0.25, px + 5, horizon + h * 0.1], fill=(60, 60, 65))
    return im.filter(ImageFilter.GaussianBlur(0.6))
