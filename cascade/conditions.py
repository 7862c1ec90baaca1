"""Cheap image-condition estimates: day/night, low contrast, blur, rain, fog, glare, motion blur.

Why: tiers are less sure at night, in rain or fog, into the sun or from a shaking camera, so the
router can ask for a wider margin before it stops early (`router.condition_margins`) and
`natix-miner calibrate` can fit a condition's own threshold map and consensus weights, which the
engine then applies to images in that condition (`cascade.calibration`).

Everything is computed once per image, weight-free, with numpy on two small work copies:
- a thumbnail (nearest-neighbour subsampled to `max_side`, default 256 px; black letterbox
  padding trimmed, black rotation corners masked) for the global statistics;
- `crops` native-resolution crops of `crop_side` px (default 4 x 96 px) from the middle band of
  the content, for the fine-scale cues that a downscale would erase (thin streaks, blur direction).
Cost: about 2-3 ms per frame on this CPU, whatever the input size (`scripts/bench_conditions.py`).

The four scored conditions map a raw statistic linearly between two anchors to [0, 1] (0 at or
below the low anchor, 1 at or above the high one); the flag is `score >= <name>_threshold`
(config, default 0.5). Anchors were set on the dev sets' clean frames and on the training
augmentations (`natix_miner/toolkit/train_augment.py`) applied to them; the figures are in
docs/engine.md.
- fog / haze: the dark-channel prior (He et al., CVPR 2009): in a clear outdoor scene most 8x8
  patches below the sky hold some nearly black pixel in some channel, while haze adds a grey
  veil that lifts that floor. Statistic: the 10th percentile of the patch minima (over colour and
  patch) in the lower two thirds of the thumbnail, 0..1. Anchors 0.08 -> 0.20.
- rain: streaks and wet, dull colours. Streaks are bright ridges at most ~3 px wide that continue
  over 4 rows (near-vertical, slanted at most one pixel per row) in the native crops; their
  density is taken relative to that of horizontal ridges, so ordinary vertical structure
  (poles, window frames) weighs little; wet roads and overcast skies lower saturation. Score: the
  geometric mean of the streak score (ratio 0.5 -> 1.2) and the dullness score (median HSV
  saturation 0.18 -> 0.06), so a grey but streak-free frame is not rain, nor a streaky colourful
  one.
- glare: a compact clipped source (luminance >= 250 in the thumbnail, a roughly round blob) with
  a bloom that is bright and falls off all around it (8 sectors, an inner and an outer ring; the
  two weakest sectors are ignored, since a low sun often borders a bright sky on one side): low
  sun, headlights at night. A blown-out overcast sky is irregular and borders dark foreground,
  so it does not count; a sun inside an already blown-out sky cannot be seen and is not counted
  either. Statistic: the inner ring's luminance (0..1) times the fall-off score (inner minus
  outer ring, 0 -> 25 grey levels), both of the third-weakest sector. Anchors 0.35 -> 0.75. No
  training augmentation synthesises glare; the tests add a sun with a Gaussian bloom.
- motion blur: a blur along one direction. For each of 4 directions, rho = E(lag) / E(2 lag) of
  squared grey differences over the native crops (lags 2 and 3 px, averaged): ~0.5 for sharp
  step edges, ~1 for noise, -> 0.25 along a box blur longer than the lag. Natural anisotropy
  scales both lags alike and cancels; an isotropic blur lowers every direction (that is `blur`).
  Statistic: 1 - min(rho) / max(rho). Anchors 0.18 -> 0.38.
Day/night, low contrast and blur stay simple thresholds on mean luminance, RMS contrast and the
variance of the Laplacian of the grey thumbnail.
"""

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from cascade.config import CONDITION_NAMES, ConditionsConfig

SCORED = ("rain", "fog", "glare", "motion_blur")
CONDITIONS = CONDITION_NAMES  # ("day", "night", "low_contrast", "blur") + SCORED
# Order in which a condition's own calibration is chosen when an image has several
# (see `cascade.calibration.CalibrationSet.decision_for`): the ones that change tiers most first.
PRIORITY = ("night", "fog", "rain", "glare", "motion_blur", "blur", "low_contrast")

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
PAD_LEVEL = 12.0  # a row/column whose brightest value is below this is letterbox padding
DARK_LEVEL = 8.0  # pixels darker than this in every channel count as padding / rotation corners
RIDGE = 10.0  # grey levels a streak must stand above its neighbours 2 px either side
CLIP = 250.0  # luminance of a clipped (blown-out) pixel

