"""The validator's image pipeline, reproduced from the subnet's published facts (SN72_PROTOCOL.md).

Why this exists: a miner is scored on what validators *send*, not on clean photos. Three eras of
images have been sent (augmented 224, letterboxed 224, raw full resolution); every local
measurement (`validate`, `eval`, `calibrate`, training augmentation) goes through these functions
so that it sees the same distortions, in the same order, with the same strengths.

Facts reproduced (strength 1 / strength 2):
- level 0: RGB, centre square crop on the short side, resize to 224x224;
- level 1: rotation uniform in [-20, 20] degrees (bilinear, black corners, same canvas), then a
  square crop covering 20-100 % of the area at a random place, resized to 224x224;
- level 2: level 1, then saturation, contrast, "JPEG", each at strength 0 or 1;
- level 3: level 1, then saturation, contrast, "JPEG", colour noise, blur, each at 0, 1 or 2;
- saturation: YCbCr chroma scaled by 0.4 / 0.3 around 128; contrast: pixels x 0.85 / 0.725;
  "JPEG": downscale by 2 / 3 and upscale back; noise: Gaussian of variance 0.001 / 0.002 added to
  Y, Cb and Cr on a [0, 1] scale; blur: Gaussian kernel 7 / 9 with sigma = kernel / 6;
- levels drawn with probability 0.25 each; the result is JPEG quality 75 and base64.

Choices where the facts are silent (documented, not guessed silently): YCbCr is the full-range
JFIF transform (what OpenCV's RGB<->YCrCb uses); resizes are PIL bilinear; the blur pads by
reflection without repeating the edge (OpenCV's default border); the random crop draws the area
fraction uniformly and retries up to 10 times when the square does not fit, then falls back to
the centre square (torchvision's RandomResizedCrop with ratio 1).

numpy + PIL only: the miner's core does not depend on torchvision or OpenCV.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

SIZE = 224
LEVEL_PROBS = (0.25, 0.25, 0.25, 0.25)
MAX_ROTATION_DEG = 20.0
CROP_SCALE = (0.2, 1.0)
SATURATION = {1: 0.4, 2: 0.3}
CONTRAST = {1: 0.85, 2: 0.725}
JPEG_RESIZE = {1: 2, 2: 3}
NOISE_VARIANCE = {1: 0.001, 2: 0.002}
BLUR_KERNEL = {1: 7, 2: 9}
JPEG_QUALITY = 75

ERAS = ("augmented", "letterbox", "raw")
ERA_CHOICES = ERAS + ("mixed",)


# ---------------------------------------------------------------------------------------------
# colour space
# ---------------------------------------------------------------------------------------------

# JFIF full-range transform (ITU-R BT.601 luma weights); the inverse is exact, not rounded taps.
_RGB2YCC = np.array([[0.299, 0.587, 0.114],
                     [-0.168736, -0.331264, 0.5],
                     [0.5, -0.418688, -0.081312]])
_YCC2RGB = np.linalg.inv(_RGB2YCC)
_CHROMA_OFFSET = np.array([0.0, 128.0, 128.0])


def rgb_to_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """Full-range (JFIF) RGB -> YCbCr on float arrays in [0, 255]; chroma midpoint is 128."""
    return np.asarray(rgb, dtype=np.float64) @ _RGB2YCC.T + _CHROMA_OFFSET


def ycbcr_to_rgb(ycc: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_ycbcr` (float, not clipped)."""
    return (np.asarray(ycc, dtype=np.float64) - _CHROMA_OFFSET) @ _YCC2RGB.T


def _to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------

