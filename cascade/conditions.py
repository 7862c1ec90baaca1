"""Cheap image-condition estimates: day/night, low contrast, blur.

Validators send night scenes, washed-out images (their contrast distortion multiplies pixels by
0.725) and Gaussian-blurred ones (kernel 9). Tiers are less sure on those, so the router can ask
for a wider margin before stopping early, and calibration can be inspected per condition. The
statistics are computed with numpy on a downscaled grey image (a few ms for a 4K input):
mean luminance, RMS contrast and the variance of the Laplacian (a standard focus measure).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cascade.config import ConditionsConfig

CONDITIONS = ("day", "night", "low_contrast", "blur")


@dataclass(frozen=True)
class ImageStats:
    luminance: float  # mean grey level, 0..1
    contrast: float  # RMS contrast: std of grey levels, 0..1
    sharpness: float  # variance of the 4-neighbour Laplacian, grey levels 0..255


def grey_thumbnail(image: Image.Image, max_side: int) -> np.ndarray:
    """Grey levels (float, 0..255) of the image downscaled so its longest side is <= max_side."""
    w, h = image.size
    scale = max(w, h) / float(max_side)
    if scale > 1.0:
        # nearest-neighbour subsampling: a filtered downscale of a 4K frame costs ~10 ms of memory
        # bandwidth (and GIL time a tier's worker thread then waits for); this costs ~0.05 ms,
        # keeps luminance and contrast, and keeps edges sharp, so blur is judged at source scale
        image = image.resize((max(1, round(w / scale)), max(1, round(h / scale))), Image.NEAREST)
    return np.asarray(image.convert("L"), dtype=np.float32)


def image_stats(image: Image.Image, max_side: int = 256) -> ImageStats:
    g = grey_thumbnail(image, max_side)
    lum = float(g.mean()) / 255.0
    con = float(g.std()) / 255.0
    if g.shape[0] >= 3 and g.shape[1] >= 3:
        lap = (g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1])
        sharp = float(lap.var())
    else:
        sharp = 0.0
    return ImageStats(lum, con, sharp)


def estimate_conditions(image: Image.Image, cfg: ConditionsConfig = ConditionsConfig()) -> dict[str, Any]:
    """Flags (`day`, `night`, `low_contrast`, `blur`) and the statistics behind them."""
    s = image_stats(image, cfg.max_side)
    night = s.luminance < cfg.night_luminance
    return {"day": not night, "night": night,
            "low_contrast": s.contrast < cfg.low_contrast_rms,
            "blur": s.sharpness < cfg.blur_laplacian_var,
            "luminance": round(s.luminance, 4), "contrast": round(s.contrast, 4),
            "sharpness": round(s.sharpness, 2)}


def active_conditions(conditions: dict[str, Any]) -> list[str]:
    """The condition names whose flag is set, in a fixed order."""
    return [c for c in CONDITIONS if conditions.get(c) is True]