# (low anchor, high anchor) of each raw statistic; see the module docstring
FOG_ANCHORS = (0.08, 0.20)
STREAK_ANCHORS = (0.5, 1.2)
DULL_ANCHORS = (0.18, 0.06)  # saturation: high -> not dull, low -> dull
GLARE_ANCHORS = (0.35, 0.75)
GLARE_FALLOFF = 25.0
MOTION_ANCHORS = (0.18, 0.38)


@dataclass(frozen=True)
class ImageStats:
    luminance: float  # mean grey level, 0..1
    contrast: float  # RMS contrast: std of grey levels, 0..1
    sharpness: float  # variance of the 4-neighbour Laplacian, grey levels 0..255


def ramp(x: float, lo: float, hi: float) -> float:
    """0 at `lo`, 1 at `hi`, linear between (either order), clipped; NaN -> 0."""
    if not math.isfinite(x):
        return 0.0
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


@dataclass
class WorkCopy:
    """The two small copies every statistic is computed on."""

    grey: np.ndarray  # thumbnail luminance, float32 HxW, letterbox padding trimmed
    cmax: np.ndarray  # brightest channel per thumbnail pixel, uint8 HxW
    cmin: np.ndarray  # darkest channel per thumbnail pixel, uint8 HxW
    valid: np.ndarray  # bool HxW: not a black rotation corner
    crops: list[np.ndarray]  # native-resolution grey crops, float32


