"""The EfficientNet-Lite tier under ONNX Runtime: same features as torch, a cached export keyed by
what it was made from, its own threads, crop schedules, the torch fallback and int8 gating."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cascade.config import TierSpec
from cascade.errors import ConfigError
from cascade.tier import Tier
from models import onnx_runtime
from models.efficientnet_lite import ONNX_FP32, ONNX_INT8, EfficientNetLiteTier
from models.heads import fit_head
from tests.test_cpumodel_tier import dashcam_frame

NAME = "effnet_lite0.onnx_test"
SMALL = (680, 448)  # the smallest frame that still gets the 2 x 3 tiles: keeps the tests quick


def spec(art, **options) -> TierSpec:
    return TierSpec(name=NAME, backend="efficientnet_lite", artifacts_dir=str(art),
                    source=str(art / "cfg.yaml"), options={"threads": 1, **options})


def frames() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    noise = Image.fromarray(rng.integers(0, 255, (300, 260, 3), dtype=np.uint8))
    return [dashcam_frame(cone_at=(300, 380), size=SMALL), noise, Image.new("RGB", (224, 224), (40, 90, 160))]


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    """An artefact dir with a head fitted on torch features (what `natix-miner train` writes)."""
    d = tmp_path_factory.mktemp("onnx-art")
    t = EfficientNetLiteTier(spec(d, runtime="torch"))
    t.load_backbone("cpu")
    ims = [dashcam_frame(cone_at=(150 + 120 * i, 400), size=SMALL) for i in range(2)] + \
          [dashcam_frame(size=SMALL), Image.new("RGB", (300, 300), (90, 90, 90))]
    t.head = fit_head(t.embed(ims), np.array([1, 1, 0, 0]), l2=1.0)
    t.save_head({"split": "train"})
    return d


@pytest.fixture(scope="module")
def served(art):
    """(onnxruntime tier, torch tier) loaded from the same artefacts."""
    ort_tier = EfficientNetLiteTier(spec(art))
    ort_tier.load("cpu")
    torch_tier = EfficientNetLiteTier(spec(art, runtime="torch"))
    torch_tier.load("cpu")
    return ort_tier, torch_tier


def test_onnxruntime_features_equal_torch(served):
    ort_tier, torch_tier = served
    info = ort_tier.describe()["runtime"]
    assert info["runtime"] == "onnxruntime" and info["precision"] == "float32"
    assert torch_tier.describe()["runtime"]["runtime"] == "torch"
    ims = frames()
    a, b = ort_tier.embed(ims), torch_tier.embed(ims)
    assert a.shape == b.shape == (3, 3840)
    assert np.abs(a - b).max() < 1e-4
    pa = [o.prob for o in ort_tier.predict(ims)]
    pb = [o.prob for o in torch_tier.predict(ims)]
    np.testing.assert_allclose(pa, pb, atol=1e-5)


def test_export_is_cached_and_rebuilt_when_stale(served, art, monkeypatch):
    ort_tier, _ = served
    path = art / NAME / ONNX_FP32
    rec = json.loads(path.with_suffix(".json").read_text())
    assert rec["key"] == ort_tier.export_key().as_dict()
    assert rec["key"]["weights_sha256"] == ort_tier.weights_identity()["sha256"]
    assert rec["key"]["input_size"] == 224 and rec["key"]["opset"] == 17
    calls = []
    real = onnx_runtime.export_torch
    monkeypatch.setattr(onnx_runtime, "export_torch", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = EfficientNetLiteTier(spec(art))
    again.load("cpu")
    assert calls == [] and again.describe()["runtime"]["exported_now"] is False
    # Other weights (a fine-tuned backbone has another sha256) or another opset: stale, rebuilt.
    again._weights["sha256"] = "0" * 64
    assert again.export_onnx()[1] is True and len(calls) == 1
    assert json.loads(path.with_suffix(".json").read_text())["key"]["weights_sha256"] == "0" * 64
    other = EfficientNetLiteTier(spec(art, opset=16))
    other.load("cpu")
    assert len(calls) == 2 and other.describe()["runtime"]["exported_now"] is True


def test_threads_are_the_sessions_not_torchs(art):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t = EfficientNetLiteTier(spec(art, threads=1))
        t.load("cpu")
        assert torch.get_num_threads() == 2  # onnxruntime: torch's process-wide setting untouched
        assert t._onnx.session.get_session_options().intra_op_num_threads == 1
        legacy = EfficientNetLiteTier(spec(art, threads=1, runtime="torch"))
        legacy.load("cpu")
        assert torch.get_num_threads() == 1  # the torch runtime still sets it (documented)
    finally:
        torch.set_num_threads(before)


def test_crop_schedules_agree_and_auto_picks_the_faster(served, art, monkeypatch):
    ort_tier, _ = served
    crops = [ort_tier._to_array(im) for im in frames()] * 2
    x = np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2))
    np.testing.assert_allclose(ort_tier._run_schedule(x, 1), ort_tier._run_schedule(x, 32), atol=1e-4)
    assert ort_tier.options.crop_schedule == "auto"
    ms = ort_tier.measure_crop_schedule(rounds=1)
    assert ms["crops"] == 7 and ms["batched"] > 0 and ms["sequential"] > 0
    assert ort_tier.crop_schedule() == min(("batched", "sequential"), key=lambda k: ms[k])
    pinned = EfficientNetLiteTier(spec(art, crop_schedule="batched"))
    assert pinned.crop_schedule() == "batched"
    monkeypatch.setattr(pinned, "measure_crop_schedule", lambda: pytest.fail("measured"))
    monkeypatch.setattr(Tier, "warmup", lambda self: [])
    pinned.warmup()  # a pinned schedule is not measured at warm-up


def test_torch_is_the_fallback_when_onnxruntime_is_missing(art, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    t = EfficientNetLiteTier(spec(art))
    t.load("cpu")
    info = t.describe()["runtime"]
    assert info["runtime"] == "torch" and "onnxruntime unavailable" in info["why"]
    out = t.predict(frames()[:1])
    assert 0.0 <= out[0].prob <= 1.0


def test_options_are_checked(art):
    with pytest.raises(ConfigError, match="runtime"):
        EfficientNetLiteTier(spec(art, runtime="tensorrt"))
    with pytest.raises(ConfigError, match="quantize"):
        EfficientNetLiteTier(spec(art, runtime="torch", quantize="int8"))
    with pytest.raises(ConfigError, match="quantize"):
        EfficientNetLiteTier(spec(art, quantize="int4"))
    with pytest.raises(ConfigError, match="crop_schedule"):
        EfficientNetLiteTier(spec(art, crop_schedule="sometimes"))


def test_int8_serves_only_when_accepted_for_this_head_and_backbone(served, art):
    ort_tier, _ = served
    ims = frames()
    crops = [ort_tier._to_array(im) for im in ims]
    batches = [np.stack(crops).transpose(0, 3, 1, 2)[i:i + 1] for i in range(len(crops))]
    fp32 = art / NAME / ONNX_FP32
    int8 = art / NAME / ONNX_INT8
    onnx_runtime.quantize_int8(fp32, int8, batches)
    from models import backbone_weights

    rec = {"source_key": ort_tier.export_key().as_dict(),
           "head_sha256": backbone_weights.sha256_file(ort_tier.head_path()),
           "accepted": False, "verdict": "reward dropped by 0.05 > 0.01"}
    onnx_runtime.write_record(int8, rec)
    refused = EfficientNetLiteTier(spec(art, quantize="int8"))
    refused.load("cpu")
    info = refused.describe()["runtime"]
    assert info["precision"] == "float32" and "not accepted" in info["int8_refused"]

    onnx_runtime.write_record(int8, {**rec, "accepted": True})
    q = EfficientNetLiteTier(spec(art, quantize="int8"))
    q.load("cpu")
    assert q.describe()["runtime"]["precision"] == "int8"
    a, b = q.embed(ims), ort_tier.embed(ims)
    assert not np.array_equal(a, b)  # really the quantised graph
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.9

    onnx_runtime.write_record(int8, {**rec, "accepted": True, "head_sha256": "f" * 64})
    stale = EfficientNetLiteTier(spec(art, quantize="int8"))
    stale.load("cpu")
    assert "another head" in stale.describe()["runtime"]["int8_refused"]
