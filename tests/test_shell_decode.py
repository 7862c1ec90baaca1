"""Safe decode: every format and mode validators or attackers send, and every cap."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from natix_miner.decode import DecodeError, b64_to_bytes, bytes_to_image, decode_image
from natix_miner.settings import DecodeSettings

CAPS = DecodeSettings()


def encode(im: Image.Image, fmt: str, **kw) -> str:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return base64.b64encode(buf.getvalue()).decode()


def test_jpeg_roundtrip_is_rgb():
    im = Image.new("RGB", (64, 48), (200, 30, 10))
    out = decode_image(encode(im, "JPEG", quality=75), CAPS)
    assert out.mode == "RGB" and out.size == (64, 48)
    r, g, b = out.getpixel((32, 24))
    assert r > 150 and g < 80 and b < 80


def test_cmyk_jpeg_to_rgb():
    im = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(im, "JPEG"), CAPS)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((16, 16))
    assert r > 180 and g < 90 and b < 90


def test_16bit_grayscale_png_is_scaled_not_clipped():
    arr = np.full((20, 30), 32768, dtype=np.uint16)  # mid-grey in 16-bit
    im = Image.fromarray(arr)
    out = decode_image(encode(im, "PNG"), CAPS)
    assert out.mode == "RGB" and out.size == (30, 20)
    value = out.getpixel((5, 5))[0]
    assert 120 <= value <= 135, value  # 32768/257 = 127.5, not 255 (clipped)


def test_alpha_is_flattened_onto_white():
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent
    out = decode_image(encode(im, "PNG"), CAPS)
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (255, 255, 255)


def test_grayscale_and_palette_to_rgb():
    out = decode_image(encode(Image.new("L", (8, 8), 100), "PNG"), CAPS)
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (100, 100, 100)
    pal = Image.new("RGB", (8, 8), (10, 200, 10)).convert("P")
    assert decode_image(encode(pal, "PNG"), CAPS).mode == "RGB"


def test_webp_decodes():
    im = Image.new("RGB", (40, 20), (10, 10, 220))
    out = decode_image(encode(im, "WEBP", quality=90), CAPS)
    assert out.size == (40, 20) and out.getpixel((20, 10))[2] > 150


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (60, 20), (0, 200, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(im, "JPEG", exif=exif.tobytes()), CAPS)
    assert out.size == (20, 60)


def test_data_url_prefix_is_accepted():
    data = "data:image/jpeg;base64," + encode(Image.new("RGB", (8, 8)), "JPEG")
    assert decode_image(data, CAPS).size == (8, 8)


@pytest.mark.parametrize("data,reason", [
    ("", "empty"),
    ("   ", "empty"),
    ("!!!!", "bad_base64"),
    (base64.b64encode(b"definitely not an image").decode(), "unknown_format"),
])
def test_garbage_is_refused_with_reason(data, reason):
    with pytest.raises(DecodeError) as info:
        decode_image(data, CAPS)
    assert info.value.reason == reason


def test_truncated_jpeg_is_refused():
    full = base64.b64decode(encode(Image.effect_noise((256, 256), 60).convert("RGB"), "JPEG"))
    with pytest.raises(DecodeError) as info:
        bytes_to_image(full[: len(full) // 2], CAPS)
    assert info.value.reason == "corrupt"


def test_gif_refused_when_not_in_formats():
    with pytest.raises(DecodeError) as info:
        decode_image(encode(Image.new("RGB", (8, 8)), "GIF"), CAPS)
    assert info.value.reason == "unknown_format"


def test_length_and_byte_caps():
    caps = DecodeSettings(max_base64_chars=100, max_bytes=50)
    with pytest.raises(DecodeError) as info:
        b64_to_bytes("A" * 101, caps)
    assert info.value.reason == "too_long"
    with pytest.raises(DecodeError) as info:
        b64_to_bytes(base64.b64encode(b"x" * 60).decode(), caps)
    assert info.value.reason == "too_big"


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries a few bytes of (broken) pixel data."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_bomb_rejected_by_pixel_cap_before_decode():
    # 8000 x 8000 = 64 MP: above our 40 MP cap, below Pillow's own bomb error; full decode would
    # need 64 MB and fail on the short data, so the reason proves the header check came first.
    with pytest.raises(DecodeError) as info:
        bytes_to_image(_png_bomb(8000, 8000), CAPS)
    assert info.value.reason == "too_many_pixels"
    # Beyond Pillow's own limit it is refused the same way.
    with pytest.raises(DecodeError) as info:
        bytes_to_image(_png_bomb(60000, 60000), CAPS)
    assert info.value.reason == "too_many_pixels"


def test_small_pixel_cap_applies_to_real_images():
    caps = DecodeSettings(max_pixels=100)
    with pytest.raises(DecodeError) as info:
        decode_image(encode(Image.new("RGB", (11, 10)), "PNG"), caps)
    assert info.value.reason == "too_many_pixels"


# ----- decode only as large as the tiers need, inside a memory budget (issue 11 item 5) --------

def _jpeg_bytes(size, quality=30) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 150)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_a_huge_jpeg_is_decoded_at_a_dct_scale_not_full_size():
    raw = _jpeg_bytes((6000, 6600))  # the declared-size attack: tiny file, 40 MP of pixels
    out = bytes_to_image(raw, DecodeSettings(max_side=2048))
    assert out.size == (3000, 3300) and out.mode == "RGB"  # 1/2: the smallest scale >= 2048
    assert bytes_to_image(raw, DecodeSettings(max_side=1024)).size == (1500, 1650)  # 1/4
    assert bytes_to_image(raw, DecodeSettings(max_side=0, max_decoded_mib=1024)).size == (6000, 6600)


def test_an_image_smaller_than_twice_max_side_keeps_its_size():
    assert bytes_to_image(_jpeg_bytes((1360, 800)), DecodeSettings(max_side=1024)).size == (1360, 800)


def test_decode_memory_budget_is_checked_before_decoding():
    buf = io.BytesIO()
    Image.new("RGBA", (3000, 3000), (0, 0, 0, 0)).save(buf, format="PNG")  # PNG: no DCT scaling
    with pytest.raises(DecodeError) as info:
        bytes_to_image(buf.getvalue(), DecodeSettings(max_decoded_mib=64))
    assert info.value.reason == "too_many_pixels" and "MiB" in info.value.detail
    # The same pixel count as a JPEG fits: it is decoded at a quarter of the pixels.
    assert bytes_to_image(_jpeg_bytes((6000, 6000)), DecodeSettings(max_side=2048,
                                                                   max_decoded_mib=64)).size == (3000, 3000)


def test_16bit_images_stay_in_integer_arithmetic():
    import tracemalloc

    arr = np.full((1500, 2000), 32768, dtype=np.uint16)
    arr[0, :3] = (65535, 255, 256)
    raw = base64.b64decode(encode(Image.fromarray(arr), "PNG"))
    tracemalloc.start()
    try:
        out = bytes_to_image(raw, CAPS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A float64 copy of 3 MP is 24 MB; the integer path holds the 6 MB uint16 view and a uint8.
    assert peak < 12 * 2**20, peak
    assert out.getpixel((0, 0))[0] == 255 and out.getpixel((1, 0))[0] == 0
    assert out.getpixel((2, 0))[0] == 1 and out.getpixel((5, 5))[0] == 128
