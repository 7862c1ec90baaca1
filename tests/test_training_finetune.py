"""Fine-tuning (`train --mode finetune|lora`) on tiny models, offline: Gram anchoring, LoRA keeps
the base frozen, a planted signal is learnt end to end, and what training validated is what the
engine serves."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cascade.config import load_cascade_config
from cascade.errors import MissingArtifactError
from models.finetunable import LoraSettings, NetOptions
from models.heads import initial_head, load_head
from models.registry import build_tier
from natix_miner.cli import main
from natix_miner.toolkit.dataset import load_folder
from natix_miner.toolkit.finetune import FinetuneSettings, finetune
from natix_miner.toolkit.gram import gram_loss
from natix_miner.toolkit.training import Item

EFF = "effnet_lite0.tiny"
VIT = "dinov2_tiny.head"


@pytest.fixture(autouse=True, scope="module")
def _offline(hf_offline):
    yield


def planted(rng: np.random.Generator, positive: bool, side: int = 48) -> Image.Image:
    """Grey-noise scene; roadwork carries an orange patch somewhere (the planted signal)."""
    a = rng.integers(60, 200, (side, side, 3)).astype(np.uint8)
    if positive:
        s = side // 3
        x, y = rng.integers(0, side - s, 2)
        a[y:y + s, x:x + s] = (255, 120, 0)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    for sub, pos in (("roadwork", True), ("no_roadwork", False)):
        (root / sub).mkdir()
        for i in range(16):
            planted(rng, pos).save(root / sub / f"{i:02d}.png")
    return root


def eff_config(tmp_path: Path, size: int = 48) -> Path:
    cfg = tmp_path / "eff.yaml"
    cfg.write_text(f"""
artifacts_dir: {tmp_path / 'artifacts'}
tiers:
  - name: {EFF}
    backend: efficientnet_lite
    options: {{threads: 2, tiles: [], input_size: {size}}}
""")
    return cfg


@pytest.fixture(scope="module")
def finetuned(folder, tmp_path_factory):
    """One short EfficientNet-Lite0 fine-tune from an untrained head (p = 0.5: chance)."""
    tmp = tmp_path_factory.mktemp("ft")
    cfg = eff_config(tmp)
    report = tmp / "report.json"
    code = main(["train", "--config", str(cfg), "--images", str(folder), "--mode", "finetune",
                 "--head-init", "untrained", "--no-augment", "--epochs", "2", "--patience", "0",
                 "--lr-backbone", "1e-3", "--lr-head", "1e-2", "--batch", "8", "--seed", "1",
                 "--report", str(report)])
    assert code == 0
    return cfg, json.loads(report.read_text())[EFF]


def test_gram_term_is_zero_for_the_teacher_and_grows_with_drift():
    torch.manual_seed(0)
    teacher = torch.randn(2, 9, 16)
    assert float(gram_loss(teacher.clone(), teacher)) == pytest.approx(0.0, abs=1e-10)
    drift = [float(gram_loss(teacher + eps * torch.randn(2, 9, 16), teacher)) for eps in (0.1, 0.5, 2.0)]
    assert 0 < drift[0] < drift[1] < drift[2]
    # Scale alone is not drift: the Gram matrix is of L2-normalised patch features.
    assert float(gram_loss(3.0 * teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_gram_term_through_a_real_backbone(tmp_path):
    """Student == teacher gives 0 through the network; perturbing the student's weights grows it."""
    from models.efficientnet_lite import EfficientNetLiteTier

    cfg = eff_config(tmp_path, size=128)  # a 4x4 map of 16 patches
    tier = build_tier(load_cascade_config(cfg).tiers[0])
    assert isinstance(tier, EfficientNetLiteTier)
    tier.load_backbone("cpu")
    net = tier.training_net(initial_head(tier.feature_dim), NetOptions(gram=True)).eval()
    rng = np.random.default_rng(3)
    inputs = tier.collate_inputs([tier.train_inputs(planted(rng, bool(i % 2), side=128)) for i in range(2)])
    torch.manual_seed(0)
    with torch.no_grad():
        _, student = net(inputs, with_patches=True)
        assert student.shape == (2, 16, 1280)
        assert float(gram_loss(student, net.teacher_patches(inputs))) == pytest.approx(0.0, abs=1e-9)
        losses = []
        for eps in (0.01, 0.05, 0.2):
            for p, t in zip(net.backbone.parameters(), net.teacher.parameters()):
                p.copy_(t + eps * torch.randn_like(t) * t.abs().mean())
            _, student = net(inputs, with_patches=True)
            losses.append(float(gram_loss(student, net.teacher_patches(inputs))))
    assert 0 < losses[0] < losses[1] < losses[2]


