"""Foundation-backbone tier: a frozen transformers vision backbone (DINOv2, DINOv3, any
`AutoModel` image encoder) with pooled features and a small trained head.

Origin: Meta DINOv2 (`facebook/dinov2-large`, `dinov2-with-registers-large`, Apache-2.0) and
DINOv3 (`facebook/dinov3-vitl16-pretrain-lvd1689m`, `dinov3-vith16plus-...`, DINOv3 licence,
gated on the hub: accept it there first). Licence: that of the checkpoint.

Features are [CLS token, mean of patch tokens] of the last layer (register tokens excluded), the
standard linear-probe recipe of the DINO papers; the head (logistic or one-hidden-layer MLP) is
fitted by `natix-miner train` in the same file format as every backbone+head tier
(`models.heads`, `<artifacts_dir>/<tier>/head.pt`). The backbone is never fine-tuned here.
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
from models.hf_common import TransformersTierMixin
from models._torch_utils import (checkpoint_or_raise, clamp_prob, per_item, release, resolve_device,
                                 rgb, to_device, torch_dtype)
from models.heads import HEAD_KINDS, HeadMixin

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


class HFBackboneHeadTier(TransformersTierMixin, HeadMixin, TrainableTier):
    """Frozen foundation backbone features -> trained head."""

    Options = Options
    auto_class = "AutoModel"

    def __init__(self, spec: TierSpec) -> None:
        super().__init__(spec)
        self.model = None
        self.processor = None
        self.head = None
        self._dtype = torch.float32
        self._n_prefix = 1
        self._norm: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None

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

    def load_backbone(self, device: str) -> None:
        from transformers import AutoImageProcessor, AutoModel

        path = checkpoint_or_raise(self.spec)
        self.device = resolve_device(device)
        self._dtype = torch_dtype(self.spec.dtype, self.device)
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

    def load(self, device: str) -> None:
        # The head first: a missing head fails fast, before seconds of weight loading.
        self._load_head()
        self.load_backbone(device)
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


def _normalisation_from_config(path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std from the checkpoint's preprocessor_config.json, else ImageNet's."""
    try:
        from transformers.utils import cached_file

        cfg = cached_file(path, "preprocessor_config.json")
        data = json.loads(Path(cfg).read_text(encoding="utf-8"))
        return tuple(data["image_mean"]), tuple(data["image_std"])
    except Exception:  # noqa: BLE001 - any failure: the DINO family's ImageNet statistics
        return IMAGENET_MEAN, IMAGENET_STD
