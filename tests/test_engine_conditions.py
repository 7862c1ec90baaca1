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