def test_finetune_learns_a_planted_signal_from_chance(finetuned, folder):
    cfg, rep = finetuned
    assert rep["mode"] == "finetune" and rep["fit"]["init"] == "untrained"
    # The untrained head says 0.5 for everything: AUC 0.5 (chance); after two short epochs:
    assert rep["val"]["all"]["auc"] > 0.9
    hist = rep["finetune"]["history"]
    assert len(hist) == 2 and all("val_auc" in h for h in hist)
    spec = load_cascade_config(cfg).tiers[0]
    meta = json.loads(spec.artifact("head.json").read_text())
    assert meta["mode"] == "finetune" and meta["epochs_run"] == 2 and meta["best_epoch"] in (1, 2)
    assert meta["backbone"]["path"] == "backbone.safetensors" and len(meta["backbone"]["sha256"]) == 64
    assert meta["datasets"] == [str(folder.resolve())] and meta["metrics"]["all"]["auc"] > 0.9
    assert meta["finetune"]["lr_backbone"] == 1e-3 and meta["peak_rss_mib"] > 0
    assert spec.artifact("learning_curve.png").stat().st_size > 1000
    # The backbone moved away from the ImageNet weights.
    from safetensors.torch import load_file

    from models.efficientnet_lite import DEFAULTS, load_backbone_weights

    tuned = load_file(str(spec.artifact("backbone.safetensors")))
    base = load_backbone_weights(DEFAULTS["lite0"]).state_dict()
    assert any(not torch.equal(tuned[k], base[k]) for k in base if base[k].is_floating_point())


async def test_finetuned_checkpoint_served_by_the_engine_matches_training(finetuned, folder):
    from cascade.engine import CascadeEngine

    cfg, rep = finetuned
    trained = rep["val_predictions"]
    samples = {s.key: s for s in load_folder(folder)}
    engine = CascadeEngine(load_cascade_config(cfg), build_tier)
    await engine.start()
    try:
        for key, p_train in trained.items():
            result = await engine.predict(samples[key].load())
            assert result.raw_probs[EFF] == pytest.approx(p_train, abs=1e-5)
        weights = engine.health()["tiers"][EFF]["describe"]["backbone_weights"]
    finally:
        await engine.stop()
    assert weights["source"] == "finetuned" and weights["path"].endswith("backbone.safetensors")
    # The match is not luck: the same head on the ImageNet backbone answers differently.
    stale = build_tier(load_cascade_config(cfg).tiers[0])
    stale.load_finetuned_backbone = lambda found: None
    stale.load("cpu")
    keys = list(trained)
    out = stale.predict([samples[k].load() for k in keys])
    assert max(abs(o.prob - trained[k]) for o, k in zip(out, keys)) > 1e-3