def center_square_crop(image: Image.Image) -> Image.Image:
    """The largest centred square (side = the short side)."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def level0(image: Image.Image, size: int = SIZE) -> Image.Image:
    """Level 0: RGB, centre square crop on the short side, resize to size x size."""
    return center_square_crop(image.convert("RGB")).resize((size, size), Image.BILINEAR)


def random_rotation(image: Image.Image, rng: np.random.Generator,
                    max_degrees: float = MAX_ROTATION_DEG) -> tuple[Image.Image, float]:
    """Rotate by an angle uniform in [-max, max] degrees on the same canvas; corners black."""
    angle = float(rng.uniform(-max_degrees, max_degrees))
    out = image.convert("RGB").rotate(angle, resample=Image.BILINEAR, expand=False,
                                      fillcolor=(0, 0, 0))
    return out, angle


def random_square_crop(image: Image.Image, rng: np.random.Generator,
                       scale: tuple[float, float] = CROP_SCALE,
                       size: int = SIZE) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """A square crop whose area is a uniform fraction in `scale` of the image, resized to size.

    Returns the resized crop and its box (left, top, right, bottom) in the input image.
    """
    w, h = image.size
    area = w * h
    for _ in range(10):
        frac = float(rng.uniform(scale[0], scale[1]))
        side = int(round(math.sqrt(frac * area)))
        if 0 < side <= min(w, h):
            left = int(rng.integers(0, w - side + 1))
            top = int(rng.integers(0, h - side + 1))
            break
    else:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    return image.crop(box).resize((size, size), Image.BILINEAR), box


def letterbox(image: Image.Image, size: int = SIZE) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The whole image scaled to fit size x size (aspect kept) and centred on black padding.

    Returns the canvas and the box (left, top, right, bottom) the image occupies in it.
    """
    image = image.convert("RGB")
    w, h = image.size
    s = size / max(w, h)
    nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    left, top = (size - nw) // 2, (size - nh) // 2
    canvas.paste(image.resize((nw, nh), Image.BILINEAR), (left, top))
    return canvas, (left, top, left + nw, top + nh)


# ---------------------------------------------------------------------------------------------
# distortions (strength 0 returns the input unchanged)
# ---------------------------------------------------------------------------------------------

def saturation(image: Image.Image, strength: int) -> Image.Image:
    """Scale the YCbCr chroma channels around 128 by 0.4 (strength 1) or 0.3 (strength 2)."""
    if strength == 0:
        return image
    ycc = rgb_to_ycbcr(_to_array(image))
    ycc[..., 1:] = 128.0 + (ycc[..., 1:] - 128.0) * SATURATION[strength]
    return _to_image(ycbcr_to_rgb(np.clip(ycc, 0, 255)))


def contrast(image: Image.Image, strength: int) -> Image.Image:
    """Multiply pixel values by 0.85 (strength 1) or 0.725 (strength 2)."""
    if strength == 0:
        return image
    return _to_image(_to_array(image) * CONTRAST[strength])


