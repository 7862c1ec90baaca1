"""The GPU-extra backends (vLLM, Ultralytics) in CI, against fake library objects.

`vllm` and `ultralytics` cannot be installed here, so each test puts a fake module of the same
name in `sys.modules` whose objects return the documented output shapes: `vllm.LLM.generate` ->
`RequestOutput.outputs[0].logprobs`, one `{token_id: Logprob}` per generated token (honouring
`SamplingParams.max_tokens` and `logprobs`); `ultralytics.YOLO.predict` -> `Results` with `names`
and `boxes.xyxy / .conf / .cls` tensors (honouring `conf`). Both fakes see a planted signal: an
orange block in the image is roadwork. The tiers' own parsing then runs unchanged, and a tier that
points the wrong way (yes/no swapped, the wrong token position, the confidence floor ignored)
fails here. Where the real package is installed, `test_backends_tiny_models.py` also runs YOLO
through Ultralytics itself.

The device-binding test runs the real engine start-up with the vLLM tier and two other tiers
recording the environment they saw while loading: vLLM must be created with its card in
CUDA_VISIBLE_DEVICES, and no other tier may ever see that value.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import types
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
from PIL import Image

from cascade.config import TierSpec, parse_cascade_config
from cascade.tier import Tier, TierOutput

torch = pytest.importorskip("torch")


def roadwork_image() -> Image.Image:
    arr = np.full((480, 640, 3), 90, np.uint8)
    arr[200:400, 250:420] = (240, 110, 10)  # a big orange block: the planted roadwork
    return Image.fromarray(arr)


def plain_image() -> Image.Image:
    return Image.fromarray(np.full((480, 640, 3), 90, np.uint8))


def orange_box(image: Image.Image) -> Optional[tuple[float, float, float, float]]:
    """Pixel box of the orange region, None when there is (almost) none."""
    arr = np.asarray(image.convert("RGB")).astype(int)
    mask = (arr[..., 0] > 200) & (arr[..., 1] > 80) & (arr[..., 1] < 150) & (arr[..., 2] < 60)
    if mask.mean() < 0.01:
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


# ---- a fake vllm -----------------------------------------------------------------------------


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


def fake_vllm(tokenizer, seen: list, *, load_s: float = 0.0) -> types.ModuleType:
    """A `vllm` module: LLM records its kwargs and the CUDA_VISIBLE_DEVICES it was created under."""
    yes = tokenizer.convert_tokens_to_ids("Yes")
    no = tokenizer.convert_tokens_to_ids("No")
    other = tokenizer.convert_tokens_to_ids("The") if "The" in tokenizer.get_vocab() else 7
    mod = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, **kwargs):
            seen.append({"kwargs": kwargs, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")})
            time.sleep(load_s)
            self.generated: list[int] = []

        def get_tokenizer(self):
            return tokenizer

        def generate(self, requests, sampling_params, use_tqdm=True):
            outs = []
            for req in requests:
                image = req["multi_modal_data"]["image"]
                p_yes = 0.85 if orange_box(image) is not None else 0.1
                positions = []
                for step in range(sampling_params.max_tokens):
                    # the answer, then (if more tokens were asked) a continuation that means nothing
                    p = p_yes if step == 0 else 1.0 - p_yes
                    top = {yes: Logprob(math.log(p * 0.95), decoded_token="Yes"),
                           no: Logprob(math.log((1 - p) * 0.95), decoded_token="No"),
                           other: Logprob(math.log(0.05), decoded_token="The")}
                    ranked = sorted(top.items(), key=lambda kv: -kv[1].logprob)[: sampling_params.logprobs]
                    positions.append(dict(ranked))
                self.generated.append(sampling_params.max_tokens)
                completion = SimpleNamespace(index=0, text="Yes" if p_yes > 0.5 else "No",
                                             token_ids=[yes if p_yes > 0.5 else no], logprobs=positions)
                outs.append(SimpleNamespace(request_id=str(len(outs)), prompt=req["prompt"],
                                            outputs=[completion], finished=True))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


@pytest.fixture
def chat_tokenizer(tmp_path):
    """The tokenizer the fake LLM serves, also saved as the (local) checkpoint the tier reads
    its chat template from: no hub lookup, whatever HF_HUB_OFFLINE says."""
    pytest.importorskip("transformers")
    from tests.test_backends_tiny_models import TEMPLATE, tiny_tokenizer

    tok, _ = tiny_tokenizer(512, chat=True)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp_path / "qwen-fake")
    tok.checkpoint = str(tmp_path / "qwen-fake")
    return tok


def vllm_spec(checkpoint: str, device: str = "cuda:1", **options) -> TierSpec:
    return TierSpec(name="qwen.fake", backend="vlm_vllm", checkpoint=checkpoint,
                    device=device, dtype="bfloat16", params_m=3755, options=options, source="test.yaml")


def test_vllm_tier_scores_roadwork_above_plain(chat_tokenizer, monkeypatch):
    from models.vlm_vllm import VLLMTier

    seen: list = []
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(chat_tokenizer, seen))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    tier = VLLMTier(vllm_spec(chat_tokenizer.checkpoint, max_image_side=64))
    tier.load("cuda:1")
    assert seen[0]["CUDA_VISIBLE_DEVICES"] == "1" and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert seen[0]["kwargs"]["gpu_memory_utilization"] == 0.45
    assert tier.sampling.max_tokens == 1 and tier.sampling.logprobs == 20
    assert set(tier.sampling.allowed_token_ids) == set(tier.yes_ids + tier.no_ids)
    assert "<image>" in tier.prompt and tier.prompt.endswith("assistant\n")  # the chat template
    road, plain = tier.predict([roadwork_image(), plain_image()])
    assert road.prob > 0.7 > 0.3 > plain.prob
    assert road.prob == pytest.approx(0.85 / (0.85 + 0.15), abs=1e-6)
    assert road.evidence["bounded"] is False
    tier.close()


def test_vllm_reads_the_answer_token_not_a_later_one():
    """`CompletionOutput.logprobs` has one entry per generated token; the answer is the first.
    Here the second position (as vLLM returns for max_tokens=2) says the opposite."""
    from models.vlm_vllm import first_token_logprobs

    answer = {11: Logprob(math.log(0.9)), 20: Logprob(math.log(0.05))}
    later = {11: Logprob(math.log(0.05)), 20: Logprob(math.log(0.9))}
    out = SimpleNamespace(outputs=[SimpleNamespace(logprobs=[answer, later])])
    assert first_token_logprobs(out) == pytest.approx({11: math.log(0.9), 20: math.log(0.05)})
    with pytest.raises(ValueError, match="no log-probabilities"):
        first_token_logprobs(SimpleNamespace(outputs=[SimpleNamespace(logprobs=None)]))


def test_vllm_per_item_errors_and_memory_needs(chat_tokenizer, monkeypatch):
    from models.vlm_vllm import VLLMTier

    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(chat_tokenizer, []))
    tier = VLLMTier(vllm_spec(chat_tokenizer.checkpoint, gpu_memory_utilization=0.6))
    needs = tier.memory_needs()
    assert needs.device_fraction == 0.6 and needs.params is None  # no config on disk here
    tier.load("cuda:0")
    tier.llm.generate = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("engine dead"))
    outs = tier.predict([plain_image(), plain_image()])
    assert len(outs) == 2 and all(isinstance(o, RuntimeError) for o in outs)


# ---- device binding without races (issue 8.3) --------------------------------------------------


class EnvRecorder(Tier):
    """Records CUDA_VISIBLE_DEVICES while it loads (slowly, so concurrent loads would overlap)."""

    log: list = []

    def load(self, device: str) -> None:
        EnvRecorder.log.append(("start", self.name, time.monotonic()))
        for _ in range(10):
            self.seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
            time.sleep(0.02)
        EnvRecorder.log.append(("end", self.name, time.monotonic()))

    def __init__(self, spec):
        super().__init__(spec)
        self.seen: list = []

    def predict(self, images):
        return [TierOutput(0.5) for _ in images]


async def test_vllm_loads_alone_and_no_other_tier_sees_its_device_pin(chat_tokenizer, monkeypatch):
    from cascade.engine import CascadeEngine
    from models.registry import build_tier

    seen: list = []
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(chat_tokenizer, seen, load_s=0.3))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    EnvRecorder.log = []
    data = {"tiers": [
        {"name": "vit.first", "backend": "recorder", "device": "cuda:0", "params_m": 1},
        {"name": "qwen.fake", "backend": "vlm_vllm", "checkpoint": chat_tokenizer.checkpoint,
         "device": "cuda:1", "dtype": "bfloat16", "params_m": 3755,
         "options": {"max_image_side": 64, "gpu_memory_utilization": 0.5}},
        {"name": "clip.last", "backend": "recorder", "device": "cuda:0", "params_m": 1}],
        "devices": {"cuda:0": {"memory_gib": 24}, "cuda:1": {"memory_gib": 24}}}
    cfg = parse_cascade_config(data, source="test.yaml", base_dir=".")
    vllm_done: list = []
    made: dict = {}

    def factory(spec):
        if spec.backend == "vlm_vllm":
            tier = build_tier(spec)
            real_load = tier.load

            def load(device):
                real_load(device)
                vllm_done.append(time.monotonic())

            tier.load = load
        else:
            tier = EnvRecorder(spec)
        made[spec.name] = tier
        return tier

    engine = CascadeEngine(cfg, factory)
    await engine.start()
    try:
        assert seen[0]["CUDA_VISIBLE_DEVICES"] == "1"  # vLLM's engine was created on its card
        for name in ("vit.first", "clip.last"):
            assert set(made[name].seen) == {None}, made[name].seen  # never saw the pin
        starts = [t for kind, _, t in EnvRecorder.log if kind == "start"]
        assert min(starts) >= vllm_done[0]  # nothing else loaded while vLLM was starting
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
        res = await engine.predict(roadwork_image())
        assert "qwen.fake" in res.tier_probs or res.stopped_after == "vit.first"
    finally:
        await engine.stop()


def test_vllm_refuses_when_its_start_narrowed_the_miners_cuda_view(chat_tokenizer, monkeypatch):
    from models import vlm_vllm

    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(chat_tokenizer, []))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    state = iter([False, True])  # not initialised before LLM(), initialised after
    monkeypatch.setattr(vlm_vllm, "_cuda_initialised", lambda: next(state))
    with pytest.raises(RuntimeError, match="vllm serve"):
        vlm_vllm.VLLMTier(vllm_spec(chat_tokenizer.checkpoint)).load("cuda:1")


# ---- a fake ultralytics ------------------------------------------------------------------------


def fake_ultralytics(calls: list) -> types.ModuleType:
    mod = types.ModuleType("ultralytics")

    class Boxes:
        def __init__(self, rows):
            self.xyxy = torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(-1, 4)
            self.conf = torch.tensor([r[1] for r in rows], dtype=torch.float32)
            self.cls = torch.tensor([float(r[2]) for r in rows], dtype=torch.float32)

    class YOLO:
        def __init__(self, weights):
            self.weights = weights
            self.names = {0: "person", 1: "car", 2: "traffic cone"}

        def set_classes(self, classes):
            calls.append(("set_classes", list(classes)))
            self.names = dict(enumerate(classes))

        def predict(self, images, conf=0.25, iou=0.7, imgsz=640, device=None, half=False, verbose=True):
            calls.append(("predict", {"conf": conf, "iou": iou, "imgsz": imgsz, "device": device,
                                      "half": half, "n": len(images)}))
            by_name = {v: k for k, v in self.names.items()}
            results = []
            for im in images:
                rows = [((5.0, 5.0, 200.0, 150.0), 0.9, by_name["car"])]  # a distractor, always
                box = orange_box(im)
                if box is not None:
                    rows.append((box, 0.8, by_name["traffic cone"]))
                rows = [r for r in rows if r[1] >= conf]  # what `conf` does in Ultralytics
                results.append(SimpleNamespace(names=dict(self.names), boxes=Boxes(rows)))
            return results

    mod.YOLO = YOLO
    return mod


def yolo_spec(**options) -> TierSpec:
    return TierSpec(name="yolo.fake", backend="yolo", checkpoint="yolo11x.pt", device="cpu",
                    options=options, source="test.yaml")


def test_yolo_tier_scores_roadwork_above_plain(monkeypatch):
    from models.yolo_detector import YoloTier

    calls: list = []
    monkeypatch.setitem(sys.modules, "ultralytics", fake_ultralytics(calls))
    tier = YoloTier(yolo_spec(evidence={"roadwork_classes": ["traffic cone"], "min_score": 0.3,
                                        "prior": 0.05}))
    tier.load("cpu")
    road, plain = tier.predict([roadwork_image(), plain_image()])
    assert plain.prob == pytest.approx(0.05)  # the car is not evidence: only the prior
    assert road.prob == pytest.approx(1 - 0.95 * 0.2) and road.prob > plain.prob
    assert [b["label"] for b in road.evidence["roadwork_boxes"]] == ["traffic cone"]
    assert road.evidence["n_boxes"] == 2
    kw = dict(calls[-1][1])
    assert kw["conf"] == 0.3 and kw["device"] == "cpu" and kw["half"] is False and kw["n"] == 2
    tier.close()


def test_yolo_world_prompts_its_vocabulary_and_refuses_a_model_without_roadwork_classes(monkeypatch):
    from models.yolo_detector import YoloTier

    calls: list = []
    monkeypatch.setitem(sys.modules, "ultralytics", fake_ultralytics(calls))
    world = YoloTier(yolo_spec(open_vocabulary=True, extra_classes=["car"],
                               evidence={"roadwork_classes": ["traffic cone", "barrier"]}))
    world.load("cpu")
    assert calls[0] == ("set_classes", ["traffic cone", "barrier", "car"])
    road, plain = world.predict([roadwork_image(), plain_image()])
    assert road.prob > plain.prob
    fixed = YoloTier(yolo_spec(evidence={"roadwork_classes": ["excavator"]}))
    with pytest.raises(ValueError, match="traffic cone"):
        fixed.load("cpu")
    # a broken batch costs each item its own slot
    world.model.predict = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA OOM"))
    outs = world.predict([plain_image(), plain_image()])
    assert all(isinstance(o, RuntimeError) for o in outs)
