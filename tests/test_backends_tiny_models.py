"""Every production backend, run through its real loading path on a tiny model built from a config.

Each tiny checkpoint is built from a transformers config (hidden size 32, one layer), saved with
`save_pretrained` (plus a processor / tokenizer built offline), and then loaded by the tier
exactly as a hub checkpoint would be: `TierSpec(checkpoint=<dir>)` -> `load("cpu")` -> `predict`.
Weights are random, so the tests check the contract (shapes, ranges, per-item errors, caching),
not accuracy. No network: HF_HUB_OFFLINE is set for the whole module.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cascade.config import TierSpec  # noqa: E402
from cascade.errors import ConfigError, MissingArtifactError  # noqa: E402
from cascade.tier import TierOutput  # noqa: E402
from models import registry  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def _offline_hub():
    """No test here may reach the network: local checkpoints only."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


from tests.tiny_models import (BUILDERS, TEMPLATE, WORDS, build_classifier, build_clip,  # noqa: E402,F401
                               build_dfine, build_dinov2, build_llava_vlm, build_rtdetr, build_siglip,
                               tiny_tokenizer)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> local checkpoint dir of each tiny model (built once per module)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {name: fn(root / name) for name, fn in BUILDERS.items()}


def images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(640, 480), (224, 224), (300, 500), (1360, 800)]
    return [Image.fromarray(rng.integers(0, 255, (sizes[i % 4][1], sizes[i % 4][0], 3), dtype=np.uint8))
            for i in range(n)]


def spec(name, backend, checkpoint, tmp_path=None, **options) -> TierSpec:
    return TierSpec(name=name, backend=backend, checkpoint=checkpoint, options=options,
                    artifacts_dir=str(tmp_path) if tmp_path else ".", source="test.yaml")


def train_backbone_head(tier, n: int = 12) -> None:
    """What `natix-miner train` does with a TrainableTier: embed, fit, save."""
    tier.load_backbone("cpu")
    rng = np.random.default_rng(1)
    ims = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(n)]
    labels = [i % 2 for i in range(n)]
    tier.fit_head(tier.embed(ims), labels, seed=0)
    tier.save_head({"source": "test"})


def check_outputs(outputs, n):
    assert len(outputs) == n
    for out in outputs:
        assert isinstance(out, TierOutput), out
        assert 0.0 <= out.prob <= 1.0 and np.isfinite(out.prob)


# ---- one parametrised test over every registered CPU-capable backend (STYLE habit 10) ----------

GPU_ONLY = {"yolo", "vlm_vllm"}          # need ultralytics / vllm: fake-library tests in test_backends_gpu_extras.py
OTHER_OWNERS = {"efficientnet_lite", "ocr_signs", "hazard_cues"}   # offline CPU tiers, own tests
ANY_BOX = {"evidence": {"min_score": 0.0, "min_area_frac": 0.0}}
CASES = [  # (backend, tiny model, options)
    ("hf_classifier", "classifier", {}),
    ("hf_backbone_head", "dinov2", {}),
    ("zero_shot", "clip", {}),
    ("zero_shot", "siglip", {"templates": ["a photo of {}."]}),
    ("hf_detector", "rtdetr", ANY_BOX),
    ("hf_detector", "dfine", ANY_BOX),
    ("vlm_transformers", "vlm", {"max_image_side": 64}),
]


def test_every_production_backend_has_a_tiny_case():
    covered = {backend for backend, _, _ in CASES} | GPU_ONLY | OTHER_OWNERS | {"vlm_openai"}
    assert set(registry.BACKENDS) <= covered, set(registry.BACKENDS) - covered


@pytest.mark.parametrize("backend,model,options", CASES, ids=[f"{b}-{m}" for b, m, _ in CASES])
def test_backend_runs_on_tiny_model(backend, model, options, tiny, tmp_path):
    tier = registry.build_tier(spec(f"{backend}.tiny", backend, tiny[model], tmp_path, **options))
    if backend == "hf_backbone_head":
        train_backbone_head(tier)
        tier = registry.build_tier(spec(f"{backend}.tiny", backend, tiny[model], tmp_path, **options))
    tier.load("cpu")
    tier.warmup()
    ims = images(3)
    check_outputs(tier.predict(ims), 3)
    # Same answer for the same image, alone or in a batch (left padding, per-item pooling).
    alone = tier.predict(ims[:1])[0].prob
    assert alone == pytest.approx(tier.predict(ims)[0].prob, abs=1e-4)
    # One bad item costs only its own slot.
    mixed = tier.predict([ims[0], "not an image", ims[1]])
    assert isinstance(mixed[1], Exception) and len(mixed) == 3
    check_outputs([mixed[0], mixed[2]], 2)
    assert tier.describe()["backend"] == backend
    tier.close()


