"""Every transformers backend must point the right way: a planted signal the roadwork image must
score higher on than the plain one.

Random tiny models (`test_backends_tiny_models.py`) say nothing about direction: an inverted
tier (yes/no swapped, positive and negative prompts swapped, the wrong label) still returns
probabilities in [0, 1]. Here each tiny model gets a planted signal in its last layer, computed
from what the model itself sees of a roadwork image (an orange block) and a plain one, so that
the model's raw output separates them; the tier's own reading of that output (which label, which
answer token, which prompts are positive) must then rank roadwork first. Where a last layer cannot
be planted exactly (detectors), the model is a fake with outputs of the documented shape and the
tier's real post-processing runs on them. The planted weights never pass through the code under
test, so a mutation in the tier cannot move the plant with it.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.test_backends_tiny_models import (build_classifier, build_clip, build_dinov2,  # noqa: E402
                                             build_llava_vlm, build_rtdetr, build_siglip, spec)


def roadwork() -> Image.Image:
    arr = np.full((240, 320, 3), 95, np.uint8)
    arr[60:200, 90:250] = (240, 110, 10)
    return Image.fromarray(arr)


def plain() -> Image.Image:
    return Image.fromarray(np.full((240, 320, 3), 95, np.uint8))


class Capture:
    """Inputs of a module's forward, in call order."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self._handle = module.register_forward_hook(lambda m, args, out: self.inputs.append(args[0].detach().clone()))

    def close(self) -> None:
        self._handle.remove()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("planted")
    return {name: fn(root / name) for name, fn in {
        "classifier": build_classifier, "clip": build_clip, "siglip": build_siglip,
        "vlm": build_llava_vlm, "rtdetr": build_rtdetr, "dinov2": build_dinov2}.items()}


def _ranked(tier) -> tuple[float, float]:
    road, flat = tier.predict([roadwork(), plain()])
    assert not isinstance(road, Exception) and not isinstance(flat, Exception), (road, flat)
    return road.prob, flat.prob


# ---- hf_classifier: the roadwork logit reads the feature that separates the two images -------


def test_classifier_ranks_roadwork_first(ckpts):
    from models.hf_classifier import HFClassifierTier

    tier = HFClassifierTier(spec("vit.planted", "hf_classifier", ckpts["classifier"]))
    tier.load("cpu")
    head = tier.model.classifier
    cap = Capture(head)
    tier.predict([roadwork(), plain()])
    cap.close()
    x_road, x_plain = cap.inputs[0][0], cap.inputs[0][1]
    d = x_road - x_plain
    with torch.no_grad():  # label 1 is "Roadwork" in the checkpoint's config
        head.weight[1] = 2.0 * d / d.dot(d)
        head.weight[0] = -2.0 * d / d.dot(d)
        head.bias.zero_()
    road, flat = _ranked(tier)
    assert road > flat and road - flat > 0.5


