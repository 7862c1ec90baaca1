"""The validator's image pipeline, reproduced from the subnet's published facts (SN72_PROTOCOL.md).

Why this exists: a miner is scored on what validators *send*, not on clean photos. Three eras of
images have been sent (augmented 224, letterboxed 224, raw full resolution); every local
measurement (`validate`, `eval`, `calibrate`, training augmentation) goes through these functions
so that it sees the same distortions, in the same order, with the same strengths and the same
arithmetic.

The augmented era, as the validator computed it (strength 1 / strength 2):
- level 0: RGB, centre square crop on the short side (offsets rounded to the nearest pixel, ties
  to even as Python's `round`), bilinear resize to 224x224 on the 8-bit image;
- level 1: the image as a float tensor in [0, 1]; rotation uniform in [-20, 20] degrees with
  NEAREST-neighbour sampling on the same canvas, corners black; a square crop covering 20-100 %
  of the area (10 tries, then the centre square), resized to 224x224 bilinearly on the floats
  with anti-aliasing when shrinking; no flips;
- level 2: level 1, then saturation, contrast, "JPEG", each at strength 0 or 1;
- level 3: level 1, then saturation, contrast, "JPEG", colour noise, blur, each at 0, 1 or 2.
  Each distortion that is on takes the float image TRUNCATED to uint8, works on it (in OpenCV's
  BGR order) and hands back uint8 / 255; the final float image is truncated to uint8 again;
- saturation: chroma of studio-range YCbCr (Y scaled into 16-235, Cb/Cr into 16-240, over 255)
  scaled by 0.4 / 0.3 around 0.5; contrast: pixels x 0.85 / 0.725;
- "JPEG": OpenCV's default (linear, no anti-aliasing) resize down by 2 / 3 and back up;
- colour noise: Gaussian of variance 0.001 / 0.002 added to that studio-range YCbCr (about 14 %
  stronger in RGB than full-range noise); blur: OpenCV Gaussian, kernel 7 / 9, sigma kernel / 6;
- levels drawn with probability 0.25 each; the result is JPEG quality 75 and base64.

The libraries are the ones the validator's pipeline runs on, so rounding and resampling match:
PIL for level 0, torch for the rotation grid and the float resize (what torchvision's tensor
functions call; torchvision itself has no usable CPU build here), OpenCV for the colour
conversions, the "JPEG" resize and the blur. This module is toolkit-only: the serving path never
imports it, nor OpenCV.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

SIZE = 224
LEVEL_PROBS = (0.25, 0.25, 0.25, 0.25)
MAX_ROTATION_DEG = 20.0
CROP_SCALE = (0.2, 1.0)
CROP_TRIES = 10
SATURATION = {1: 0.4, 2: 0.3}
CONTRAST = {1: 0.85, 2: 0.725}
JPEG_RESIZE = {1: 2, 2: 3}
NOISE_VARIANCE = {1: 0.001, 2: 0.002}
BLUR_KERNEL = {1: 7, 2: 9}
JPEG_QUALITY = 75
# Studio range: Y in 16-235, Cb/Cr in 16-240 (out of 255).
_STUDIO_LOW, _STUDIO_Y_HIGH, _STUDIO_C_HIGH = 16, 235, 240

# Bumped whenever the pixels made for a given (image, era, random stream) change, so that what
# was computed on the old pixels (eval's cached tier outputs, train's cached features) is not
# reused. 2: the validator's arithmetic (nearest rotation, float resize, truncation, OpenCV).
PIPELINE_VERSION = 2

ERAS = ("augmented", "letterbox", "raw")
ERA_CHOICES = ERAS + ("mixed",)


# ---------------------------------------------------------------------------------------------
# 8-bit <-> float, as the validator converts (ToTensor / ToPILImage / `(x * 255).astype(uint8)`)
# ---------------------------------------------------------------------------------------------

def to_float(image: Image.Image | np.ndarray) -> np.ndarray:
    """HxWx3 float32 RGB in [0, 1]: uint8 / 255 in float32."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    return arr.astype(np.float32) / np.float32(255)


def truncate_uint8(x: np.ndarray) -> np.ndarray:
    """Float in [0, 1] back to uint8 by x * 255 TRUNCATED, not rounded (why distorted images
    come out about half a grey level darker than the source)."""
    return (np.asarray(x, dtype=np.float32) * np.float32(255)).astype(np.uint8)


def _from_float(x: np.ndarray) -> Image.Image:
    return Image.fromarray(truncate_uint8(x), "RGB")


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------