def test_a_changed_backbone_file_is_refused(finetuned, tmp_path):
    import shutil

    cfg, _ = finetuned
    spec = load_cascade_config(cfg).tiers[0]
    copy_cfg = tmp_path / "eff.yaml"
    copy_cfg.write_text(cfg.read_text().replace(str(cfg.parent / "artifacts"), str(tmp_path / "artifacts")))
    shutil.copytree(spec.artifact(""), tmp_path / "artifacts" / EFF)
    spec2 = load_cascade_config(copy_cfg).tiers[0]
    tier = build_tier(spec2)
    tier.load("cpu")
    ident = tier.weights_identity()
    assert ident["source"] == "finetuned" and ident["sha256"] == load_head(spec2.artifact("head.pt")).info["backbone"]["sha256"]
    with open(spec2.artifact("backbone.safetensors"), "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(MissingArtifactError, match="sha256"):
        build_tier(spec2).load("cpu")
    spec2.artifact("backbone.safetensors").unlink()
    with pytest.raises(MissingArtifactError, match="trained on it"):
        build_tier(spec2).load("cpu")


def test_lora_is_refused_for_a_conv_backbone(folder, tmp_path):
    cfg = eff_config(tmp_path)
    assert main(["train", "--config", str(cfg), "--images", str(folder), "--mode", "lora",
                 "--tiers", EFF, "--epochs", "1"]) == 2


# ---- transformers ViT: LoRA -------------------------------------------------------------------

def build_dinov2(path: Path) -> str:
    from transformers import Dinov2Config, Dinov2Model
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    torch.manual_seed(0)
    cfg = Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, mlp_ratio=2)
    Dinov2Model(cfg).eval().save_pretrained(path)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return str(path)


def vit_config(tmp_path: Path, checkpoint: str) -> Path:
    cfg = tmp_path / "vit.yaml"
    cfg.write_text(f"""
artifacts_dir: {tmp_path / 'artifacts'}
tiers:
  - name: {VIT}
    backend: hf_backbone_head
    checkpoint: {checkpoint}
""")
    return cfg


@pytest.fixture(scope="module")
def vit(tmp_path_factory, folder):
    tmp = tmp_path_factory.mktemp("vit")
    return tmp, build_dinov2(tmp / "dinov2")


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_lora_trains_only_adapters_and_head_and_is_served_as_trained(vit, folder, tmp_path, merge):
    tmp, ckpt = vit
    cfg = vit_config(tmp_path, ckpt)
    tier = build_tier(load_cascade_config(cfg).tiers[0])
    tier.load_for_training("cpu")
    base_before = {k: v.clone() for k, v in tier.model.state_dict().items()}
    samples = load_folder(folder)
    train = [Item(s, "planted") for s in samples if s.split == "train"]
    val = [Item(s, "planted") for s in samples if s.split == "val"]
    head = initial_head(tier.feature_dim)
    settings = FinetuneSettings(mode="lora", epochs=1, batch_size=8, lr_backbone=5e-3, lr_head=1e-2,
                                augment=False, gram_weight=0.5, patience=0,
                                lora=LoraSettings(r=4, alpha=8, dropout=0.0, merge=merge))
    res = finetune(tier, train, val, head, settings, seed=0)
    peft_model = res.net.backbone
    adapters = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert any(float(p.detach().abs().sum()) > 0 for n, p in adapters.items() if "lora_B" in n)  # B starts at 0
    # Every non-adapter weight of the backbone is exactly what it was.
    base_after = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                  for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert set(base_after) == set(base_before)
    assert all(torch.equal(base_after[k], base_before[k]) for k in base_before)
    assert not torch.equal(res.net.head.w.detach(), torch.zeros_like(res.net.head.w))
    assert res.history[0]["gram"] is not None and res.history[0]["gram"] > 0

    head_path = tier.save_finetuned(res.net, {"mode": "lora", "head_info": {}})
    meta = load_head(head_path).info
    assert meta["backbone"]["kind"] == ("hf_dir" if merge else "peft_adapter")
    served = build_tier(load_cascade_config(cfg).tiers[0])
    served.load("cpu")
    out = served.predict([val[i].sample.load() for i in res.val_index])
    assert np.allclose([o.prob for o in out], res.val_probs, atol=1e-5)
    assert served.describe()["backbone_weights"]["sha256"] == meta["backbone"]["sha256"]