# ---- zero_shot: the text projection maps the positive prompt onto the roadwork image ---------


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_zero_shot_ranks_roadwork_first(ckpts, family):
    from models.zero_shot import ZeroShotTier

    tier = ZeroShotTier(spec(f"{family}.planted", "zero_shot", ckpts[family],
                             positive_prompts=["road work"], negative_prompts=["an empty road"],
                             templates=["a photo of {}."]))
    tier.load("cpu")
    model, tok = tier.model, tier.processor.tokenizer
    proj = model.text_projection if family == "clip" else model.text_model.head
    # what the text tower hands the projection for each prompt, identified by its own words
    ids: list[torch.Tensor] = []
    pre = model.text_model.register_forward_pre_hook(
        lambda m, args, kwargs: ids.append((kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                                            else args[0]).clone()), with_kwargs=True)
    cap = Capture(proj)
    tier._text = tier._encode_concepts()
    pre.remove()
    cap.close()
    texts = [tok.decode(i[0], skip_special_tokens=True) for i in ids]
    pooled = [x[0] if x.ndim == 2 else x[0, -1] for x in cap.inputs]
    u_pos = pooled[next(i for i, t in enumerate(texts) if "work" in t)]
    u_neg = pooled[next(i for i, t in enumerate(texts) if "empty" in t)]
    with torch.inference_mode():
        emb = model.get_image_features(**tier.processor(images=[roadwork(), plain()], return_tensors="pt"))
    emb = emb if isinstance(emb, torch.Tensor) else emb.pooler_output
    emb = emb / emb.norm(dim=-1, keepdim=True)
    delta = emb[0] - emb[1]
    u = torch.stack([u_pos, u_neg], dim=1)  # [D, 2]
    w = u @ torch.linalg.solve(u.T @ u, torch.tensor([1.0, -1.0]))  # w.u_pos = 1, w.u_neg = -1
    with torch.no_grad():
        proj.weight.copy_(torch.outer(delta, w))
        if getattr(proj, "bias", None) is not None:
            proj.bias.zero_()
    tier._text = tier._encode_concepts()
    road, flat = _ranked(tier)
    assert road > 0.5 > flat


# ---- vlm_transformers: the yes rows of the LM head read what separates the two images --------


def test_transformers_vlm_ranks_roadwork_first(ckpts):
    from models.vlm_transformers import TransformersVLMTier

    tier = TransformersVLMTier(spec("vlm.planted", "vlm_transformers", ckpts["vlm"], max_image_side=64))
    tier.load("cpu")
    head = tier.model.get_output_embeddings()
    cap = Capture(head)
    tier.predict([roadwork(), plain()])
    cap.close()
    h = cap.inputs[0][:, -1, :]
    d = h[0] - h[1]
    assert d.norm() > 0, "the image does not reach the answer position"
    tok = tier.processor.tokenizer
    yes = [tok.convert_tokens_to_ids(t) for t in ("Yes", "yes", "YES")]
    no = [tok.convert_tokens_to_ids(t) for t in ("No", "no", "NO")]
    with torch.no_grad():
        for i in yes:
            head.weight[i] = 3.0 * d / d.dot(d)
        for i in no:
            head.weight[i] = -3.0 * d / d.dot(d)
    road, flat = _ranked(tier)
    assert road > flat  # logit(yes) - logit(no) differs by 12 between the two images
    assert tier.predict([roadwork()])[0].evidence["lp_yes"] > tier.predict([plain()])[0].evidence["lp_yes"]


# ---- hf_detector: a fake model of the documented output shape, real post-processing ----------


class FakeDetector(torch.nn.Module):
    """RT-DETR-shaped outputs: logits [B, Q, C] and pred_boxes [B, Q, 4] (cx, cy, w, h in 0..1).
    A box of class `cone` where the pixels are orange; a confident car everywhere."""

    def __init__(self, config, cone: int, car: int) -> None:
        super().__init__()
        self.config = config
        self.cone, self.car = cone, car

    def forward(self, pixel_values, **kwargs):
        from types import SimpleNamespace

        b, _, h, w = pixel_values.shape
        logits = torch.full((b, 4, len(self.config.id2label)), -10.0)
        boxes = torch.full((b, 4, 4), 0.25)
        for i in range(b):
            px = pixel_values[i]
            mask = (px[0] > 0.8) & (px[1] > 0.3) & (px[1] < 0.6) & (px[2] < 0.2)
            logits[i, 0, self.car] = 3.0
            boxes[i, 0] = torch.tensor([0.2, 0.8, 0.3, 0.3])
            if mask.float().mean() > 0.01:
                ys, xs = torch.nonzero(mask, as_tuple=True)
                x0, x1, y0, y1 = xs.min() / w, (xs.max() + 1) / w, ys.min() / h, (ys.max() + 1) / h
                logits[i, 1, self.cone] = 2.0
                boxes[i, 1] = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0])
        return SimpleNamespace(logits=logits, pred_boxes=boxes)


