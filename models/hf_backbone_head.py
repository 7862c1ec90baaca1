"""Foundation-backbone tier: a frozen transformers vision backbone (DINOv2, DINOv3, any
`AutoModel` image encoder) with pooled features and a small trained head.

Origin: Meta DINOv2 (`facebook/dinov2-large`, `dinov2-with-registers-large`, Apache-2.0) and
DINOv3 (`facebook/dinov3-vitl16-pretrain-lvd1689m`, `dinov3-vith16plus-...`, DINOv3 licence,
gated on the hub: accept it there first). Licence: that of the checkpoint.

Features are [CLS token, mean of patch tokens] of the last layer (register tokens excluded), the
standard linear-probe recipe of the DINO papers; the head (logistic or one-hidden-layer MLP) is
fitted by `natix-miner train` in the same file format as every backbone+head tier
(`models.heads`, `<artifacts_dir>/<tier>/head.pt`).

Fine-tuning (`natix-miner train --mode finetune|lora`, `HFTrainingNet`): the whole backbone, or
LoRA adapters (peft) on the attention / MLP projections of its blocks, trained with the head.
What training writes the tier loads with no extra setting (`load_finetuned_backbone`): a full
`backbone/` directory (finetune, or LoRA merged) or an `adapter/` directory (LoRA kept separate,
merged into the base checkpoint at load; needs peft), checked against the sha256 in head.json.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from loguru import logger
from PIL import Image

from cascade.config import TierSpec
from cascade.errors import ConfigError, MissingArtifactError
from cascade.tier import TierOutput, TrainableTier
from models import backbone_weights
from models.hf_common import TransformersTierMixin
from models._torch_utils import (checkpoint_or_raise, clamp_prob, per_item, release, resolve_device,
                                 rgb, to_device, torch_dtype)
from models.finetunable import FineTunable, NetOptions, TrainingNet, linear_names_in_blocks
from models.heads import HEAD_KINDS, Head, HeadMixin, head_from_torch, torch_head

POOLINGS = ("cls_mean", "cls", "mean")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Options:
    """Settings of an `hf_backbone_head` tier (YAML `options:`)."""

    # Pooled feature: "cls_mean" (concat CLS and mean patch token), "cls" or "mean".
    pooling: str = "cls_mean"
    # Square input side; None = the checkpoint's processor default (224 for DINOv2/v3).
    # ViTs interpolate position embeddings, so 448 sees small signs better at 4x the cost.
    image_size: Optional[int] = None
    # Images per forward pass inside one predict/embed call.
    batch_size: int = 16
    # Head fitted by `natix-miner train`: logistic or mlp (one hidden layer).
    head: str = "logistic"
    # Hidden units of the MLP head.
    head_hidden: int = 256
    # Fixed L2 strength for the head; null = choose from a grid by held-out loss.
    head_l2: Optional[float] = None

    def validate(self, source: str, prefix: str) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(source, f"{prefix}.pooling", f"one of {list(POOLINGS)}", self.pooling)
        if self.image_size is not None and not 28 <= self.image_size <= 1024:
            raise ConfigError(source, f"{prefix}.image_size", "null or an integer in [28, 1024]",
                              self.image_size)
        if self.batch_size < 1:
            raise ConfigError(source, f"{prefix}.batch_size", "an integer >= 1", self.batch_size)
        if self.head not in HEAD_KINDS:
            raise ConfigError(source, f"{prefix}.head", f"one of {list(HEAD_KINDS)}", self.head)


def pool_features(hidden: torch.Tensor, pooler: Optional[torch.Tensor], n_prefix: int,
                  pooling: str) -> torch.Tensor:
    """[B, D'] features from a backbone's last hidden state.

    ViT-like [B, T, D]: token 0 is CLS, tokens 1..n_prefix-1 are registers, the rest patches.
    Conv-like [B, C, H, W]: the spatial mean stands for both (CLS := pooler output if any).
    """
    if hidden.ndim == 4:
        mean = hidden.mean(dim=(2, 3))
        cls = pooler.reshape(pooler.shape[0], -1) if pooler is not None else mean
    else:
        cls = hidden[:, 0]
        mean = hidden[:, n_prefix:].mean(dim=1)
    if pooling == "cls":
        return cls
    if pooling == "mean":
        return mean
    return torch.cat([cls, mean], dim=-1)


class HFBackboneHeadTier(TransformersTierMixin, HeadMixin, FineTunable, TrainableTier):
    """Foundation backbone features (frozen, fine-tuned or LoRA-adapted) -> trained head."""

    Options = Options
    finetune_modes = ("finetune", "lora")
    auto_class = "AutoModel"

    def __init__(self, spec: TierSpec) -> None:
        super().__init__(spec)
        self.model = None
        self.processor = None
        self.head = None
        self._dtype = torch.float32
        self._n_prefix = 1
        self._norm: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None
        self._weights: Optional[dict[str, str]] = None

    # ---- identity of the features ------------------------------------------------------------

    def feature_signature(self) -> str:
        key = {"backend": self.spec.backend, "checkpoint": self.spec.checkpoint,
               "pooling": self.options.pooling, "image_size": self.options.image_size}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def head_options(self) -> dict[str, Any]:
        return {"kind": self.options.head, "hidden": self.options.head_hidden,
                "l2": self.options.head_l2}

    @property
    def feature_dim(self) -> int:
        if self.model is None:
            raise RuntimeError(f"tier {self.name}: backbone not loaded")
        cfg = self.model.config
        width = getattr(cfg, "hidden_size", None) or (getattr(cfg, "hidden_sizes", None) or [0])[-1]
        return int(width) * (2 if self.options.pooling == "cls_mean" else 1)

    # ---- lifecycle ----------------------------------------------------------------------------

    def load_backbone(self, device: str, dtype: Optional[torch.dtype] = None) -> None:
        """The checkpoint's backbone and processor; `dtype` overrides the spec's (training: fp32)."""
        from transformers import AutoImageProcessor, AutoModel

        path = checkpoint_or_raise(self.spec)
        self.device = resolve_device(device)
        self._dtype = dtype or torch_dtype(self.spec.dtype, self.device)
        try:
            self.processor = AutoImageProcessor.from_pretrained(path)
        except (ImportError, OSError, ValueError) as exc:
            # e.g. DINOv3's processor exists only as a torchvision "fast" processor.
            self.processor = None
            self._norm = _normalisation_from_config(path)
            logger.warning("tier {}: image processor unavailable ({}: {}); using resize + "
                           "normalise {}", self.name, type(exc).__name__,
                           " ".join(str(exc).split())[:200], self._norm)
        model = AutoModel.from_pretrained(path, dtype=self._dtype)
        self.model = model.to(self.device).eval()
        self._n_prefix = 1 + int(getattr(self.model.config, "num_register_tokens", 0) or 0)
        self._weights = {"source": "pretrained", "path": path}

    def load(self, device: str) -> None:
        # The head first: a missing head (or the fine-tuned backbone it names) fails fast,
        # before seconds of weight loading.
        self._load_head()
        finetuned = self.finetuned_backbone()
        self.load_backbone(device)
        if finetuned is not None:
            self.load_finetuned_backbone(finetuned)
        if self.head.feature_dim != self.feature_dim:
            raise MissingArtifactError(
                f"trained head for tier {self.name} at {self.head_path()} (feature dim "
                f"{self.head.feature_dim}, backbone gives {self.feature_dim})", fix=self.fix_command())

    def close(self) -> None:
        model, self.model = self.model, None
        release(model)

    # ---- features -----------------------------------------------------------------------------

    def _pixels(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        size = self.options.image_size
        if self.processor is not None:
            kwargs: dict[str, Any] = {}
            if size is not None:
                kwargs = {"size": {"height": size, "width": size}, "do_center_crop": False}
            return self.processor(images=images, return_tensors="pt", **kwargs)
        side = size or 224
        mean, std = self._norm or (IMAGENET_MEAN, IMAGENET_STD)
        arr = np.stack([np.asarray(im.resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
                        for im in images])
        arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        return {"pixel_values": torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()}

    @torch.inference_mode()
    def _features(self, images: list[Image.Image]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError(f"tier {self.name}: backbone not loaded (call load/load_backbone)")
        images = rgb(images)
        out = []
        for i in range(0, len(images), self.options.batch_size):
            inputs = to_device(self._pixels(images[i:i + self.options.batch_size]),
                               self.device, self._dtype)
            res = self.model(pixel_values=inputs["pixel_values"])
            feats = pool_features(res.last_hidden_state, getattr(res, "pooler_output", None),
                                  self._n_prefix, self.options.pooling)
            out.append(feats.float().cpu().numpy())
        return np.concatenate(out, axis=0).astype(np.float32)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        return self._features(list(images))

    # ---- prediction ---------------------------------------------------------------------------

    def _batch(self, images: list[Image.Image]) -> list[TierOutput]:
        probs = self.head.predict_proba(self._features(images))
        return [TierOutput(prob=clamp_prob(p)) for p in probs]

    def predict(self, images: Sequence[Image.Image]) -> list[TierOutput | Exception]:
        if self.head is None:
            return [RuntimeError(f"tier {self.name}: head not loaded") for _ in images]
        return per_item(images, self._batch)

    # ---- fine-tuning (natix-miner train --mode finetune|lora) ---------------------------------

    def load_finetuned_backbone(self, found: tuple[str, Path, str]) -> None:
        """Swap in the fine-tuned backbone (full directory, or a LoRA adapter merged into the base)."""
        from transformers import AutoModel

        kind, path, sha = found
        if kind == "hf_dir":
            model = AutoModel.from_pretrained(str(path), dtype=self._dtype)
        elif kind == "peft_adapter":
            try:
                from peft import PeftModel
            except ImportError:
                raise ImportError(f"tier {self.name}: its LoRA adapter needs peft: "
                                  "pip install -c constraints.txt peft") from None
            model = PeftModel.from_pretrained(self.model, str(path)).merge_and_unload()
        else:
            raise ValueError(f"tier {self.name}: backbone kind {kind!r} is not a transformers backbone")
        old, self.model = self.model, model.to(self.device).eval()
        if old is not model:
            release(old)
        self._weights = {"source": f"finetuned ({kind})", "path": str(path), "sha256": sha}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["backbone_weights"] = self._weights
        return info

    def load_for_training(self, device: str) -> None:
        self.load_backbone(device, dtype=torch.float32)

    def train_inputs(self, image: Any) -> Any:
        return self._pixels(rgb([image]))["pixel_values"][0].float()

    def collate_inputs(self, items: list[Any]) -> Any:
        return {"pixel_values": torch.stack(items)}

    def training_net(self, head: Head, options: NetOptions) -> "HFTrainingNet":
        if options.mode not in self.finetune_modes:
            raise ValueError(f"tier {self.name}: mode {options.mode!r} is not one of "
                             f"{['head', *self.finetune_modes]}")
        if self.model is None:
            raise RuntimeError(f"tier {self.name}: backbone not loaded (call load_backbone)")
        return HFTrainingNet(self.model, torch_head(head), n_prefix=self._n_prefix,
                             pooling=self.options.pooling, options=options)

    def save_finetuned(self, net: TrainingNet, metadata: dict[str, Any]) -> Path:
        import shutil

        tier_dir = self.spec.artifact("")
        tier_dir.mkdir(parents=True, exist_ok=True)
        backbone = net.backbone
        if net.lora and not net.merge:
            kind, out = "peft_adapter", tier_dir / "adapter"
        else:
            kind, out = "hf_dir", tier_dir / "backbone"
            if net.lora:
                backbone = backbone.merge_and_unload()
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        backbone.save_pretrained(str(tmp), safe_serialization=True)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
        rec = backbone_weights.record(kind, out, tier_dir)
        self.head = head_from_torch(net.head, info=metadata.pop("head_info", {}))
        return self.save_head({**metadata, "backbone": rec})


def _normalisation_from_config(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std from the checkpoint's preprocessor_config.json, else ImageNet's."""
    try:
        from transformers.utils import cached_file

        cfg = cached_file(path, "preprocessor_config.json")
        data = json.loads(Path(cfg).read_text(encoding="utf-8"))
        return tuple(data["image_mean"]), tuple(data["image_std"])
    except Exception:  # noqa: BLE001 - any failure: the DINO family's ImageNet statistics
        return IMAGENET_MEAN, IMAGENET_STD

class HFTrainingNet(TrainingNet):
    """A transformers backbone (fully trainable, or frozen with LoRA adapters) + pooling + head."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module, *, n_prefix: int,
                 pooling: str, options: NetOptions) -> None:
        import copy

        super().__init__()
        self.n_prefix, self.pooling = n_prefix, pooling
        self.lora = options.mode == "lora"
        self.merge = options.lora.merge
        self.teacher = None
        if self.lora:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise ImportError("--mode lora needs peft: pip install -c constraints.txt peft") from None
            targets = list(options.lora.targets) or linear_names_in_blocks(backbone)
            if not targets:
                raise ValueError("no nn.Linear inside numbered blocks to put LoRA adapters on; "
                                 "name them with --lora-targets")
            cfg = LoraConfig(r=options.lora.r, lora_alpha=options.lora.alpha,
                             lora_dropout=options.lora.dropout, target_modules=targets, bias="none")
            backbone = get_peft_model(backbone, cfg)
        elif options.gram:
            self.teacher = copy.deepcopy(backbone).eval().requires_grad_(False)
        self.backbone = backbone
        self.head = head

    def backbone_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def _hidden(self, model: torch.nn.Module, inputs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        res = model(pixel_values=inputs["pixel_values"])
        return res.last_hidden_state, getattr(res, "pooler_output", None)

    def _patches(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden[:, self.n_prefix:]

    def forward(self, inputs: Any, with_patches: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        hidden, pooler = self._hidden(self.backbone, inputs)
        feats = pool_features(hidden, pooler, self.n_prefix, self.pooling)
        return self.head(feats.float()), (self._patches(hidden) if with_patches else None)

    def teacher_patches(self, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            if self.lora:  # the frozen base is the teacher: the adapters switched off
                with self.backbone.disable_adapter():
                    return self._patches(self._hidden(self.backbone, inputs)[0])
            if self.teacher is None:
                raise RuntimeError("teacher_patches needs a net built with gram=True")
            return self._patches(self._hidden(self.teacher, inputs)[0])