def center_square_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square, offsets rounded to the nearest pixel with ties to even (what
    Python's `round` does: a 3-pixel margin puts 2 on the left, a 1-pixel margin 0)."""
    side = min(width, height)
    left, top = int(round((width - side) / 2.0)), int(round((height - side) / 2.0))
    return left, top, left + side, top + side


def center_square_crop(image: Image.Image) -> Image.Image:
    """The largest centred square (side = the short side)."""
    return image.crop(center_square_box(*image.size))


def level0(image: Image.Image, size: int = SIZE) -> Image.Image:
    """Level 0: RGB, centre square crop on the short side, PIL bilinear resize to size x size."""
    crop = center_square_crop(image.convert("RGB"))
    return crop if crop.size == (size, size) else crop.resize((size, size), Image.BILINEAR)


def _chw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, dtype=np.float32).transpose(2, 0, 1)))


def _hwc(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy().transpose(1, 2, 0))


def rotate_nearest(x: np.ndarray, angle: float) -> np.ndarray:
    """Rotate a float HxWx3 image by `angle` degrees (counter-clockwise) about its centre on the
    same canvas, nearest-neighbour, zeros outside: every output pixel is an input pixel or black.

    The sampling grid is built as torchvision's tensor `rotate` builds it (pixel centres at
    -w/2 + 0.5 ... w/2 - 0.5, the inverse rotation applied, then normalised by w/2 and h/2 for
    `grid_sample` without corner alignment), so the same pixels are picked."""
    h, w = x.shape[:2]
    rot = math.radians(-angle)
    c, s = math.cos(rot), math.sin(rot)
    theta = torch.tensor([c, s, 0.0, -s, c, 0.0], dtype=torch.float32).reshape(1, 2, 3)
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, steps=w).expand(h, w)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, steps=h)[:, None].expand(h, w)
    base = torch.stack([xs, ys, torch.ones(h, w)], dim=-1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32)
    grid = base.view(1, h * w, 3).bmm(scaled).view(1, h, w, 2)
    out = torch.nn.functional.grid_sample(_chw(x)[None], grid, mode="nearest", padding_mode="zeros",
                                          align_corners=False)
    return _hwc(out[0])


def random_rotation(image: Image.Image, rng: np.random.Generator,
                    max_degrees: float = MAX_ROTATION_DEG) -> tuple[Image.Image, float]:
    """An 8-bit image rotated by an angle uniform in [-max, max] degrees (`rotate_nearest`)."""
    angle = float(rng.uniform(-max_degrees, max_degrees))
    return _from_float(rotate_nearest(to_float(image), angle)), angle


