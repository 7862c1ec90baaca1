"""The validator image pipeline against the facts of SN72_PROTOCOL.md."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from natix_miner.toolkit import challenge as ch

SIZE = ch.SIZE


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


def _columns(w: int, h: int = SIZE) -> Image.Image:
    """Column x has red value x: which columns a crop kept can be read off its pixels."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(w, dtype=np.uint8)[None, :]
    return Image.fromarray(arr, "RGB")


@pytest.mark.parametrize("margin, left", [(1, 0), (3, 2), (5, 2), (7, 4), (2, 1)])
def test_centre_crop_offset_is_rounded_half_to_even(margin, left):
    # margin / 2 = 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4 (Python's round); floor would give 0, 1, 2, 3
    assert ch.center_square_box(SIZE + margin, SIZE) == (left, 0, left + SIZE, SIZE)
    assert ch.center_square_box(SIZE, SIZE + margin) == (0, left, SIZE, left + SIZE)
    out = np.asarray(ch.level0(_columns(SIZE + margin)))
    assert out[0, 0, 0] == left and out[0, -1, 0] == left + SIZE - 1


def _checkerboard(w: int = 200, h: int = 160, cell: int = 7) -> Image.Image:
    yy, xx = np.indices((h, w))
    board = ((yy // cell + xx // cell) % 2).astype(bool)
    arr = np.where(board[..., None], np.array(_INK, np.uint8), np.array(_PAPER, np.uint8))
    return Image.fromarray(arr.astype(np.uint8), "RGB")


_INK, _PAPER = (200, 30, 60), (20, 180, 220)


def test_rotation_is_nearest_neighbour_and_keeps_only_source_colours():
    img = _checkerboard()
    rng = np.random.default_rng(11)
    for _ in range(5):
        out, angle = ch.random_rotation(img, rng)
        assert out.size == img.size and abs(angle) <= 20
        colours = {tuple(c) for c in np.asarray(out).reshape(-1, 3)}
        assert colours <= {_INK, _PAPER, (0, 0, 0)}, colours - {_INK, _PAPER, (0, 0, 0)}
        assert {_INK, _PAPER} <= colours
        assert ((0, 0, 0) in colours) == (abs(angle) > 1)   # black corners once it turns
    # the whole level-1 path samples the rotation the same way before its resize
    x = ch.rotate_nearest(ch.to_float(img), 13.0)
    assert set(np.unique(ch.truncate_uint8(x))) <= set(_INK) | set(_PAPER) | {0}


def test_rotation_angle_is_counter_clockwise_about_the_centre():
    arr = np.zeros((101, 101, 3), dtype=np.float32)
    arr[50, 90] = 1.0                                  # a dot right of the centre
    out = ch.rotate_nearest(arr, 90.0)
    assert tuple(np.argwhere(out[..., 0] > 0)[0]) == (10, 50)   # now above it
    assert np.array_equal(ch.rotate_nearest(arr, 0.0), arr)


def test_rotation_stays_within_20_degrees_with_black_corners():
    rng = np.random.default_rng(1)
    img = Image.new("RGB", (200, 200), (200, 200, 200))
    small = img.resize((16, 16))
    angles = [ch.random_rotation(small, rng)[1] for _ in range(200)]
    assert max(abs(a) for a in angles) <= 20.0
    assert min(angles) < -15 and max(angles) > 15   # the whole range is used
    out, angle = ch.random_rotation(img, np.random.default_rng(3))
    assert abs(angle) > 5 and out.size == img.size
    assert tuple(np.asarray(out)[0, 0]) == (0, 0, 0)    # corner filled black
    assert tuple(np.asarray(out)[100, 100]) == (200, 200, 200)


def test_level1_stays_float_and_truncates_once_at_the_end():
    img = _image(300, 260)
    for seed in range(3):
        out, meta = ch.augment_level_meta(img, 1, np.random.default_rng(seed))
        l, t, r, b = meta["crop_box"]
        x = ch.resize_float(ch.rotate_nearest(ch.to_float(img), meta["angle"])[t:b, l:r])
        got = np.asarray(out).astype(np.float64)
        assert np.array_equal(got, ch.truncate_uint8(x))
        # truncation, not rounding: about half a grey level darker than the rounded floats
        assert -0.6 < (got - np.rint(x.astype(np.float64) * 255)).mean() < -0.4


def test_crop_area_between_20_and_100_percent_and_square():
    rng = np.random.default_rng(2)
    fracs = []
    for _ in range(300):
        l, t, r, b = ch.random_square_box(300, 260, rng)
        assert r - l == b - t and 0 <= l and 0 <= t and r <= 300 and b <= 260
        fracs.append((r - l) * (b - t) / (300 * 260))
    out, box = ch.random_square_crop(_image(300, 260), rng)
    assert out.size == (224, 224) and box[2] - box[0] == box[3] - box[1]
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


def test_contrast_multiplies_in_float32_and_truncates():
    px = np.array([[[255, 100, 1], [254, 3, 200]]], dtype=np.uint8)
    # 255 x 0.85 = 216.75 -> 216; 100 x 0.725 = 72.5 -> 72; rounding would give 217 and 72 / 73
    assert ch.contrast(px, 1).tolist() == [[[216, 85, 0], [215, 2, 170]]]
    assert ch.contrast(px, 2).tolist() == [[[184, 72, 0], [184, 2, 145]]]
    assert ch.contrast(px, 0) is px
    arr = np.asarray(_image(), dtype=np.float64)
    got = ch.contrast(np.asarray(_image()), 1).astype(np.float64)
    assert np.array_equal(got, np.floor(arr * np.float32(0.85)))


def test_each_distortion_of_the_float_image_truncates_its_input_and_output():
    x = np.full((4, 4, 3), 1.0, dtype=np.float32)              # white
    assert np.array_equal(ch.truncate_uint8(ch._distort(x, ch.contrast, 1)), np.full((4, 4, 3), 216))
    twice = ch._distort(ch._distort(x, ch.contrast, 1), ch.contrast, 1)
    assert np.all(ch.truncate_uint8(twice) == 183)              # 216 x 0.85 = 183.6 -> 183
    assert ch._distort(x, ch.contrast, 0) is x                  # strength 0: no uint8 round trip
    just_below = np.full((1, 1, 3), 200.9 / 255, dtype=np.float32)
    assert ch.truncate_uint8(just_below).tolist() == [[[200, 200, 200]]]


def test_saturation_scales_studio_range_chroma_and_truncates():
    px = np.array([[[255, 0, 0], [0, 0, 255], [90, 90, 90], [255, 255, 255], [200, 120, 40]]],
                  dtype=np.uint8)
    # hand-checked against the validator's arithmetic: chroma x 0.4 / 0.3 about 0.5 in
    # studio-range YCbCr, then truncation (grey 90 -> 89, 90, 89 and white -> 254, 255, 254)
    assert ch.saturation(px, 1).tolist() == [[[147, 45, 45], [17, 17, 119], [89, 90, 89],
                                              [254, 255, 254], [160, 128, 96]]]
    assert ch.saturation(px, 2).tolist() == [[[129, 53, 53], [20, 20, 96], [89, 90, 89],
                                              [254, 255, 254], [154, 130, 106]]]
    assert ch.saturation(px, 0) is px
    ycc = ch.to_studio_ycbcr(np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8))
    # Y of black / white: 16 / 255 and 235 / 255 of the 0-255 scale the validator feeds in
    assert ycc[0, 0, 0] == pytest.approx(16 / 255, abs=1e-6)
    assert ycc[0, 1, 0] == pytest.approx((255 * 219 + 16) / 255, rel=1e-6)
    # OpenCV's 3-decimal inverse coefficients are not an exact inverse: a float round trip is off
    # by up to ~0.06 of a level, which truncation then turns into a whole level
    back = ch.from_studio_ycbcr(ch.to_studio_ycbcr(px))
    assert np.abs(back - px).max() < 0.1


def _stripes(w: int = 222, h: int = 222, period: int = 3, phase: int = 1) -> np.ndarray:
    """Vertical white lines one pixel wide every `period` pixels, black between."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, phase::period] = 255
    return arr


def test_jpeg_distortion_is_a_linear_resize_that_aliases():
    img = np.asarray(_gradient(300, 210))
    for strength in (1, 2):
        out = ch.jpeg_resize(img, strength)
        assert out.shape == img.shape and out.dtype == np.uint8
    # one white line in three, downscaled by 3 without anti-aliasing: every sample lands on a
    # white line, so the image comes back solid white (a smoothing filter gives ~85 grey)
    out = ch.jpeg_resize(_stripes(), 2)
    assert out[8:-8, 8:-8].min() == 255
    pil = Image.fromarray(_stripes()).resize((74, 74), Image.BILINEAR).resize((222, 222), Image.BILINEAR)
    assert 60 < np.asarray(pil)[8:-8, 8:-8].mean() < 110
    # shifted by one pixel the same lines vanish altogether
    assert ch.jpeg_resize(_stripes(phase=0), 2)[8:-8, 8:-8].max() == 0
    # factor 2 averages pixel pairs: a 1-pixel checkerboard turns flat grey
    board = (np.indices((60, 60)).sum(axis=0) % 2 * 255).astype(np.uint8)
    flat = ch.jpeg_resize(np.repeat(board[..., None], 3, axis=2), 1).astype(np.float64)
    assert flat[5:-5, 5:-5].std() < 20
    assert ch.jpeg_resize(img, 0) is img


def test_noise_is_added_in_studio_range_ycbcr():
    grey = np.full((300, 300, 3), 128, dtype=np.uint8)
    out = ch.gaussian_noise(grey, 1, np.random.default_rng(7)).astype(np.float64)
    std = out.reshape(-1, 3).std(axis=0)
    # studio range: R / G / B spread ~16 / 12 / 19; full-range noise would give ~14 / 10 / 16
    assert 15.3 < std[0] < 16.7 and 11.3 < std[1] < 12.6 and 18.0 < std[2] < 19.5
    two = ch.gaussian_noise(grey, 2, np.random.default_rng(7)).astype(np.float64).reshape(-1, 3).std(axis=0)
    assert np.allclose(two / std, np.sqrt(2), rtol=0.05)      # variance 0.002 vs 0.001
    # truncated after clipping: the mean sits half a level under the source
    assert -0.8 < out.mean() - 128 < -0.2
    assert ch.gaussian_noise(grey, 0, np.random.default_rng(7)) is grey


def test_blur_kernel_and_sigma():
    img = np.zeros((41, 41, 3), dtype=np.uint8)
    img[20, 20] = 255
    for strength, k in ((1, 7), (2, 9)):
        arr = ch.gaussian_blur(img, strength)[..., 0].astype(np.float64)
        nz = np.argwhere(arr > 0)
        assert nz[:, 0].max() - nz[:, 0].min() + 1 == k      # the spread is the kernel size
        assert nz[:, 1].max() - nz[:, 1].min() + 1 == k
        assert np.array_equal(arr, arr.T) and np.array_equal(arr, arr[::-1, ::-1])
        x = np.arange(k) - k // 2
        g = np.exp(-0.5 * (x / (k / 6)) ** 2)
        g /= g.sum()
        r = k // 2
        assert np.abs(arr[20 - r:21 + r, 20 - r:21 + r] - 255 * np.outer(g, g)).max() <= 1.0
    flat = np.full((20, 20, 3), 77, dtype=np.uint8)
    assert np.array_equal(ch.gaussian_blur(flat, 2), flat)   # borders reflect: flat stays flat


def test_level2_applies_its_distortions_in_order_on_truncated_floats():
    img = _image(280, 240)
    seen = set()
    for seed in range(12):
        out, meta = ch.augment_level_meta(img, 2, np.random.default_rng(seed))
        s = meta["strengths"]
        seen.add(tuple(s.values()))
        l, t, r, b = meta["crop_box"]
        x = ch.resize_float(ch.rotate_nearest(ch.to_float(img), meta["angle"])[t:b, l:r])
        for name, fn in (("saturation", ch.saturation), ("contrast", ch.contrast), ("jpeg", ch.jpeg_resize)):
            x = ch._distort(x, fn, s[name])
        assert np.array_equal(np.asarray(out), ch.truncate_uint8(x))
    assert len(seen) >= 4


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


def test_caches_of_pipeline_pixels_follow_the_pipeline_version(tmp_path, monkeypatch):
    """eval's cached tier outputs and train's cached features are keyed by PIPELINE_VERSION, so a
    corrected pipeline is never scored (or trained) on pixels of the old one."""
    from types import SimpleNamespace

    from natix_miner.toolkit import training
    from natix_miner.toolkit.dataset import Sample
    from natix_miner.toolkit.evaluation import TierCache

    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    sample = Sample(path=path, label=1, source="s", split="val")
    key = TierCache.key("fp", sample, "augmented", 0)
    calls = []

    def fake_extract(tier, items, **kw):
        calls.append(kw["copies"])
        return np.zeros((len(items), 2)), np.ones(len(items)), np.arange(len(items))

    monkeypatch.setattr(training, "extract", fake_extract)
    tier = SimpleNamespace(name="t", spec=SimpleNamespace(backend="b", checkpoint=None),
                           describe=lambda: {"options": {}})
    items = [training.Item(sample=sample, dataset="d")]
    for _ in range(2):
        training.cached_extract(tier, items, copies=1, seed=0, batch=1, desc="x", cache_dir=tmp_path / "f")
    assert calls == [1]                                       # the second run read the cache
    monkeypatch.setattr(ch, "PIPELINE_VERSION", ch.PIPELINE_VERSION + 1)
    assert TierCache.key("fp", sample, "augmented", 0) != key
    training.cached_extract(tier, items, copies=1, seed=0, batch=1, desc="x", cache_dir=tmp_path / "f")
    assert calls == [1, 1]