# ---- backend specifics ---------------------------------------------------------------------


def test_classifier_maps_labels_and_rejects_unknown(tiny):
    from models.hf_classifier import HFClassifierTier

    tier = HFClassifierTier(spec("vit.t", "hf_classifier", tiny["classifier"]))
    tier.load("cpu")
    assert tier._pos == [1]  # "Roadwork" matched case-insensitively
    both = HFClassifierTier(spec("vit.t", "hf_classifier", tiny["classifier"],
                                 positive_labels=["roadwork", "no_roadwork"]))
    both.load("cpu")
    assert all(o.prob == pytest.approx(1.0, abs=1e-5) for o in both.predict(images(2)))
    wrong = HFClassifierTier(spec("vit.t", "hf_classifier", tiny["classifier"],
                                  positive_labels=["construction"]))
    with pytest.raises(ValueError, match="no_roadwork"):
        wrong.load("cpu")
    with pytest.raises(ConfigError, match="activation"):
        HFClassifierTier(spec("vit.t", "hf_classifier", tiny["classifier"], activation="relu"))


def test_classifier_multi_label_uses_sigmoid(tiny, tmp_path):
    import shutil

    from models.hf_classifier import HFClassifierTier

    ckpt = tmp_path / "multi"
    shutil.copytree(tiny["classifier"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["problem_type"] = "multi_label_classification"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    tier = HFClassifierTier(spec("vit.t", "hf_classifier", str(ckpt)))
    tier.load("cpu")
    assert tier._sigmoid is True
    im = images(1)
    with torch.inference_mode():
        logits = tier.model(**tier.processor(images=im, return_tensors="pt")).logits
    assert tier.predict(im)[0].prob == pytest.approx(torch.sigmoid(logits[0, 1]).item(), abs=1e-5)


def test_classifier_needs_a_checkpoint():
    from models.hf_classifier import HFClassifierTier

    with pytest.raises(RuntimeError, match="checkpoint"):
        HFClassifierTier(spec("vit.t", "hf_classifier", None)).load("cpu")


def test_backbone_head_missing_head_says_how_to_train(tiny, tmp_path):
    from models.hf_backbone_head import HFBackboneHeadTier

    tier = HFBackboneHeadTier(spec("dinov2.t", "hf_backbone_head", tiny["dinov2"], tmp_path))
    with pytest.raises(MissingArtifactError, match="natix-miner train"):
        tier.load("cpu")


def test_backbone_features_and_pooling(tiny, tmp_path):
    from models.hf_backbone_head import HFBackboneHeadTier

    tier = HFBackboneHeadTier(spec("dinov2.t", "hf_backbone_head", tiny["dinov2"], tmp_path))
    tier.load_backbone("cpu")
    feats = tier.embed(images(2))
    assert feats.shape == (2, 64) and feats.dtype == np.float32  # CLS + mean patch of width 32
    assert np.allclose(feats, tier.embed(images(2)))             # deterministic, cacheable
    cls_only = HFBackboneHeadTier(spec("dinov2.t", "hf_backbone_head", tiny["dinov2"], tmp_path,
                                       pooling="cls", image_size=64))
    cls_only.load_backbone("cpu")
    assert cls_only.embed(images(1)).shape == (1, 32)
    assert cls_only.feature_signature() != tier.feature_signature()
    # A head trained with other feature options is refused with the command that fixes it.
    train_backbone_head(tier)
    other = HFBackboneHeadTier(spec("dinov2.t", "hf_backbone_head", tiny["dinov2"], tmp_path,
                                    pooling="cls"))
    with pytest.raises(MissingArtifactError, match="signature"):
        other.load("cpu")


def test_dinov3_registers_and_processor_fallback(tmp_path):
    """DINOv3's image processor exists only with torchvision; the tier then resizes and
    normalises itself, and its register tokens are kept out of the patch mean."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    from models.hf_backbone_head import HFBackboneHeadTier

    cfg = DINOv3ViTConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_register_tokens=4)
    DINOv3ViTModel(cfg).eval().save_pretrained(tmp_path / "d3")
    (tmp_path / "d3" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "DINOv3ViTImageProcessor", "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25], "size": {"height": 224, "width": 224}}))
    tier = HFBackboneHeadTier(spec("dinov3.t", "hf_backbone_head", str(tmp_path / "d3"), tmp_path,
                                   image_size=64))
    tier.load_backbone("cpu")
    assert tier._n_prefix == 5
    if tier.processor is None:
        assert tier._norm == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    feats = tier.embed(images(2))
    assert feats.shape == (2, 64)
    with torch.inference_mode():
        hidden = tier.model(pixel_values=tier._pixels(images(1))["pixel_values"]).last_hidden_state
    assert hidden.shape[1] == 1 + 4 + 64
    assert np.allclose(feats[0, 32:], hidden[0, 5:].mean(0).numpy(), atol=1e-5)


@pytest.mark.parametrize("model,sigmoid", [("clip", False), ("siglip", True)])
def test_zero_shot_families(tiny, model, sigmoid):
    from models.zero_shot import ZeroShotTier

    tier = ZeroShotTier(spec(f"{model}.t", "zero_shot", tiny[model],
                             positive_prompts=["road work", "traffic cones"],
                             negative_prompts=["an empty road"], templates=["a photo of {}.", "{} at night"]))
    tier.load("cpu")
    assert tier._sigmoid is sigmoid
    assert tier._text.shape == (3, tier._text.shape[1])          # one cached row per concept
    assert torch.allclose(tier._text.norm(dim=-1), torch.ones(3), atol=1e-5)
    outs = tier.predict(images(2))
    check_outputs(outs, 2)
    assert outs[0].evidence["best_concept"] in tier.concepts


def test_concept_probability_rules():
    from models.zero_shot import concept_probability

    logits = torch.tensor([[2.0, 0.0, 0.0]])
    soft = concept_probability(logits, 1, sigmoid=False).item()
    assert soft == pytest.approx(np.exp(2) / (np.exp(2) + 2))
    sig = concept_probability(logits, 1, sigmoid=True).item()
    s = 1 / (1 + np.exp(-2.0))
    assert sig == pytest.approx(s / (s + 0.5))


def test_detector_refuses_checkpoint_without_roadwork_classes(tiny):
    from models.hf_detector import HFDetectorTier

    tier = HFDetectorTier(spec("det.t", "hf_detector", tiny["rtdetr"],
                               evidence={"roadwork_classes": ["excavator"]}))
    with pytest.raises(ValueError, match="Traffic cone"):
        tier.load("cpu")


def test_detector_post_processing_without_focal_loss_flag(tiny, tmp_path):
    # DETR/YOLOS-style processors have no `use_focal_loss` argument; passing it raised a
    # TypeError on every batch, so such a checkpoint could never warm up.
    from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil

    tier = registry.build_tier(spec("det.detr", "hf_detector", tiny["rtdetr"], tmp_path, **ANY_BOX))
    tier.load("cpu")
    tier.processor = DetrImageProcessorPil(size={"height": 64, "width": 64})
    check_outputs(tier.predict(images(2)), 2)
    tier.close()


def test_transformers_vlm_reads_answer_tokens(tiny):
    from models.vlm_transformers import TransformersVLMTier

    tier = TransformersVLMTier(spec("vlm.t", "vlm_transformers", tiny["vlm"], max_image_side=64))
    tier.load("cpu")
    tok = tier.processor.tokenizer
    assert {tok.decode([i]) for i in tier.yes_ids} == {"Yes", "yes", "YES"}
    assert {tok.decode([i]) for i in tier.no_ids} == {"No", "no", "NO"}
    assert "<image>" in tier.prompt_text() and tier.prompt_text().endswith("assistant\n")
    out = tier.predict(images(1))[0]
    assert set(out.evidence) >= {"lp_yes", "lp_no"}
    # The probability is exactly the renormalised yes/no mass of the last-position logits.
    assert out.prob == pytest.approx(
        1 / (1 + np.exp(out.evidence["lp_no"] - out.evidence["lp_yes"])), abs=1e-3)


def test_yolo_tier_on_an_untrained_yolo11n():
    """Ultralytics builds yolo11n from its bundled YAML (random weights, COCO names): the real
    predict path without a download. Skipped where the GPU extra is not installed."""
    pytest.importorskip("ultralytics")
    tier = registry.build_tier(spec("yolo11n.untrained", "yolo", "yolo11n.yaml",
                                    imgsz=64, evidence={"roadwork_classes": ["car", "truck"],
                                                        "min_score": 0.0, "min_area_frac": 0.0}))
    tier.load("cpu")
    check_outputs(tier.predict(images(2)), 2)
    tier.close()


QWEN_TEMPLATE = TEMPLATE.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")


def _without_torchvision_video_processor(monkeypatch):
    """transformers 5 builds Qwen2-VL's video processor only with torchvision, which the core
    install leaves out (vLLM installs bring it). Images never use it, so where torchvision is
    absent the processor is loaded without one; nothing else is replaced."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        return
    from transformers import processing_utils
    from transformers.models.auto import video_processing_auto

    check = processing_utils.ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    monkeypatch.setattr(processing_utils.ProcessorMixin, "check_argument_for_proper_class", lenient)
    monkeypatch.setattr(video_processing_auto.AutoVideoProcessor, "from_pretrained",
                        classmethod(lambda cls, *a, **k: None))


def test_qwen2_vl_through_the_transformers_tier(tmp_path, monkeypatch):
    """The production VLM family (Qwen2-VL / Qwen2.5-VL): M-RoPE, image grid, chat template."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from models.vlm_transformers import TransformersVLMTier

    _without_torchvision_video_processor(monkeypatch)
    tok, vocab = tiny_tokenizer(512, chat=True)
    tok.add_special_tokens({"additional_special_tokens": [
        "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>",
                                                      "<|image_pad|>", "<|video_pad|>")}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 1, 1]},
                         pad_token_id=0, bos_token_id=None, eos_token_id=vocab["<|im_end|>"]),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    path = tmp_path / "qwen2vl"
    Qwen2VLForConditionalGeneration(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(path)
    (path / "chat_template.jinja").write_text(QWEN_TEMPLATE)

    tier = TransformersVLMTier(spec("qwen2vl.t", "vlm_transformers", str(path), max_image_side=112))
    tier.load("cpu")
    assert type(tier.model).__name__ == "Qwen2VLForConditionalGeneration"
    assert "<|vision_start|><|image_pad|><|vision_end|>" in tier.prompt_text()
    ims = images(2)                        # different sizes: different image token counts
    batch = tier.predict(ims)
    check_outputs(batch, 2)
    # Left padding and M-RoPE positions: the short prompt scores the same alone and in a batch.
    assert tier.predict(ims[1:])[0].prob == pytest.approx(batch[1].prob, abs=1e-4)
    tier.close()


# ---- the OpenAI-compatible VLM against a loopback server ------------------------------------


async def test_openai_vlm_against_loopback_server(monkeypatch):
    aiohttp_web = pytest.importorskip("aiohttp.web")
    from models.vlm_openai import OpenAIVLMTier

    seen = []

    async def models_handler(request):
        return aiohttp_web.json_response({"object": "list", "data": [{"id": "tiny-vlm"}]})

    async def chat(request):
        body = await request.json()
        seen.append((request.headers.get("Authorization"), body))
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        if "bad" in request.headers.get("Authorization", "") or not url.startswith("data:image/jpeg;base64,"):
            return aiohttp_web.json_response({"error": "nope"}, status=400)
        top = [{"token": "Yes", "logprob": -0.2}, {"token": " yes", "logprob": -2.0},
               {"token": "No", "logprob": -1.9}, {"token": "Maybe", "logprob": -5.0}]
        return aiohttp_web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes"},
                                                      "logprobs": {"content": [{"token": "Yes", "logprob": -0.2,
                                                                                "top_logprobs": top}]}}]})

    app = aiohttp_web.Application()
    app.router.add_get("/v1/models", models_handler)
    app.router.add_post("/v1/chat/completions", chat)
    runner = aiohttp_web.AppRunner(app)
    await runner.setup()
    site = aiohttp_web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        monkeypatch.setenv("TEST_VLM_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("TEST_VLM_KEY", "secret-token")
        tier = OpenAIVLMTier(spec("vlm.remote", "vlm_openai", "tiny-vlm", base_url_env="TEST_VLM_URL",
                                  api_key_env="TEST_VLM_KEY", max_image_side=64))
        await asyncio.to_thread(tier.load, "cpu")
        outs = await asyncio.to_thread(tier.predict, images(3))
        check_outputs(outs, 3)
        expected = (np.exp(-0.2) + np.exp(-2.0)) / (np.exp(-0.2) + np.exp(-2.0) + np.exp(-1.9))
        assert outs[0].prob == pytest.approx(expected, rel=1e-3)
        auth, body = seen[0]
        assert auth == "Bearer secret-token"
        assert body["max_tokens"] == 1 and body["logprobs"] is True and body["top_logprobs"] == 20
        assert body["model"] == "tiny-vlm"
        # A failing server request is a per-item error, not a crash.
        monkeypatch.setenv("TEST_VLM_KEY", "bad")
        bad = OpenAIVLMTier(spec("vlm.remote", "vlm_openai", "tiny-vlm", base_url_env="TEST_VLM_URL",
                                 api_key_env="TEST_VLM_KEY", check_model_at_load=False))
        await asyncio.to_thread(bad.load, "cpu")
        errs = await asyncio.to_thread(bad.predict, images(2))
        assert len(errs) == 2 and all(isinstance(e, RuntimeError) and "HTTP 400" in str(e) for e in errs)
        # A model the server does not serve fails at load, naming what it serves.
        other = OpenAIVLMTier(spec("vlm.remote", "vlm_openai", "other-model", base_url_env="TEST_VLM_URL"))
        with pytest.raises(RuntimeError, match="tiny-vlm"):
            await asyncio.to_thread(other.load, "cpu")
        tier.close()
        bad.close()
    finally:
        await runner.cleanup()


def test_openai_vlm_needs_its_environment(monkeypatch):
    from models.vlm_openai import OpenAIVLMTier

    monkeypatch.delenv("NATIX_VLM_BASE_URL", raising=False)
    with pytest.raises(RuntimeError, match="NATIX_VLM_BASE_URL"):
        OpenAIVLMTier(spec("vlm.remote", "vlm_openai", "m")).load("cpu")
    assert json.dumps(OpenAIVLMTier(spec("vlm.remote", "vlm_openai", "m")).describe())


# ---- end to end: natix-miner train's code path, then the engine serving the tiny cascade ------


async def test_tiny_gpu_style_cascade_trains_and_serves(tiny, tmp_path):
    import yaml

    from cascade.config import load_cascade_config
    from cascade.engine import CascadeEngine
    from natix_miner.toolkit.training import run_training

    rng = np.random.default_rng(3)
    for label, colour in (("roadwork", (230, 120, 0)), ("no_roadwork", (60, 60, 60))):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(6):
            arr = np.clip(rng.normal(colour, 30, (60, 80, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / "data" / label / f"{i}.jpg")
    tiers = [
        {"name": "vit.tiny", "backend": "hf_classifier", "checkpoint": tiny["classifier"]},
        {"name": "dinov2.tiny_head", "backend": "hf_backbone_head", "checkpoint": tiny["dinov2"]},
        {"name": "siglip.tiny", "backend": "zero_shot", "checkpoint": tiny["siglip"],
         "options": {"templates": ["a photo of {}."]}},
        {"name": "rtdetr.tiny", "backend": "hf_detector", "checkpoint": tiny["rtdetr"]},
        {"name": "vlm.tiny", "backend": "vlm_transformers", "checkpoint": tiny["vlm"],
         "options": {"max_image_side": 64}},
    ]
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "artifacts_dir": str(tmp_path / "artifacts"), "engine": {"deadline_ms": 30000},
        "router": {"margin": 0.5, "min_tiers": 5},
        "tiers": [{**t, "device": "cpu", "max_batch_size": 2, "params_m": 1} for t in tiers],
        "devices": {"cpu": {"memory_gib": 4}}}), encoding="utf-8")

    reports = run_training(cfg_path, tmp_path / "data", split="all", val_split=None,
                           augment_copies=0, tiers=["dinov2.tiny_head"])
    assert Path(reports["dinov2.tiny_head"]["head"]).exists()

    engine = CascadeEngine(load_cascade_config(cfg_path), registry.build_tier)
    await engine.start()
    try:
        res = await engine.predict(images(1)[0], deadline_s=30.0)
        assert 0.0 <= res.prob <= 1.0 and not res.fallback and not res.failed
        assert set(res.tier_probs) == {t["name"] for t in tiers}
    finally:
        await engine.stop()


def test_gpu_smoke_script_cpu_path(tiny, tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys

    import yaml

    root = Path(__file__).resolve().parents[1]
    loader = importlib.util.spec_from_file_location("gpu_smoke", root / "scripts" / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(loader)
    monkeypatch.setitem(sys.modules, "gpu_smoke", smoke)
    loader.loader.exec_module(smoke)
    cfg = tmp_path / "smoke.yaml"
    cfg.write_text(yaml.safe_dump({"tiers": [
        {"name": "vit.tiny", "backend": "hf_classifier", "checkpoint": tiny["classifier"],
         "device": "cuda:0", "params_m": 0.1, "max_batch_size": 2},
        {"name": "clip.tiny", "backend": "zero_shot", "checkpoint": tiny["clip"], "device": "cuda:0"},
        {"name": "vit.wrong_labels", "backend": "hf_classifier", "checkpoint": tiny["classifier"],
         "enabled": False, "options": {"positive_labels": ["pothole"]}}],
        "devices": {"cuda:0": {"memory_gib": 24}}}), encoding="utf-8")
    out = tmp_path / "smoke.json"
    rc = smoke.main(["--config", str(cfg), "--device", "cpu", "--batch", "2", "--repeats", "1",
                     "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    reports = json.loads(out.read_text())
    assert [r["name"] for r in reports] == ["vit.tiny", "clip.tiny"] and all(r["ok"] for r in reports)
    assert all(len(r["probs"]) == 2 and len(r["batch_ms"]) == 1 for r in reports)
    assert "all tiers answered" in text
    # A tier that cannot load is reported and makes the exit status 1; the others still run.
    rc = smoke.main(["--config", str(cfg), "--device", "cpu", "--batch", "1", "--repeats", "1",
                     "--tiers", "vit.wrong_labels", "vit.tiny"])
    text = capsys.readouterr()
    assert rc == 1 and "FAILED" in text.out and "pothole" in text.out and "vit.wrong_labels" in text.err


async def test_engine_start_loads_transformers_tiers_one_at_a_time(tiny, tmp_path):
    """from_pretrained patches process-wide state (torch init functions, tie_weights) while it
    builds a model; loads on concurrent worker threads left D-FINE's parameters on the meta
    device. The engine serialises loads, so every tier starts and answers."""
    from cascade.config import parse_cascade_config
    from cascade.engine import CascadeEngine

    names = ("rtdetr", "dfine", "classifier", "clip", "siglip", "vlm")
    options = {"rtdetr": ANY_BOX, "dfine": ANY_BOX, "siglip": {"templates": ["a photo of {}."]},
               "vlm": {"max_image_side": 64}}
    backends = {"rtdetr": "hf_detector", "dfine": "hf_detector", "classifier": "hf_classifier",
                "clip": "zero_shot", "siglip": "zero_shot", "vlm": "vlm_transformers"}
    data = {"engine": {"deadline_ms": 30000}, "router": {"margin": 0.5, "min_tiers": len(names)},
            "tiers": [{"name": f"{n}.tiny", "backend": backends[n], "checkpoint": tiny[n],
                       "options": options.get(n, {}), "max_batch_size": 2} for n in names],
            "devices": {"cpu": {"memory_gib": 8}}}
    engine = CascadeEngine(parse_cascade_config(data, source="t.yaml", base_dir=str(tmp_path)),
                           registry.build_tier)
    await engine.start()
    try:
        res = await engine.predict(images(1)[0], deadline_s=30.0)
        assert not res.failed and len(res.tier_probs) == len(names)
    finally:
        await engine.stop()
