"""Image conditions from cheap statistics, and the router that uses them."""

import numpy as np
from PIL import Image, ImageFilter

from cascade.conditions import estimate_conditions
from cascade.config import RouterConfig
from cascade.router import Router


def textured(seed=0, brightness=1.0, size=(320, 240)):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3)).astype(np.float32)
    img = Image.fromarray(base.astype(np.uint8)).resize(size, Image.NEAREST)  # sharp-edged blocks
    arr = np.asarray(img, dtype=np.float32) * brightness
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def test_day_image_is_day_sharp_contrasty():
    c = estimate_conditions(textured())
    assert c["day"] and not c["night"] and not c["blur"] and not c["low_contrast"]


def test_dark_image_is_night():
    c = estimate_conditions(textured(brightness=0.2))
    assert c["night"] and not c["day"]


def test_blurred_image_is_blur():
    c = estimate_conditions(textured().filter(ImageFilter.GaussianBlur(4)))
    assert c["blur"]


def test_flat_image_is_low_contrast():
    arr = 120 + 0.03 * (np.asarray(textured(), dtype=np.float32) - 128)
    c = estimate_conditions(Image.fromarray(arr.astype(np.uint8)))
    assert c["low_contrast"]


def test_router_margins_per_condition_and_budget():
    r = Router(RouterConfig(threshold=0.5, margin=0.3, condition_margins={"night": 0.45}, min_tiers=1))
    assert r.should_stop(0.85, 1, {"day": True}).stop
    assert not r.should_stop(0.85, 1, {"night": True}).stop  # night: wider margin
    assert r.should_stop(0.98, 1, {"night": True}).stop
    assert not r.should_stop(0.6, 1, {}).stop
    assert r.fits(100, 150) and not r.fits(200, 150)
    r2 = Router(RouterConfig(min_tiers=2))
    assert not r2.should_stop(0.99, 1).stop and r2.should_stop(0.99, 2).stop


def test_router_uses_calibrated_threshold():
    r = Router(RouterConfig(threshold=0.5, margin=0.2), threshold=0.7)
    assert r.should_stop(0.45, 1).stop and not r.should_stop(0.6, 1).stop


# ---------------------------------------------------------------- rain, fog, glare, motion blur

import pytest  # noqa: E402

from cascade.conditions import SCORED  # noqa: E402
from cascade.config import ConditionsConfig  # noqa: E402
from natix_miner.toolkit import challenge, train_augment  # noqa: E402
from natix_miner.toolkit.condition_probes import glare  # noqa: E402
from tests.scenes import street  # noqa: E402

SEEDS = range(6)


def scores(im):
    """The four scores of an image as a validator would send it (JPEG q75)."""
    c = estimate_conditions(challenge.jpeg_roundtrip(im))
    return {n: c[f"{n}_score"] for n in SCORED}, c


@pytest.fixture(scope="module")
def clean():
    return [street(s) for s in SEEDS]


def test_clean_frames_score_low_on_every_condition(clean):
    for im in clean:
        sc, c = scores(im)
        assert max(sc.values()) < 0.5, sc
        assert not any(c[n] for n in SCORED) and c["day"]
        assert all(0.0 <= v <= 1.0 for v in sc.values())


@pytest.mark.parametrize("name,make", [
    ("fog", train_augment.fog),
    ("rain", train_augment.rain),
    ("glare", glare),
])
def test_each_score_rises_with_its_synthetic_condition(clean, name, make):
    before, after, flagged = [], [], 0
    for i, im in enumerate(clean):
        b, _ = scores(im)
        a, c = scores(make(im, np.random.default_rng(100 + i)))
        before.append(b[name])
        after.append(a[name])
        flagged += bool(c[name])
    assert np.mean(after) - np.mean(before) > 0.4, (before, after)
    assert flagged >= len(clean) // 2 + 1          # a majority of the synthetic frames is flagged
    assert max(before) < 0.5


def test_motion_blur_score_rises_with_the_training_motion_blur(clean):
    # the augmentation draws a 3-9 px line kernel in 4 directions; seeds 3 and 2 draw its strongest
    # (9 px) horizontal and vertical kernels, which must be flagged; random draws must raise the score
    strong = [scores(train_augment.motion_blur(im, np.random.default_rng(seed)))[0]["motion_blur"]
              for im in clean for seed in (3, 2)]
    assert np.mean([s >= 0.5 for s in strong]) >= 0.75, strong
    drawn = [scores(train_augment.motion_blur(im, np.random.default_rng(200 + i)))[0]["motion_blur"]
             for i, im in enumerate(clean)]
    base = [scores(im)[0]["motion_blur"] for im in clean]
    assert np.mean(drawn) > np.mean(base) + 0.05 and max(base) < 0.5


def test_fog_is_judged_on_the_content_not_on_letterbox_padding(clean):
    foggy = train_augment.fog(clean[0], np.random.default_rng(1))
    boxed, _ = challenge.apply_era(foggy, "letterbox", np.random.default_rng(0))
    assert scores(foggy)[1]["fog"] and scores(boxed)[1]["fog"]    # black bars are not a dark channel
    assert not scores(challenge.apply_era(clean[0], "letterbox", np.random.default_rng(0))[0])[1]["fog"]


def test_night_is_not_fog_or_glare_and_thresholds_come_from_config(clean):
    sc, c = scores(train_augment.night(clean[1], np.random.default_rng(3)))
    assert c["night"] and not c["fog"] and not c["glare"]
    # a light haze: half way between the clean frame and the fog augmentation
    hazy = Image.blend(clean[1], train_augment.fog(clean[1], np.random.default_rng(3)), 0.5)
    s = estimate_conditions(hazy)["fog_score"]
    assert 0.0 < s < 1.0
    assert estimate_conditions(hazy, ConditionsConfig(fog_threshold=s))["fog"]
    assert not estimate_conditions(hazy, ConditionsConfig(fog_threshold=min(1.0, s + 0.01)))["fog"]


def test_tiny_and_odd_images_do_not_break_the_estimate():
    for im in (Image.new("RGB", (4, 3)), Image.new("L", (300, 200), 128), Image.new("RGB", (2000, 20), (250, 250, 250))):
        c = estimate_conditions(im)
        assert all(0.0 <= c[f"{n}_score"] <= 1.0 for n in SCORED)


def test_a_misspelt_condition_margin_is_refused():
    from cascade.config import build_dataclass
    from cascade.errors import ConfigError

    with pytest.raises(ConfigError, match=r"router.condition_margins.fogg"):
        build_dataclass(RouterConfig, {"condition_margins": {"fogg": 0.4}}, source="x.yaml", prefix="router")
    assert build_dataclass(RouterConfig, {"condition_margins": {"fog": 0.45}}, source="x.yaml",
                           prefix="router").condition_margins == {"fog": 0.45}