def random_square_box(width: int, height: int, rng: np.random.Generator,
                      scale: tuple[float, float] = CROP_SCALE) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a square whose area is a uniform fraction in `scale` of the
    image at a uniform place; after CROP_TRIES squares that do not fit, the centre square
    (offsets floored). torchvision's RandomResizedCrop with ratio (1, 1)."""
    area = width * height
    for _ in range(CROP_TRIES):
        side = int(round(math.sqrt(area * float(rng.uniform(scale[0], scale[1])))))
        if 0 < side <= min(width, height):
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            return left, top, left + side, top + side
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def resize_float(x: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Bilinear resize of a float image to size x size without corner alignment, anti-aliased
    when shrinking (torch `interpolate`, what torchvision's tensor resize calls); a no-op at size."""
    if x.shape[:2] == (size, size):
        return x
    out = torch.nn.functional.interpolate(_chw(x)[None], size=[size, size], mode="bilinear",
                                          align_corners=False, antialias=True)
    return _hwc(out[0])


def random_square_crop(image: Image.Image, rng: np.random.Generator,
                       scale: tuple[float, float] = CROP_SCALE,
                       size: int = SIZE) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """An 8-bit image's random square crop (`random_square_box`) resized to size (`resize_float`)."""
    box = random_square_box(*image.size, rng, scale)
    x = to_float(image)[box[1]:box[3], box[0]:box[2]]
    return _from_float(resize_float(x, size)), box


def letterbox(image: Image.Image, size: int = SIZE) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The whole image scaled to fit size x size (aspect kept) and centred on black padding.

    Returns the canvas and the box (left, top, right, bottom) the image occupies in it. This era
    is known from release notes only, not code: PIL bilinear and floored offsets are our choice.
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
# distortions: uint8 HxWx3 RGB in, uint8 RGB out (strength 0 returns the input unchanged)
# ---------------------------------------------------------------------------------------------

def _bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(rgb)[..., ::-1])


_rgb = _bgr   # the same channel swap


def to_studio_ycbcr(rgb: np.ndarray) -> np.ndarray:
    """float32 (Y, Cb, Cr) of 8-bit RGB the way the validator computes it: OpenCV's float
    RGB->YCrCb on 0-255 values (chroma offset 0.5, OpenCV's float convention), then
    Y -> (Y * 219 + 16) / 255 and Cb, Cr -> (C * 224 + 16) / 255."""
    ycrcb = cv2.cvtColor(_bgr(rgb).astype(np.float32), cv2.COLOR_BGR2YCrCb)
    ycc = ycrcb[..., (0, 2, 1)].astype(np.float32)
    ycc[..., 0] = (ycc[..., 0] * (_STUDIO_Y_HIGH - _STUDIO_LOW) + _STUDIO_LOW) / 255.0
    ycc[..., 1:] = (ycc[..., 1:] * (_STUDIO_C_HIGH - _STUDIO_LOW) + _STUDIO_LOW) / 255.0
    return ycc


def from_studio_ycbcr(ycc: np.ndarray) -> np.ndarray:
    """Inverse of `to_studio_ycbcr`: float32 RGB on a 0-255 scale, neither clipped nor rounded."""
    ycc = np.array(ycc, dtype=np.float32)
    ycc[..., 0] = (ycc[..., 0] * 255.0 - _STUDIO_LOW) / (_STUDIO_Y_HIGH - _STUDIO_LOW)
    ycc[..., 1:] = (ycc[..., 1:] * 255.0 - _STUDIO_LOW) / (_STUDIO_C_HIGH - _STUDIO_LOW)
    bgr = cv2.cvtColor(np.ascontiguousarray(ycc[..., (0, 2, 1)]).astype(np.float32), cv2.COLOR_YCrCb2BGR)
    return _rgb(bgr)


def saturation(rgb: np.ndarray, strength: int) -> np.ndarray:
    """Studio-range chroma scaled around 0.5 by 0.4 (strength 1) or 0.3 (strength 2), truncated."""
    if strength == 0:
        return rgb
    ycc = to_studio_ycbcr(rgb)
    ycc[..., 1:] = 0.5 + (ycc[..., 1:] - 0.5) * SATURATION[strength]
    return from_studio_ycbcr(ycc).astype(np.uint8)


def contrast(rgb: np.ndarray, strength: int) -> np.ndarray:
    """Pixels x 0.85 (strength 1) or x 0.725 (strength 2) in float32, truncated: 255 -> 216 / 184."""
    if strength == 0:
        return rgb
    return (np.asarray(rgb).astype(np.float32) * CONTRAST[strength]).astype(np.uint8)


def jpeg_resize(rgb: np.ndarray, strength: int) -> np.ndarray:
    """The validator's "JPEG": OpenCV's default linear resize down to (w // f, h // f), f = 2 / 3,
    and back up to (w, h). Linear without anti-aliasing: shrinking samples 2x2 neighbourhoods
    only, so detail finer than the factor aliases instead of averaging out."""
    if strength == 0:
        return rgb
    f = JPEG_RESIZE[strength]
    h, w = rgb.shape[:2]
    small = cv2.resize(_bgr(rgb), (w // f, h // f))
    return _rgb(cv2.resize(small, (w, h)))


def gaussian_noise(rgb: np.ndarray, strength: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of variance 0.001 / 0.002 added to studio-range Y, Cb, Cr (all three, each
    pixel), back to RGB, clipped to 0-255 and truncated. On flat grey the RGB spread per channel is
    about 16 / 12 / 19 grey levels (R / G / B) at strength 1."""
    if strength == 0:
        return rgb
    ycc = to_studio_ycbcr(rgb) / 255
    noisy = (ycc + math.sqrt(NOISE_VARIANCE[strength]) * rng.standard_normal(ycc.shape)) * 255
    return np.clip(from_studio_ycbcr(noisy), 0, 255).astype(np.uint8)


def gaussian_blur(rgb: np.ndarray, strength: int) -> np.ndarray:
    """OpenCV Gaussian blur, kernel 7 (strength 1) or 9 (strength 2), sigma = kernel / 6, OpenCV's
    default border (reflected without repeating the edge pixel)."""
    if strength == 0:
        return rgb
    k = BLUR_KERNEL[strength]
    return _rgb(cv2.GaussianBlur(_bgr(rgb), (k, k), k / 6))


def _distort(x: np.ndarray, fn: Any, strength: int, *args: Any) -> np.ndarray:
    """One distortion on the float image: truncate to uint8, distort, back to float / 255."""
    if strength == 0:
        return x
    return to_float(fn(truncate_uint8(x), strength, *args))


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
    angle = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    x = rotate_nearest(to_float(image), angle)
    box = random_square_box(image.size[0], image.size[1], rng)
    x = resize_float(x[box[1]:box[3], box[0]:box[2]])
    meta.update(angle=angle, crop_box=box,
                crop_fraction=((box[2] - box[0]) * (box[3] - box[1])) / (image.size[0] * image.size[1]))
    if level >= 2:
        top = 1 if level == 2 else 2
        names = ("saturation", "contrast", "jpeg") if level == 2 else \
            ("saturation", "contrast", "jpeg", "noise", "blur")
        strengths = {n: int(rng.integers(0, top + 1)) for n in names}
        x = _distort(x, saturation, strengths["saturation"])
        x = _distort(x, contrast, strengths["contrast"])
        x = _distort(x, jpeg_resize, strengths["jpeg"])
        if level == 3:
            x = _distort(x, gaussian_noise, strengths["noise"], rng)
            x = _distort(x, gaussian_blur, strengths["blur"])
        meta["strengths"] = strengths
    return _from_float(x), meta


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
