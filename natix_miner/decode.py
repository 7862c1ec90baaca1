"""Turn a validator's base64 string into one RGB `PIL.Image`, or refuse it cheaply.

Every cap is checked before the expensive step it protects: the base64 length before decoding
base64, the byte count before opening the image, the declared pixel count (read from the file
header) before decoding pixels. A decompression bomb therefore costs a header read, not memory.
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
           "corrupt")


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
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(im, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")
    return im


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