def test_detector_ranks_roadwork_first(ckpts):
    from models.hf_detector import HFDetectorTier

    tier = HFDetectorTier(spec("rtdetr.planted", "hf_detector", ckpts["rtdetr"],
                               evidence={"roadwork_classes": ["Traffic cone"], "min_score": 0.3,
                                         "min_area_frac": 0.01, "prior": 0.05}))
    tier.load("cpu")
    labels = {v: int(k) for k, v in tier.model.config.id2label.items()}
    tier.model = FakeDetector(tier.model.config, labels["Traffic cone"], labels["car"])
    road, flat = tier.predict([roadwork(), plain()])
    assert flat.prob == pytest.approx(0.05)  # a car is not evidence
    assert road.prob == pytest.approx(1 - 0.95 * (1 - torch.sigmoid(torch.tensor(2.0)).item()), abs=1e-4)
    box = road.evidence["roadwork_boxes"][0]["xyxy"]
    assert box == pytest.approx([90, 60, 250, 200], abs=6)  # scaled back to the image


# ---- hf_backbone_head: the head trained by `natix-miner train` on planted labels -------------


def test_backbone_head_trained_on_planted_labels_ranks_roadwork_first(ckpts, tmp_path):
    from models.hf_backbone_head import HFBackboneHeadTier

    rng = np.random.default_rng(2)
    ims, labels = [], []
    for i in range(16):
        arr = np.clip(rng.normal(95, 12, (120, 160, 3)), 0, 255).astype(np.uint8)
        if i % 2 == 0:
            y, x = rng.integers(10, 50), rng.integers(10, 80)
            arr[y:y + 60, x:x + 70] = (240, 110, 10)
        ims.append(Image.fromarray(arr))
        labels.append(1 - i % 2)
    trainer = HFBackboneHeadTier(spec("dinov2.planted", "hf_backbone_head", ckpts["dinov2"], tmp_path))
    trainer.load_backbone("cpu")
    trainer.fit_head(trainer.embed(ims), labels, seed=0)
    trainer.save_head({"source": "planted test"})
    tier = HFBackboneHeadTier(spec("dinov2.planted", "hf_backbone_head", ckpts["dinov2"], tmp_path))
    tier.load("cpu")
    road, flat = _ranked(tier)
    assert road > 0.5 > flat


# ---- vlm_openai: the server answers from the image it was sent --------------------------------


async def test_openai_vlm_ranks_roadwork_first(monkeypatch):
    import base64
    import io

    web = pytest.importorskip("aiohttp.web")
    from models.vlm_openai import OpenAIVLMTier

    async def chat(request):
        body = await request.json()
        url = body["messages"][0]["content"][0]["image_url"]["url"]
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        arr = np.asarray(image).astype(int)
        orange = ((arr[..., 0] > 200) & (arr[..., 2] < 80)).mean() > 0.05
        p = 0.9 if orange else 0.1
        top = [{"token": "Yes", "logprob": float(np.log(p))}, {"token": "No", "logprob": float(np.log(1 - p))}]
        return web.json_response({"choices": [{"logprobs": {"content": [
            {"token": top[0]["token"], "logprob": top[0]["logprob"], "top_logprobs": top}]}}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]
        monkeypatch.setenv("PLANTED_VLM_URL", f"http://127.0.0.1:{port}")
        tier = OpenAIVLMTier(spec("vlm.remote", "vlm_openai", "m", base_url_env="PLANTED_VLM_URL",
                                  check_model_at_load=False, max_image_side=64))
        await asyncio.to_thread(tier.load, "cpu")
        road, flat = await asyncio.to_thread(tier.predict, [roadwork(), plain()])
        assert road.prob == pytest.approx(0.9, abs=1e-6) and flat.prob == pytest.approx(0.1, abs=1e-6)
        tier.close()
    finally:
        await runner.cleanup()
