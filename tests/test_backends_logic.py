"""Backend logic that needs no model: detector evidence, the VLM log-probability readers,
vLLM engine arguments, `models pull`, and the GPU configs (they must parse and plan)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cascade.config import TierSpec, build_dataclass, load_cascade_config
from cascade.errors import ConfigError
from models.detection_evidence import Box, EvidenceOptions, image_probability, matching_classes
from models.vlm_common import (VLMOptions, answer_word, prob_from_id_logprobs, prob_from_logits,
                               prob_from_top_logprobs, shrink)

ROOT = Path(__file__).resolve().parents[1]

# ---- detection evidence -----------------------------------------------------------------------


def _opts(**kw) -> EvidenceOptions:
    return build_dataclass(EvidenceOptions, kw, source="t.yaml", prefix="options.evidence")


def test_noisy_or_over_roadwork_boxes():
    o = _opts(roadwork_classes=["traffic cone", "barrier"], prior=0.0, min_score=0.1,
              min_area_frac=0.0)
    boxes = [Box("Traffic cone", 0.6, (0, 0, 50, 50)), Box("barrier", 0.5, (100, 100, 200, 200)),
             Box("car", 0.99, (0, 0, 300, 300))]      # a car is not evidence
    p, ev = image_probability(boxes, 400, 400, o)
    assert p == pytest.approx(1 - 0.4 * 0.5)
    assert [b["label"] for b in ev["roadwork_boxes"]] == ["Traffic cone", "barrier"]
    assert ev["n_boxes"] == 3


def test_prior_is_the_leak_and_the_floor():
    o = _opts(prior=0.1, min_area_frac=0.0)
    assert image_probability([], 100, 100, o)[0] == pytest.approx(0.1)
    p, _ = image_probability([Box("traffic cone", 0.5, (0, 0, 10, 10))], 100, 100, o)
    assert p == pytest.approx(1 - 0.9 * 0.5)


def test_tiny_and_weak_boxes_do_not_count():
    o = _opts(prior=0.05, min_area_frac=0.01, min_score=0.3)
    tiny = Box("traffic cone", 0.95, (0, 0, 5, 5))          # 25 px of 10 000: 0.25 % < 1 %
    weak = Box("traffic cone", 0.2, (0, 0, 50, 50))
    big = Box("traffic cone", 0.4, (0, 0, 20, 20))          # exactly 4 %
    assert image_probability([tiny, weak], 100, 100, o)[0] == pytest.approx(0.05)
    assert image_probability([tiny, weak, big], 100, 100, o)[0] == pytest.approx(1 - 0.95 * 0.6)


def test_top_k_caps_duplicate_boxes_and_area_is_clipped_to_the_image():
    o = _opts(prior=0.0, top_k=2, min_area_frac=0.0)
    dupes = [Box("cone", 0.5, (0, 0, 10, 10)) for _ in range(20)]
    assert image_probability(dupes, 100, 100, o)[0] == pytest.approx(0.75)
    outside = Box("cone", 0.9, (-50, -50, 0, 0))
    assert outside.area_frac(100, 100) == 0.0
    assert Box("cone", 0.9, (-10, -10, 200, 200)).area_frac(100, 100) == pytest.approx(1.0)


def test_class_matching_is_case_and_separator_insensitive():
    assert matching_classes(["Traffic_cone", "Car", "machinery-vehicle"],
                            ["traffic cone", "Machinery Vehicle"]) == {"traffic cone", "machinery vehicle"}


def test_evidence_options_are_validated():
    with pytest.raises(ConfigError, match="prior"):
        _opts(prior=1.0)
    with pytest.raises(ConfigError, match="top_k"):
        _opts(top_k=0)
    with pytest.raises(ConfigError, match="unknown"):
        _opts(min_conf=0.3)


# ---- VLM log-probability readers ----------------------------------------------------------


def test_answer_words_cover_tokenizer_spellings():
    for tok in ("Yes", " Yes", "yes", "YES", "\u2581Yes", "\u0120yes", "Yes."):
        assert answer_word(tok) == "yes"
    for tok in ("No", " no", "NO", "\u2581No"):
        assert answer_word(tok) == "no"
    for tok in ("Yesterday", "None", "Not", "", "Maybe"):
        assert answer_word(tok) is None


def test_prob_from_known_logits():
    logits = np.full(10, -5.0)
    logits[[1, 2]] = [2.0, 1.0]          # yes spellings
    logits[[3]] = [0.5]                  # no
    p, ev = prob_from_logits(logits, yes_ids=[1, 2], no_ids=[3, 4])
    e = np.exp
    assert p == pytest.approx((e(2) + e(1)) / (e(2) + e(1) + e(0.5) + e(-5)))
    z = logits - (logits.max() + math.log(np.exp(logits - logits.max()).sum()))
    assert ev["lp_yes"] == pytest.approx(float(np.logaddexp(z[1], z[2])), abs=1e-4)
    # Adding the same constant to every logit changes nothing; huge logits do not overflow.
    assert prob_from_logits(logits + 1000.0, [1, 2], [3, 4])[0] == pytest.approx(p)


def test_prob_from_top_logprobs_sums_variants_and_bounds_a_missing_side():
    top = {"Yes": math.log(0.5), " yes": math.log(0.2), "No": math.log(0.1), "The": math.log(0.05)}
    p, ev = prob_from_top_logprobs(top)
    assert p == pytest.approx(0.7 / 0.8) and ev["bounded"] is False
    only_yes = [("Yes", math.log(0.9)), ("The", math.log(0.01))]
    p, ev = prob_from_top_logprobs(only_yes)
    assert ev["bounded"] is True and p == pytest.approx(0.9 / 0.91)  # no <= smallest listed
    # top_logprobs=1: the absent side is bounded by the mass left, not by the answer itself
    p, ev = prob_from_top_logprobs([("No", math.log(0.99))])
    assert ev["bounded"] is True and p == pytest.approx(0.01)
    p, _ = prob_from_id_logprobs({11: math.log(0.98)}, yes_ids=[11], no_ids=[20])
    assert p == pytest.approx(0.98)
    with pytest.raises(ValueError, match="neither Yes nor No"):
        prob_from_top_logprobs({"The": -0.1, "A": -2.0})
    with pytest.raises(ValueError):
        prob_from_top_logprobs({})


def test_prob_from_token_id_logprobs():
    lps = {11: math.log(0.3), 12: math.log(0.1), 20: math.log(0.4), 99: math.log(0.05)}
    p, ev = prob_from_id_logprobs(lps, yes_ids=[11, 12], no_ids=[20, 21])
    assert p == pytest.approx(0.4 / 0.8)
    with pytest.raises(ValueError):
        prob_from_id_logprobs({99: -0.1}, [11], [20])


def test_answer_token_ids_from_a_real_tokenizer():
    pytest.importorskip("tokenizers")
    from tests.test_backends_tiny_models import tiny_tokenizer
    from models.vlm_common import answer_token_ids

    tok, vocab = tiny_tokenizer(64, chat=True)
    yes, no = answer_token_ids(tok)
    assert set(yes) == {vocab["Yes"], vocab["yes"], vocab["YES"]}
    assert set(no) == {vocab["No"], vocab["no"], vocab["NO"]}


def test_shrink_keeps_aspect_and_small_images():
    from PIL import Image

    big = shrink(Image.new("RGB", (4032, 3024)), 896)
    assert big.size == (896, 672)
    small = Image.new("L", (200, 100))
    assert shrink(small, 896).size == (200, 100) and shrink(small, 896).mode == "RGB"


def test_vlm_options_validation():
    with pytest.raises(ConfigError, match="top_logprobs"):
        build_dataclass(VLMOptions, {"top_logprobs": 50}, source="t.yaml", prefix="options")


# ---- vLLM and Ultralytics backends without their libraries ----------------------------------


def test_vllm_engine_kwargs_pass_options_through():
    from models.vlm_vllm import Options, engine_kwargs

    o = build_dataclass(Options, {"quantization": "fp8", "gpu_memory_utilization": 0.5,
                                  "speculative_config": {"method": "eagle3", "num_speculative_tokens": 2},
                                  "engine_args": {"seed": 3}}, source="t", prefix="options")
    kw = engine_kwargs("Qwen/Qwen2.5-VL-7B-Instruct", "bfloat16", o)
    assert kw["quantization"] == "fp8" and kw["dtype"] == "bfloat16" and kw["seed"] == 3
    assert kw["gpu_memory_utilization"] == 0.5 and kw["enable_prefix_caching"] is True
    assert kw["speculative_config"]["method"] == "eagle3"
    assert kw["limit_mm_per_prompt"] == {"image": 1}
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        build_dataclass(Options, {"gpu_memory_utilization": 1.5}, source="t", prefix="options")


def test_vllm_device_pinning_restores_environment(monkeypatch):
    import os

    from models.vlm_vllm import _visible_device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with _visible_device("cuda:1"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with _visible_device("cuda:1"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_gpu_extras_fail_with_an_install_hint_when_absent():
    import importlib.util

    from models.registry import build_tier

    cases = {"vllm": ("vlm_vllm", "Qwen/Qwen2.5-VL-7B-Instruct"), "ultralytics": ("yolo", "yolo11n.pt")}
    for package, (backend, ckpt) in cases.items():
        tier = build_tier(TierSpec(name=f"{backend}.t", backend=backend, checkpoint=ckpt))
        if importlib.util.find_spec(package) is None:
            with pytest.raises(RuntimeError, match=f"pip install {package}"):
                tier.load("cpu")


# ---- configs and models pull -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpu-1x.yaml", "h100x2.yaml"])
def test_gpu_configs_parse_build_and_fit(name):
    from cascade.placement import plan_placement
    from models.registry import build_tier

    cfg = load_cascade_config(ROOT / "configs" / name)
    placement = plan_placement(cfg.active_tiers, cfg.devices)
    assert placement.fits, placement.problems
    for spec in cfg.tiers:                 # every tier's options validate (nothing is loaded)
        tier = build_tier(spec)
        assert tier.describe()["backend"] == spec.backend
        assert spec.params_m > 0 and spec.checkpoint


def test_h100_layout_is_the_plan():
    cfg = load_cascade_config(ROOT / "configs" / "h100x2.yaml")
    backends = {t.backend for t in cfg.active_tiers}
    assert {"hf_classifier", "hf_backbone_head", "zero_shot", "hf_detector", "yolo", "vlm_vllm"} <= backends
    assert set(cfg.devices) == {"cuda:0", "cuda:1"}


def _pull_args(config: Path, **kw):
    base = {"action": "pull", "config": config, "dest": None, "all_tiers": False, "dry_run": False}
    return SimpleNamespace(**{**base, **kw})


def test_models_pull_plans_every_hub_checkpoint():
    from natix_miner.commands.models_pull import plan_pulls

    pulls, notes = plan_pulls(ROOT / "configs" / "h100x2.yaml")
    repos = {p.repo_id for p in pulls}
    assert {"natix-network-org/roadwork", "facebook/dinov2-large", "google/siglip2-so400m-patch14-384",
            "ustc-community/dfine-xlarge-obj365", "Qwen/Qwen2.5-VL-7B-Instruct"} == repos
    assert any("Ultralytics asset" in n for n in notes)
    all_pulls, _ = plan_pulls(ROOT / "configs" / "h100x2.yaml", all_tiers=True)
    assert "OpenGVLab/InternVL3-8B" in {p.repo_id for p in all_pulls}


def test_models_pull_offline_fails_fast_naming_what_is_missing(tmp_path, monkeypatch, capsys):
    pytest.importorskip("huggingface_hub")
    from natix_miner.commands import models_pull

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = models_pull.run(_pull_args(ROOT / "configs" / "gpu-1x.yaml", dest=tmp_path / "hub"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "HF_HUB_OFFLINE" in err and "missing" in err
    for repo in ("natix-network-org/roadwork", "facebook/dinov2-base", "Qwen/Qwen2.5-VL-3B-Instruct"):
        assert repo in err
    assert "natix-miner models pull" in err


def test_models_pull_skips_local_and_remote_tiers(tmp_path, capsys):
    from natix_miner.commands import models_pull

    (tmp_path / "ckpt").mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tiers:\n"
                   "  - {name: a.local, backend: hf_classifier, checkpoint: ckpt}\n"
                   "  - {name: b.remote, backend: vlm_openai, checkpoint: Qwen/Qwen2.5-VL-7B-Instruct}\n",
                   encoding="utf-8")
    assert models_pull.run(_pull_args(cfg)) == 0
    assert "nothing to download" in capsys.readouterr().out


def test_models_pull_cli_help_and_bad_config(tmp_path, capsys):
    from natix_miner.cli import main

    with pytest.raises(SystemExit):
        main(["models", "--help"])
    assert "--dest" in capsys.readouterr().out
    assert main(["models", "pull", "--config", str(tmp_path / "nope.yaml")]) == 2


def test_models_pull_offline_succeeds_when_everything_is_cached(tmp_path, monkeypatch, capsys):
    pytest.importorskip("huggingface_hub")
    from natix_miner.commands import models_pull

    config = ROOT / "configs" / "gpu-1x.yaml"
    pulls, _ = models_pull.plan_pulls(config)
    dest = tmp_path / "hub"
    for pull in pulls:                     # the cache layout huggingface_hub writes
        repo = dest / f"models--{pull.repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text("0" * 40)
        snap = repo / "snapshots" / ("0" * 40)
        snap.mkdir(parents=True)
        (snap / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models_pull.run(_pull_args(config, dest=dest)) == 0
    out = capsys.readouterr().out
    assert all(f"ok {p.repo_id}" in out for p in pulls) and "HF_HUB_CACHE" in out
    assert models_pull.run(_pull_args(config, dest=dest, dry_run=True)) == 0


def test_vllm_prompt_template_overrides_the_chat_template():
    from models.registry import build_tier

    raw = "<|im_start|>user\n<image>\n{question}<|im_end|>\n<|im_start|>assistant\n"
    tier = build_tier(TierSpec(name="internvl.t", backend="vlm_vllm", checkpoint="OpenGVLab/InternVL3-8B",
                               options={"prompt_template": raw, "question": "Roadwork?"}))
    assert tier._chat_prompt("unused", tokenizer=None) == raw.replace("{question}", "Roadwork?")
    with pytest.raises(ConfigError, match="prompt_template"):
        build_tier(TierSpec(name="internvl.t", backend="vlm_vllm", options={"prompt_template": "no slot"}))