def work_copy(image: Image.Image, max_side: int = 256, crop_side: int = 96, crops: int = 4) -> WorkCopy:
    w, h = image.size
    scale = max(w, h) / float(max_side)
    small = image
    if scale > 1.0:
        # nearest-neighbour subsampling: a filtered downscale of a 4K frame costs ~10 ms of memory
        # bandwidth (and GIL time a tier's worker thread then waits for); this costs ~0.05 ms,
        # keeps luminance and contrast, and keeps edges sharp, so blur is judged at source scale
        small = image.resize((max(1, round(w / scale)), max(1, round(h / scale))), Image.NEAREST)
    small = small.convert("RGB")
    rgb = np.asarray(small)
    # elementwise max/min: numpy's reduction over a last axis of 3 is ~30x slower
    cmax = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    cmin = np.minimum(np.minimum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    rows = np.flatnonzero(cmax.max(axis=1) >= PAD_LEVEL)
    cols = np.flatnonzero(cmax.max(axis=0) >= PAD_LEVEL)
    top, bottom = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, rgb.shape[0])
    left, right = (int(cols[0]), int(cols[-1]) + 1) if cols.size else (0, rgb.shape[1])
    grey = np.asarray(small.convert("L"), dtype=np.float32)[top:bottom, left:right]
    cmax, cmin = cmax[top:bottom, left:right], cmin[top:bottom, left:right]
    valid = cmax >= DARK_LEVEL
    # the content box in source pixels, and native crops from its middle band (rows 35-75 %)
    sx, sy = w / small.size[0], h / small.size[1]
    x0, x1, y0, y1 = left * sx, right * sx, top * sy, bottom * sy
    side = int(max(8, min(crop_side, x1 - x0, y1 - y0)))
    native: list[np.ndarray] = []
    if crops > 0:
        cols_n = max(1, crops // 2)
        rows_n = max(1, crops // cols_n)
        for i in range(rows_n):
            fy = 0.35 + 0.4 * (i + 0.5) / rows_n
            for j in range(cols_n):
                cx = x0 + (j + 0.5) / cols_n * (x1 - x0)
                cy = y0 + fy * (y1 - y0)
                bx = int(np.clip(cx - side / 2, 0, max(0, w - side)))
                by = int(np.clip(cy - side / 2, 0, max(0, h - side)))
                crop = image.crop((bx, by, bx + side, by + side)).convert("L")
                native.append(np.asarray(crop, dtype=np.float32))
    return WorkCopy(grey, cmax, cmin, valid, native)


def image_stats(work: WorkCopy) -> ImageStats:
    g = work.grey
    if g.size == 0:
        return ImageStats(0.0, 0.0, 0.0)
    lum = float(g.mean()) / 255.0
    con = float(g.std()) / 255.0
    if g.shape[0] >= 3 and g.shape[1] >= 3:
        lap = (g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1])
        sharp = float(lap.var())
    else:
        sharp = 0.0
    return ImageStats(lum, con, sharp)


def dark_channel_floor(work: WorkCopy, block: int = 8) -> float:
    """10th percentile of the 8x8-patch minima (over channels) below the top third, 0..1."""
    valid = work.valid
    hh, ww = valid.shape[0] // block * block, valid.shape[1] // block * block
    if hh < 2 * block or ww < block:
        return 0.0
    mn = np.where(valid, work.cmin, np.uint8(255))[:hh, :ww]
    patches = mn.reshape(hh // block, block, ww // block, block).min(axis=(1, 3))
    ok = valid[:hh, :ww].reshape(hh // block, block, ww // block, block).any(axis=(1, 3))
    start = patches.shape[0] // 3
    vals = patches[start:][ok[start:]]
    if vals.size < 4:
        return 0.0
    return float(np.percentile(vals, 10)) / 255.0


def median_saturation(work: WorkCopy) -> float:
    """Median HSV saturation of the lit pixels (brightest channel >= 20), on every other pixel."""
    mx = work.cmax[::2, ::2].astype(np.float32)
    mn = work.cmin[::2, ::2].astype(np.float32)
    lit = mx >= 20.0
    if not lit.any():
        return 0.0
    return float(np.median((mx[lit] - mn[lit]) / mx[lit]))


def streak_ratio(crops: list[np.ndarray]) -> float:
    """Density of thin bright near-vertical ridges that continue over 4 rows, relative to the
    density of thin bright horizontal ridges (floored at 0.02 so flat crops do not divide by ~0)."""
    vert = horiz = total = 0.0
    for g in crops:
        if g.shape[0] < 8 or g.shape[1] < 8:
            continue
        on = (g[:, 2:-2] - 0.5 * (g[:, :-4] + g[:, 4:])) > RIDGE
        nxt = on[1:].copy()
        nxt[:, 1:] |= on[1:, :-1]
        nxt[:, :-1] |= on[1:, 1:]
        link = on[:-1] & nxt
        run = link[:-2] & link[1:-1] & link[2:]
        vert += float(run.sum())
        horiz += float(((g[2:-2] - 0.5 * (g[:-4] + g[4:])) > RIDGE).sum())
        total += g.size
    if total == 0:
        return 0.0
    return (vert / total) / max(horiz / total, 0.02)


def glare_strength(work: WorkCopy, sectors: int = 8) -> float:
    """Bloom around the most glare-like compact clipped blob (see the module docstring), 0..1."""
    L, valid = work.grey, work.valid
    clipped = valid & (L >= CLIP)
    if clipped.sum() < 3:
        return 0.0
    labels, n = ndimage.label(clipped)
    sizes = np.bincount(labels.ravel())[1:]
    best = 0.0
    H, W = L.shape
    for comp in np.argsort(sizes)[::-1][:3]:
        area = int(sizes[comp])
        if area < 3:
            break
        ys, xs = np.nonzero(labels == comp + 1)
        cy, cx = float(ys.mean()), float(xs.mean())
        rmax = float(np.hypot(ys - cy, xs - cx).max()) + 0.5
        if area / (math.pi * rmax * rmax) < 0.3:  # irregular: a blown-out sky, not a source
            continue
        r0 = math.sqrt(area / math.pi)
        r1a, r1b = rmax + 1.0, rmax + 1.0 + max(2.0, r0)
        r2a, r2b = r1b + 1.0, r1b + 1.0 + max(3.0, 1.5 * r0)
        y_lo, y_hi = max(0, int(cy - r2b)), min(H, int(cy + r2b) + 1)
        x_lo, x_hi = max(0, int(cx - r2b)), min(W, int(cx + r2b) + 1)
        yy, xx = np.mgrid[y_lo:y_hi, x_lo:x_hi]
        d = np.hypot(yy - cy, xx - cx)
        sec = ((np.arctan2(yy - cy, xx - cx) + math.pi) / (2 * math.pi) * sectors).astype(int) % sectors
        win, ok = L[y_lo:y_hi, x_lo:x_hi], valid[y_lo:y_hi, x_lo:x_hi]
        inner = (d >= r1a) & (d < r1b) & ok
        outer = (d >= r2a) & (d < r2b) & ok
        bright, fall = [], []
        for s in range(sectors):
            a, b = inner & (sec == s), outer & (sec == s)
            if a.sum() >= 2 and b.sum() >= 2:
                ia, ob = float(win[a].mean()), float(win[b].mean())
                bright.append(ia)
                fall.append(ia - ob)
        if len(bright) < sectors - 2:  # the bloom must be seen all around (frame edges aside)
            continue
        # the third-weakest sector: two directions may run into a bright sky or a white wall
        bright.sort()
        fall.sort()
        best = max(best, bright[2] / 255.0 * ramp(fall[2], 0.0, GLARE_FALLOFF))
    return best


def _sqdiff(g: np.ndarray, dy: int, dx: int) -> float:
    H, W = g.shape
    y0, y1 = max(0, -dy), H - max(0, dy)
    x0, x1 = max(0, -dx), W - max(0, dx)
    if y1 <= y0 or x1 <= x0:
        return 0.0
    a = g[y0:y1, x0:x1]
    b = g[y0 + dy:y1 + dy, x0 + dx:x1 + dx]
    return float(np.mean((a - b) ** 2))


def motion_anisotropy(crops: list[np.ndarray], lags: tuple[int, ...] = (2, 3)) -> float:
    """1 - min(rho) / max(rho) over 4 directions, rho = E(lag) / E(2 lag) averaged over `lags`
    (module docstring). Lags of 2-3 px, not 1: a frame that was resized (validators' crops, the
    camera's own scaler) is soft at 1 px in every direction, which hides a short motion blur."""
    dirs = ((0, 1), (1, 0), (1, 1), (1, -1))
    e = np.zeros((len(lags), 2, len(dirs)))
    for g in crops:
        if min(g.shape) < 4 * max(lags) + 2:
            continue
        for i, lag in enumerate(lags):
            for k, (dy, dx) in enumerate(dirs):
                e[i, 0, k] += _sqdiff(g, lag * dy, lag * dx)
                e[i, 1, k] += _sqdiff(g, 2 * lag * dy, 2 * lag * dx)
    if e[:, 1].min() < 1.0:  # flat (or no) crops: no evidence either way
        return 0.0
    rho = (e[:, 0] / e[:, 1]).mean(axis=0)
    return float(1.0 - rho.min() / rho.max())


def estimate_conditions(image: Image.Image, cfg: ConditionsConfig = ConditionsConfig()) -> dict[str, Any]:
    """Flags (`day`, `night`, `low_contrast`, `blur`, `rain`, `fog`, `glare`, `motion_blur`),
    the scores in [0, 1] behind the last four (`<name>_score`) and the basic statistics."""
    work = work_copy(image, cfg.max_side, cfg.crop_side, cfg.crops)
    s = image_stats(work)
    night = s.luminance < cfg.night_luminance
    sat = median_saturation(work)
    streak = streak_ratio(work.crops)
    scores = {
        "rain": math.sqrt(ramp(streak, *STREAK_ANCHORS) * ramp(sat, *DULL_ANCHORS)),
        "fog": ramp(dark_channel_floor(work), *FOG_ANCHORS),
        "glare": ramp(glare_strength(work), *GLARE_ANCHORS),
        "motion_blur": ramp(motion_anisotropy(work.crops), *MOTION_ANCHORS),
    }
    out: dict[str, Any] = {"day": not night, "night": night,
                           "low_contrast": s.contrast < cfg.low_contrast_rms,
                           "blur": s.sharpness < cfg.blur_laplacian_var}
    for name in SCORED:
        out[name] = scores[name] >= cfg.threshold(name)
    out.update({"luminance": round(s.luminance, 4), "contrast": round(s.contrast, 4),
                "sharpness": round(s.sharpness, 2), "saturation": round(sat, 4)})
    out.update({f"{name}_score": round(scores[name], 4) for name in SCORED})
    return out


def active_conditions(conditions: Optional[dict[str, Any]]) -> list[str]:
    """The condition names whose flag is set, in a fixed order."""
    if not conditions:
        return []
    return [c for c in CONDITIONS if conditions.get(c) is True]
