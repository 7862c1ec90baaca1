"""`natix-miner quantize`: an int8 model is kept only when the val figures hold, and says why."""

import asyncio
import dataclasses

import numpy as np
import pytest
import yaml

from models import backbone_weights
from models.efficientnet_lite import ONNX_INT8, EfficientNetLiteTier
from models.heads import fit_head
from natix_miner.toolkit.dataset import load_folder
from natix_miner.toolkit.quantize import Tolerance, format_summary, run_quantize, verdict
from tests.test_validator_wire import write_folder

NAME = "effnet_lite0.q_head"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    images = root / "images"
    images.mkdir()
    write_folder(images, n_per_label=4)  # 3 train + 1 val per label, 320x200 (no tiles)
    cfg = {"artifacts_dir": "artifacts",
           "engine": {"deadline_ms": 8000, "store": {"enabled": False}},
           "tiers": [{"name": NAME, "backend": "efficientnet_lite", "expected_latency_ms": 50,
                      "options": {"threads": 1}}]}
    config = root / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    from cascade.config import load_cascade_config

    spec = load_cascade_config(config).tiers[0]
    tier = EfficientNetLiteTier(spec)
    tier.load_backbone("cpu")
    samples = [s for s in load_folder(images) if s.split == "train"]
    tier.head = fit_head(tier.embed([s.load() for s in samples]), [s.label for s in samples], l2=1.0)
    tier.save_head({"split": "train"})
    return config, images, spec


def test_verdict_refuses_a_drop_beyond_the_tolerance_or_an_undefined_figure():
    f32 = {"tier_auc": 0.90, "reward": 0.50}
    assert verdict(f32, {"tier_auc": 0.895, "reward": 0.50}, Tolerance(0.01, 0.01))[0]
    ok, why = verdict(f32, {"tier_auc": 0.85, "reward": 0.50}, Tolerance(0.01, 0.01))
    assert not ok and "tier_auc dropped 0.9000 -> 0.8500" in why
    ok, why = verdict(f32, {"tier_auc": 0.95, "reward": 0.45}, Tolerance(0.01, 0.01))
    assert not ok and "reward dropped" in why
    assert not verdict({"tier_auc": None, "reward": 0.5}, f32, Tolerance())[0]


def test_accepted_int8_is_written_and_served_refused_leaves_it_alone(setup, monkeypatch):
    from natix_miner.toolkit import quantize

    monkeypatch.setattr(quantize, "REWARD_DRAWS", 100)  # the figure's method, fewer windows
    config, images, spec = setup
    target = spec.artifact(ONNX_INT8)
    s = asyncio.run(run_quantize(config, [images], calibration_images=6, progress=False,
                                 tolerance=Tolerance(tier_auc=1.0, reward=1.0)))
    assert s["accepted"] and target.exists()
    assert s["calibration"]["crops"] == 6 and s["val"]["images"] == 2
    assert s["val"]["tier_prob_max_abs_diff"] > 0  # the int8 pass really served the candidate
    assert set(s["val"]["float32"]) >= {"tier_auc", "cascade_auc", "reward"}
    text = format_summary(s)
    assert "ACCEPTED" in text and "tier ROC AUC" in text and "cascade expected reward" in text
    q = EfficientNetLiteTier(dataclasses.replace(spec, options={**spec.options, "quantize": "int8"}))
    q.load("cpu")
    assert q.describe()["runtime"]["precision"] == "int8"
    before = backbone_weights.sha256_file(target)

    refused = asyncio.run(run_quantize(config, [images], calibration_images=6, progress=False,
                                       tolerance=Tolerance(tier_auc=-1.0, reward=-1.0)))
    assert not refused["accepted"] and "dropped" in refused["verdict"]
    assert "REFUSED" in format_summary(refused) and "nothing written" in format_summary(refused)
    assert backbone_weights.sha256_file(target) == before  # the accepted model is untouched
    assert not list(target.parent.glob("*candidate*"))