def jpeg_resize(image: Image.Image, strength: int) -> Image.Image:
    """The validator's "JPEG": downscale by 2 (strength 1) or 3 (strength 2) and upscale back."""
    if strength == 0:
        return image
    f = JPEG_RESIZE[strength]
    w, h = image.size
    small = image.resize((max(1, w // f), max(1, h // f)), Image.BILINEAR)
    return small.resize((w, h), Image.BILINEAR)


def gaussian_noise(image: Image.Image, strength: int, rng: np.random.Generator) -> Image.Image:
    """Add Gaussian noise of variance 0.001 / 0.002 to Y, Cb and Cr on a [0, 1] scale."""
    if strength == 0:
        return image
    ycc = rgb_to_ycbcr(_to_array(image)) / 255.0
    ycc = ycc + math.sqrt(NOISE_VARIANCE[strength]) * rng.standard_normal(ycc.shape)
    return _to_image(ycbcr_to_rgb(ycc * 255.0))


def gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps."""
    x = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2.0
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(image: Image.Image, strength: int) -> Image.Image:
    """Separable Gaussian blur, kernel 7 (strength 1) or 9 (strength 2), sigma = kernel / 6."""
    if strength == 0:
        return image
    ksize = BLUR_KERNEL[strength]
    taps = gaussian_kernel(ksize, ksize / 6.0)
    arr = _to_array(image)
    r = ksize // 2
    for axis in (0, 1):
        if arr.shape[axis] <= r:   # too small to reflect: leave this axis alone
            continue
        pad = [(0, 0)] * arr.ndim
        pad[axis] = (r, r)
        padded = np.pad(arr, pad, mode="reflect")
        n = arr.shape[axis]
        out = np.zeros_like(arr)
        for i, t in enumerate(taps):
            out += t * np.take(padded, np.arange(i, i + n), axis=axis)
        arr = out
    return _to_image(arr)


# ---------------------------------------------------------------------------------------------
# levels and eras
# ---------------------------------------------------------------------------------------------

def augment_level_meta(image: Image.Image, level: int,
                       rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """One augmentation level (0-3) with what was drawn (angle, crop box, strengths)."""
    if level not in (0, 1, 2, 3):
        raise ValueError(f"augmentation level must be 0, 1, 2 or 3, got {level!r}")
    image = image.convert("RGB")
    meta: dict[str, Any] = {"level": level}
    if level == 0:
        return level0(image), meta
    rotated, angle = random_rotation(image, rng)
    out, box = random_square_crop(rotated, rng)
    meta.update(angle=angle, crop_box=box,
                crop_fraction=((box[2] - box[0]) * (box[3] - box[1])) / (image.size[0] * image.size[1]))
    if level == 1:
        return out, meta
    top = 1 if level == 2 else 2
    names = ("saturation", "contrast", "jpeg") if level == 2 else \
        ("saturation", "contrast", "jpeg", "noise", "blur")
    strengths = {n: int(rng.integers(0, top + 1)) for n in names}
    out = saturation(out, strengths["saturation"])
    out = contrast(out, strengths["contrast"])
    out = jpeg_resize(out, strengths["jpeg"])
    if level == 3:
        out = gaussian_noise(out, strengths["noise"], rng)
        out = gaussian_blur(out, strengths["blur"])
    meta["strengths"] = strengths
    return out, meta


def augment_level(image: Image.Image, level: int, rng: np.random.Generator) -> Image.Image:
    """One augmentation level (0-3) of the augmented era."""
    return augment_level_meta(image, level, rng)[0]


def draw_level(rng: np.random.Generator) -> int:
    """The augmented era's level: 0, 1, 2 or 3 with probability 0.25 each."""
    return int(rng.choice(4, p=LEVEL_PROBS))


def augment(image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """The augmented era: a level drawn with probability 0.25 each, then that level."""
    return augment_level_meta(image, draw_level(rng), rng)


def apply_era(image: Image.Image, era: str, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """What a validator of `era` does to a source image before encoding it.

    era: augmented | letterbox | raw | mixed (mixed draws one of the three uniformly).
    The returned dict always holds the concrete `era` used.
    """
    if era == "mixed":
        era = ERAS[int(rng.integers(0, len(ERAS)))]
    if era == "augmented":
        out, meta = augment(image, rng)
    elif era == "letterbox":
        out, box = letterbox(image)
        meta = {"box": box}
    elif era == "raw":
        out, meta = image.convert("RGB"), {}
    else:
        raise ValueError(f"era must be one of {', '.join(ERA_CHOICES)}, got {era!r}")
    return out, {"era": era, **meta}


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """JPEG bytes at the validator's quality."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_jpeg_b64(image: Image.Image, quality: int = JPEG_QUALITY) -> str:
    """What goes into `ImageSynapse.image`: base64 of the JPEG bytes."""
    return base64.b64encode(encode_jpeg(image, quality)).decode("ascii")


def jpeg_roundtrip(image: Image.Image, quality: int = JPEG_QUALITY) -> Image.Image:
    """The image as the miner decodes it (offline evaluation skips base64, not the JPEG loss)."""
    with Image.open(io.BytesIO(encode_jpeg(image, quality))) as im:
        return im.convert("RGB")


def validator_view(image: Image.Image, era: str, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """Era pipeline then JPEG q75: exactly the pixels a miner receives."""
    out, meta = apply_era(image, era, rng)
    return jpeg_roundtrip(out), meta


# ---------------------------------------------------------------------------------------------
# challenges
# ---------------------------------------------------------------------------------------------

@dataclass
class Challenge:
    """One validator query: the encoded image, its label and where it came from."""

    label: int
    image_b64: str
    path: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


def split_by_label(samples: Sequence[Any]) -> dict[int, list[Any]]:
    """Samples (anything with `.label`) grouped by label; both labels must be present."""
    pools: dict[int, list[Any]] = {0: [], 1: []}
    for s in samples:
        pools[int(s.label)].append(s)
    missing = [k for k, v in pools.items() if not v]
    if missing:
        raise ValueError(f"the image folder has no images of label {missing[0]}; "
                         f"a validator draws both labels 50/50")
    return pools


def draw_challenge(pools: dict[int, list[Any]], era: str, rng: np.random.Generator,
                   label: Optional[int] = None) -> Challenge:
    """Label 50/50, an image of that label, the era's pipeline, JPEG q75, base64."""
    if label is None:
        label = int(rng.integers(0, 2))
    sample = pools[label][int(rng.integers(0, len(pools[label])))]
    image, meta = apply_era(sample.load(), era, rng)
    return Challenge(label=label, image_b64=encode_jpeg_b64(image), path=str(sample.path),
                     source=getattr(sample, "source", ""), meta=meta)
