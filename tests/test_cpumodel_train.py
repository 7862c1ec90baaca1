"""`natix-miner train` end to end on a generated image folder, then the tier scores images."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cascade.config import load_cascade_config
from cascade.tier import TierOutput
from models.heads import metadata_path
from models.registry import build_tier
from natix_miner.cli import main
from natix_miner.toolkit.dataset import load_folder
from natix_miner.toolkit.training import Item, data_fingerprint, run_training

TIER = "effnet_lite0.roadwork_head"


def road(rng: np.random.Generator, cones: bool) -> Image.Image:
    """A grey road under a blue sky; roadwork images carry orange-and-white striped cones."""
    im = Image.new("RGB", (320, 240), tuple(int(v) for v in rng.integers(95, 135, 3)))
    d = ImageDraw.Draw(im)
    d.rectangle([0, 0, 320, int(rng.integers(80, 110))], fill=(140, 170, 210))
    d.line([(160, 240), (160 + int(rng.integers(-30, 30)), 110)], fill=(230, 230, 230), width=4)
    if cones:
        for _ in range(int(rng.integers(2, 5))):
            x, y = int(rng.integers(20, 300)), int(rng.integers(140, 230))
            d.polygon([(x, y - 45), (x - 16, y), (x + 16, y)], fill=(255, 100, 0))
            d.rectangle([x - 10, y - 28, x + 10, y - 21], fill=(250, 250, 250))
    return im


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("roads")
    rng = np.random.default_rng(7)
    for sub, cones in (("roadwork", True), ("no_roadwork", False)):
        (root / sub).mkdir()
        for i in range(12):
            road(rng, cones).save(root / sub / f"{sub}_{i:02d}.jpg", quality=90)
    return root


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "cpu.yaml"
    cfg.write_text(f"""
artifacts_dir: {tmp_path / 'artifacts'}
tiers:
  - name: {TIER}
    backend: efficientnet_lite
    options: {{threads: 1, tiles: [2, 3]}}
""")
    return cfg


def test_train_command_writes_a_head_the_tier_then_uses(images, tmp_path):
    cfg = write_config(tmp_path)
    report_file = tmp_path / "report.json"
    code = main(["train", "--config", str(cfg), "--images", str(images), "--epochs-of-augmentation", "1",
                 "--seed", "3", "--report", str(report_file)])
    assert code == 0
    spec = load_cascade_config(cfg).tiers[0]
    head_file = spec.artifact("head.pt")
    meta = json.loads(metadata_path(head_file).read_text())
    train_items = [Item(s, images.name) for s in load_folder(images) if s.split == "train"]
    assert meta["data_fingerprint"] == data_fingerprint(train_items)
    assert meta["split"] == "train" and meta["val_split"] == "val" and meta["augment_copies"] == 1
    assert meta["feature_dim"] == 3840 and meta["backend"] == "efficientnet_lite"
    assert len(meta["config_hash"]) == 64 and meta["class_balance"]["positive"] > 0
    held = meta["metrics"]["all"]
    assert held["n"] == len([s for s in load_folder(images) if s.split == "val"])
    assert held["accuracy"] >= 0.75  # cones on roads are easy even for ImageNet features
    assert json.loads(report_file.read_text())[TIER]["head"] == str(head_file)
    # head mode extracted its features with the serving runtime: its ONNX export is already there
    assert spec.artifact("onnx/features.fp32.onnx").exists()

    tier = build_tier(spec)
    tier.load("cpu")
    rng = np.random.default_rng(99)
    fresh = [road(rng, True), road(rng, False), road(rng, True).resize((1360, 800))]
    out = tier.predict(fresh)
    assert all(isinstance(o, TierOutput) and 0.0 <= o.prob <= 1.0 for o in out)
    assert out[2].evidence["tiles"] == 6


def test_bad_requests_are_clear_errors(images, tmp_path):
    cfg = write_config(tmp_path)
    with pytest.raises(ValueError, match="no tier named"):
        run_training(cfg, images, tiers=["nope"])
    assert main(["train", "--config", str(cfg), "--images", str(tmp_path / "missing")]) == 2


def test_fingerprint_ignores_order_and_sees_labels(images):
    items = [Item(s, "x") for s in load_folder(images)]
    assert data_fingerprint(items) == data_fingerprint(list(reversed(items)))
    flipped = [Item(type(it.sample)(it.sample.path, 1 - it.sample.label, it.sample.source, it.sample.split), "x")
               for it in items]
    assert data_fingerprint(flipped) != data_fingerprint(items)
