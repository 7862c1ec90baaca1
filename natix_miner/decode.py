"""Turn a validator's base64 string into one RGB `PIL.Image`, or refuse it cheaply.

Every cap is checked before the expensive step it protects: the base64 length before decoding
base64, the byte count before opening the image, the declared pixel count (read from the file
header) before decoding pixels. A decompression bomb therefore costs a header read, not memory.

A JPEG is decoded only as large as the tiers need: when its long side is at least twice
`max_side`, libjpeg's DCT scaling (Pillow's `draft`) decodes it at 1/2, 1/4 or 1/8 scale, the
smallest whose long side is still >= `max_side`, for a fraction of the time and memory. Then the
memory a decode would take (decoded pixels x bytes per pixel, from the header) is checked
against `max_decoded_mib` before any pixel is decoded. High bit depths stay in integer (16-bit)
or float32 arithmetic; nothing is widened to float64. The decode's time budget is enforced by
the neuron, which runs decode in a thread and stops waiting for it.

Anything wrong raises `DecodeError` with a short `reason` that the neuron counts and logs; the
neuron answers such a request with its fallback probability, so bad input never crashes the
process and never earns an invalid (-1) answer.
"""

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from natix_miner.settings import DecodeSettings

# Reasons a request image is refused (stable strings: they label counters and log lines).
REASONS = ("empty", "too_long", "bad_base64", "too_big", "unknown_format", "too_many_pixels",
           "corrupt", "timeout")

# Bytes per pixel Pillow holds for each mode (the decode buffer before conversion to RGB).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3,
               "HSV": 3, "RGBA": 4, "RGBa": 4, "RGBX": 4, "CMYK": 4, "I": 4, "F": 4}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class DecodeError(ValueError):
    """The request's image cannot be used; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def b64_to_bytes(data: str, caps: DecodeSettings) -> bytes:
    """Base64 (optionally a `data:` URL) to bytes, within the configured caps."""
    if not isinstance(data, str) or not data.strip():
        raise DecodeError("empty", "no image in the request")
    if len(data) > caps.max_base64_chars:
        raise DecodeError("too_long", f"{len(data)} base64 chars > cap {caps.max_base64_chars}")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise DecodeError("bad_base64", str(exc)) from None
    if not raw:
        raise DecodeError("bad_base64", "base64 decoded to nothing")
    if len(raw) > caps.max_bytes:
        raise DecodeError("too_big", f"{len(raw)} bytes > cap {caps.max_bytes}")
    return raw


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled (not clipped), alpha flattened onto white."""
    mode = im.mode
    if mode.startswith("I;16"):
        arr = np.array(im)  # uint16, either byte order: the top byte is the 8-bit value
        arr >>= 8
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "I":
        arr = np.array(im)  # int32
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 0xFFFF:  # a 16-bit image held as int32 (PNG, TIFF)
            arr >>= 8
            return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
        span = max(hi - lo, 1)
        scaled = (arr.astype(np.int64) - lo) * 255 // span
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) * np.float32(255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")
    return im


def _scale_down(im: Image.Image, max_side: int) -> None:
    """JPEG only: ask libjpeg for the smallest DCT scale whose long side stays >= max_side."""
    width, height = im.size
    if not max_side or im.format != "JPEG" or max(width, height) < 2 * max_side:
        return
    scale = max_side / max(width, height)
    try:
        im.draft(None, (max(1, int(width * scale + 0.999)), max(1, int(height * scale + 0.999))))
    except Exception:  # noqa: BLE001 - a header draft cannot handle decodes at full size
        pass


def decode_bytes(im: Image.Image) -> int:
    """Bytes the decode of `im` (at its current, possibly drafted, size) and its RGB copy hold."""
    width, height = im.size
    per_pixel = _MODE_BYTES.get(im.mode, 2 if im.mode.startswith("I;16") else 4)
    extra = 8 if im.mode in _ALPHA_MODES or "transparency" in im.info else 0  # RGBA composite
    return width * height * (per_pixel + 3 + extra)


def bytes_to_image(raw: bytes, caps: DecodeSettings) -> Image.Image:
    """Decode image bytes to RGB with EXIF orientation applied, checking the pixel cap first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw), formats=list(caps.formats))
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_many_pixels", str(exc)) from None
    except Image.UnidentifiedImageError:
        raise DecodeError("unknown_format",
                          f"not one of {', '.join(caps.formats)} (first bytes {raw[:8]!r})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for hostile headers
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None
    width, height = im.size
    if width < 1 or height < 1:
        raise DecodeError("corrupt", f"declared size {width}x{height}")
    if width * height > caps.max_pixels:
        raise DecodeError("too_many_pixels",
                          f"{width}x{height} = {width * height} pixels > cap {caps.max_pixels}")
    _scale_down(im, caps.max_side)
    need = decode_bytes(im)
    if need > caps.max_decoded_mib * 2**20:
        raise DecodeError("too_many_pixels",
                          f"decoding {im.size[0]}x{im.size[1]} {im.mode} needs {need / 2**20:.0f} MiB "
                          f"> budget {caps.max_decoded_mib} MiB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001 - a broken EXIF block must not cost the image
                pass
            return _to_rgb(im)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data: OSError, ValueError, SyntaxError...
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None


def decode_image(data: str, caps: DecodeSettings) -> Image.Image:
    """A validator's base64 image to an RGB `PIL.Image`, or `DecodeError`."""
    return bytes_to_image(b64_to_bytes(data, caps), caps)
