"""The engine with a real CPU tier (weight-free hazard cues), and the engine's import walls."""

import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from cascade.calibration import CalibrationSet
from cascade.config import parse_cascade_config
from cascade.engine import CascadeEngine


def cone_scene() -> Image.Image:
    im = Image.new("RGB", (320, 240), (110, 110, 115))
    d = ImageDraw.Draw(im)
    for x in range(40, 300, 50):
        d.polygon([(x, 200), (x + 20, 120), (x + 40, 200)], fill=(255, 100, 0))
        d.rectangle([x + 10, 150, x + 30, 160], fill=(255, 255, 255))
    return im


async def test_engine_serves_a_real_cpu_tier(tmp_path):
    hazard = pytest.importorskip("models.hazard_cues")
    from models.registry import build_tier

    cfg = parse_cascade_config(
        {"artifacts_dir": str(tmp_path / "artifacts"),
         "tiers": [{"name": "hazard_cues.handset", "backend": "hazard_cues", "device": "cpu",
                    "max_batch_size": 4, "expected_latency_ms": 50}]},
        source="<test>", base_dir=str(tmp_path))
    eng = CascadeEngine(cfg, build_tier, calibration=CalibrationSet.identity())
    async with eng:
        assert eng.health()["ready"]
        results = await eng.predict_batch([cone_scene(), Image.new("RGB", (320, 240), (90, 90, 90))])
    assert all(0.0 <= r.prob <= 1.0 and not r.fallback for r in results)
    assert results[0].raw_probs["hazard_cues.handset"] > results[1].raw_probs["hazard_cues.handset"]
    del hazard


def test_engine_imports_no_model_library_or_bittensor():
    code = ("import sys, cascade.engine, cascade.calibration, cascade.placement, cascade.store, "
            "cascade.telemetry, cascade.conditions, cascade.router, cascade.consensus; "
            "bad = [m for m in ('torch', 'transformers', 'onnxruntime', 'bittensor', 'vllm', 'ultralytics') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
