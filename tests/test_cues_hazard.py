"""Hazard-cue tier: synthetic scenes (no data files), evidence, odd inputs, fitted-head loading."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cascade.config import TierSpec
from cascade.errors import ConfigError
from cascade.tier import TierOutput
from models.hazard_cues import CUE_NAMES, HazardCueOptions, HazardCueTier, measure_cues
from models.heads import fit_head


def _tier(tmp_path, **options) -> HazardCueTier:
    spec = TierSpec(name="hazard_cues.test", backend="hazard_cues", options=options,
                    artifacts_dir=str(tmp_path))
    tier = HazardCueTier(spec)
    tier.load("cpu")
    return tier


def _road(w: int = 1360, h: int = 800) -> Image.Image:
    img = Image.new("RGB", (w, h), (95, 95, 98))
    ImageDraw.Draw(img).rectangle((0, 0, w, int(h * 0.4)), fill=(150, 185, 230))  # sky
    return img


def _cone_scene() -> Image.Image:
    """Grey road with a row of orange cones carrying white bands."""
    img = _road()
    d = ImageDraw.Draw(img)
    for i, x in enumerate(range(200, 1200, 220)):
        base, top, half = 700 - i * 20, 480 - i * 20, 55 - i * 5
        d.polygon([(x - half, base), (x + half, base), (x, top)], fill=(255, 110, 10))
        for k in (0.35, 0.65):
            y = int(top + (base - top) * k)
            hw = int(half * k)
            d.rectangle((x - hw, y - 8, x + hw, y + 8), fill=(245, 245, 245))
    return img


def _barrier_scene() -> Image.Image:
    """Grey road with a red/white striped barrier board and two striped beacons."""
    img = _road()
    d = ImageDraw.Draw(img)
    for i, x in enumerate(range(300, 1100, 20)):
        d.rectangle((x, 540, x + 19, 580), fill=(220, 20, 30) if i % 2 == 0 else (250, 250, 250))
    for x in (150, 1200):
        for k, y in enumerate(range(420, 620, 16)):
            d.rectangle((x, y, x + 30, y + 15), fill=(220, 20, 30) if k % 2 == 0 else (250, 250, 250))
    return img


def test_hazard_scenes_score_above_plain_road_and_sky(tmp_path):
    tier = _tier(tmp_path)
    sky = Image.new("RGB", (1360, 800), (120, 170, 235))
    outs = tier.predict([_cone_scene(), _barrier_scene(), _road(), sky])
    assert all(isinstance(o, TierOutput) for o in outs)
    cones, barrier, road, blue = (o.prob for o in outs)
    assert cones > road + 0.2 and cones > blue + 0.2
    assert barrier > road + 0.2 and barrier > blue + 0.2
    assert cones > 0.5
    assert road < 0.5 and blue < 0.5
    for o in outs:
        assert 0.0 <= o.prob <= 1.0
        assert set(o.evidence["cues"]) == set(CUE_NAMES)
        assert set(o.evidence["contributions"]) == set(CUE_NAMES)
        assert len(o.evidence["features"]) == len(CUE_NAMES)
        assert o.evidence["model"] == "hand-set"
    assert outs[0].evidence["cues"]["orange_share"] > 0.01
    assert outs[1].evidence["cues"]["red_white_objects"] >= 1


def test_embed_matches_evidence_and_is_deterministic(tmp_path):
    tier = _tier(tmp_path)
    x1 = tier.embed([_cone_scene(), _road()])
    x2 = tier.embed([_cone_scene(), _road()])
    assert x1.shape == (2, len(CUE_NAMES)) and x1.dtype == np.float32
    np.testing.assert_array_equal(x1, x2)
    ev = tier.predict([_cone_scene()])[0].evidence["features"]
    np.testing.assert_allclose(x1[0], ev, atol=1e-4)
    assert tier.embed([]).shape == (0, len(CUE_NAMES))


def test_odd_and_broken_images_do_not_fail_the_batch(tmp_path):
    tier = _tier(tmp_path)
    buf = io.BytesIO()
    _road(200, 100).save(buf, format="JPEG")
    data = buf.getvalue()
    broken = Image.open(io.BytesIO(data[: len(data) // 2]))  # truncated: decoding raises
    odd = [Image.new("RGB", (1, 1)), Image.new("RGB", (6000, 3), (255, 120, 0)),
           Image.new("L", (3, 4000), 200), Image.new("RGBA", (64, 64), (255, 100, 0, 128))]
    outs = tier.predict(odd + [broken, _cone_scene()])
    assert len(outs) == 6
    for o in outs[:4]:
        assert isinstance(o, TierOutput) and 0.0 <= o.prob <= 1.0
    assert isinstance(outs[4], Exception)
    assert isinstance(outs[5], TierOutput) and outs[5].prob > 0.5


def test_options_override_and_validation(tmp_path):
    base = _tier(tmp_path).predict([_road()])[0].prob
    lifted = _tier(tmp_path, bias=0.0).predict([_road()])[0].prob
    assert lifted > base
    with pytest.raises(ConfigError, match="coefficients.no_such_cue"):
        _tier(tmp_path, coefficients={"no_such_cue": 1.0})
    with pytest.raises(ConfigError, match="work_side"):
        _tier(tmp_path, work_side=8)


def test_measure_cues_shares_in_range():
    raw = measure_cues(_cone_scene(), HazardCueOptions())
    for name in CUE_NAMES:
        assert raw[name] >= 0.0
        if name not in ("orange_blobs", "red_white_objects"):
            assert raw[name] <= 1.0


def test_fitted_head_is_used_and_stale_head_ignored(tmp_path):
    tier = _tier(tmp_path)
    scenes = [_cone_scene(), _barrier_scene(), _road(), Image.new("RGB", (800, 600), (120, 170, 235))]
    x = tier.embed(scenes)
    rng = np.random.default_rng(0)
    feats = np.vstack([x + rng.normal(0, 0.01, x.shape).astype(np.float32) for _ in range(6)])
    labels = np.tile([1, 1, 0, 0], 6)
    tier.head = fit_head(feats, labels, l2=0.01)  # one L2 value: no grid search in a unit test
    path = tier.save_head({"test": True})
    assert path == tier.head_path() and path.exists()

    fitted = _tier(tmp_path)
    outs = fitted.predict(scenes)
    assert all(o.evidence["model"] == "fitted head" for o in outs)
    assert outs[0].prob > 0.5 > outs[2].prob

    stale = _tier(tmp_path, work_side=320)  # other feature options: head ignored, not an error
    assert stale.predict([_road()])[0].evidence["model"] == "hand-set"
    untrained = _tier(tmp_path, use_fitted=False)
    assert untrained.predict([_road()])[0].evidence["model"] == "hand-set"
