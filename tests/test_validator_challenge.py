"""The validator image pipeline against the facts of SN72_PROTOCOL.md."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from natix_miner.toolkit import challenge as ch


def _image(w: int = 320, h: int = 240, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(30, 226, size=(h, w, 3), dtype=np.uint8), "RGB")


def _gradient(w: int = 300, h: int = 200) -> Image.Image:
    x = np.linspace(0, 255, w)[None, :, None]
    y = np.linspace(0, 255, h)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 128.0)], axis=2)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def test_level0_is_centre_square_crop_resized_to_224():
    img = Image.new("RGB", (400, 200), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 300, 200))  # the centred 200x200 square is white
    out = ch.augment_level(img, 0, np.random.default_rng(0))
    assert out.size == (224, 224)
    arr = np.asarray(out)
    assert arr.min() >= 250          # nothing outside the centre square made it in
    wide = _gradient(300, 200)
    ref = wide.crop((50, 0, 250, 200)).resize((224, 224), Image.BILINEAR)
    assert np.array_equal(np.asarray(ch.level0(wide)), np.asarray(ref))


def test_rotation_stays_within_20_degrees_with_black_corners():
    rng = np.random.default_rng(1)
    img = Image.new("RGB", (200, 200), (200, 200, 200))
    angles = []
    for _ in range(200):
        out, angle = ch.random_rotation(img, rng)
        angles.append(angle)
    assert max(abs(a) for a in angles) <= 20.0
    assert min(angles) < -15 and max(angles) > 15   # the whole range is used
    out, angle = ch.random_rotation(img, np.random.default_rng(3))
    assert abs(angle) > 5 and out.size == img.size
    assert tuple(np.asarray(out)[0, 0]) == (0, 0, 0)    # corner filled black
    assert tuple(np.asarray(out)[100, 100]) == (200, 200, 200)


def test_crop_area_between_20_and_100_percent_and_square():
    rng = np.random.default_rng(2)
    img = _image(300, 260)
    fracs = []
    for _ in range(300):
        out, (l, t, r, b) = ch.random_square_crop(img, rng)
        assert out.size == (224, 224)
        assert r - l == b - t and 0 <= l and 0 <= t and r <= 300 and b <= 260
        fracs.append((r - l) * (b - t) / (300 * 260))
    assert min(fracs) >= 0.2 - 0.01 and max(fracs) <= 1.0
    assert min(fracs) < 0.3 and max(fracs) > 0.8


def test_level1_reports_angle_and_crop_in_range():
    rng = np.random.default_rng(4)
    for _ in range(50):
        out, meta = ch.augment_level_meta(_image(260, 260), 1, rng)
        assert out.size == (224, 224)
        assert abs(meta["angle"]) <= 20 and 0.19 <= meta["crop_fraction"] <= 1.0
        assert "strengths" not in meta


def test_level2_and_level3_strength_ranges():
    rng = np.random.default_rng(5)
    seen2, seen3 = set(), set()
    for _ in range(30):
        _, m2 = ch.augment_level_meta(_image(), 2, rng)
        _, m3 = ch.augment_level_meta(_image(), 3, rng)
        assert set(m2["strengths"]) == {"saturation", "contrast", "jpeg"}
        assert set(m3["strengths"]) == {"saturation", "contrast", "jpeg", "noise", "blur"}
        seen2 |= set(m2["strengths"].values())
        seen3 |= set(m3["strengths"].values())
    assert seen2 == {0, 1} and seen3 == {0, 1, 2}


def test_levels_drawn_with_probability_one_quarter():
    rng = np.random.default_rng(6)
    levels = [ch.draw_level(rng) for _ in range(8000)]
    counts = np.bincount(levels, minlength=4) / len(levels)
    assert np.all(np.abs(counts - 0.25) < 0.02)
    assert {ch.augment(_image(64, 48), rng)[1]["level"] for _ in range(30)} == {0, 1, 2, 3}


def test_contrast_scales_pixel_values():
    img = _image()
    arr = np.asarray(img, dtype=np.float64)
    assert np.abs(np.asarray(ch.contrast(img, 1), dtype=np.float64) - arr * 0.85).max() <= 0.5
    assert np.abs(np.asarray(ch.contrast(img, 2), dtype=np.float64) - arr * 0.725).max() <= 0.5
    assert ch.contrast(img, 0) is img


def test_saturation_scales_chroma_around_128():
    img = _image()
    before = ch.rgb_to_ycbcr(np.asarray(img, dtype=np.float64))
    for strength, factor in ((1, 0.4), (2, 0.3)):
        after = ch.rgb_to_ycbcr(np.asarray(ch.saturation(img, strength), dtype=np.float64))
        expected = 128 + (before[..., 1:] - 128) * factor
        assert np.abs(after[..., 1:] - expected).max() < 2.0    # uint8 rounding only
        assert np.abs(after[..., 0] - before[..., 0]).max() < 2.0  # luma untouched
    grey = Image.new("RGB", (10, 10), (90, 90, 90))
    assert np.array_equal(np.asarray(ch.saturation(grey, 2)), np.asarray(grey))


def test_jpeg_distortion_is_down_and_up_resize():
    img = _gradient(300, 210)
    for strength, f in ((1, 2), (2, 3)):
        out = ch.jpeg_resize(img, strength)
        assert out.size == img.size
        ref = img.resize((300 // f, 210 // f), Image.BILINEAR).resize((300, 210), Image.BILINEAR)
        assert np.array_equal(np.asarray(out), np.asarray(ref))
    # detail finer than the factor is gone: a 1-px checkerboard turns to flat grey
    board = (np.indices((60, 60)).sum(axis=0) % 2 * 255).astype(np.uint8)
    flat = np.asarray(ch.jpeg_resize(Image.fromarray(board).convert("RGB"), 1), dtype=np.float64)
    assert flat[5:-5, 5:-5].std() < 20


def test_noise_variance_in_ycbcr_unit_scale():
    img = Image.new("RGB", (200, 200), (128, 128, 128))
    for strength, var in ((1, 0.001), (2, 0.002)):
        out = ch.gaussian_noise(img, strength, np.random.default_rng(7))
        ycc = ch.rgb_to_ycbcr(np.asarray(out, dtype=np.float64)) / 255.0
        assert abs(ycc[..., 0].var() - var) < var * 0.15


def test_blur_kernel_and_sigma():
    taps = ch.gaussian_kernel(7, 7 / 6)
    assert taps.shape == (7,) and abs(taps.sum() - 1) < 1e-12
    img = Image.new("RGB", (41, 41), (0, 0, 0))
    img.putpixel((20, 20), (255, 255, 255))
    for strength, k in ((1, 7), (2, 9)):
        arr = np.asarray(ch.gaussian_blur(img, strength), dtype=np.float64)[..., 0]
        nz = np.argwhere(arr > 0)
        assert nz[:, 0].max() - nz[:, 0].min() + 1 == k      # the spread is the kernel size
        expected = 255 * np.outer(ch.gaussian_kernel(k, k / 6), ch.gaussian_kernel(k, k / 6))
        r = k // 2
        assert np.abs(arr[20 - r:21 + r, 20 - r:21 + r] - expected).max() <= 0.5


def test_letterbox_keeps_the_whole_image_with_padding_only():
    img = Image.new("RGB", (400, 100), (250, 10, 10))
    out, (l, t, r, b) = ch.letterbox(img)
    assert out.size == (224, 224)
    assert (r - l, b - t) == (224, 56)                      # aspect 4:1 kept
    arr = np.asarray(out)
    assert np.all(arr[t:b, l:r] == arr[t + 1, l + 1])       # the whole image, uncropped
    assert arr[:t].max() == 0 and arr[b:].max() == 0        # black padding
    tall, box = ch.letterbox(Image.new("RGB", (100, 300), (9, 9, 9)))
    assert box[3] - box[1] == 224 and abs((box[2] - box[0]) - 224 / 3) <= 1


def test_eras_and_mixed():
    rng = np.random.default_rng(8)
    img = _image(500, 300)
    raw, meta = ch.apply_era(img, "raw", rng)
    assert raw.size == (500, 300) and meta == {"era": "raw"}
    assert ch.apply_era(img, "letterbox", rng)[0].size == (224, 224)
    assert ch.apply_era(img, "augmented", rng)[1]["level"] in (0, 1, 2, 3)
    eras = {ch.apply_era(img, "mixed", rng)[1]["era"] for _ in range(40)}
    assert eras == {"augmented", "letterbox", "raw"}
    with pytest.raises(ValueError, match="era must be one of"):
        ch.apply_era(img, "sepia", rng)
    with pytest.raises(ValueError):
        ch.augment_level(img, 4, rng)


def test_encode_is_base64_jpeg_quality_75():
    img = _image()
    b64 = ch.encode_jpeg_b64(img)
    data = base64.b64decode(b64)
    assert data[:2] == b"\xff\xd8"
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == img.size and im.format == "JPEG"
    assert len(data) == len(ch.encode_jpeg(img, 75)) != len(ch.encode_jpeg(img, 95))


def test_draw_challenge_labels_are_balanced(tmp_path):
    from natix_miner.toolkit.dataset import load_folder

    for sub, colour in (("roadwork", (255, 140, 0)), ("no_roadwork", (60, 60, 60))):
        (tmp_path / sub).mkdir()
        for i in range(2):
            Image.new("RGB", (80, 60), colour).save(tmp_path / sub / f"{i}.png")
    pools = ch.split_by_label(load_folder(tmp_path))
    rng = np.random.default_rng(9)
    labels = [ch.draw_challenge(pools, "mixed", rng).label for _ in range(200)]
    assert 0.4 < np.mean(labels) < 0.6
    c = ch.draw_challenge(pools, "letterbox", rng, label=1)
    assert c.label == 1 and "/roadwork/" in c.path and c.meta["era"] == "letterbox"
    with pytest.raises(ValueError, match="no images of label 0"):
        ch.split_by_label([s for s in load_folder(tmp_path) if s.label == 1])
