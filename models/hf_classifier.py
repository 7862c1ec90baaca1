"""Image classifier tier: any transformers `AutoModelForImageClassification` checkpoint.

Origin: the subnet's baseline miner ships a ViT fine-tuned for roadwork on Hugging Face
(`natix-network-org/roadwork`, ViT-Base/16, Apache-2.0 like its `google/vit-base-patch16-224`
parent); any other classification checkpoint whose label set names roadwork works the same way
(ViT, DeiT, ConvNeXt, Swin, EfficientNet ... through the Auto classes). Licence: that of the
checkpoint; check its model card before serving it.

The roadwork probability is the softmax mass of the labels mapped to roadwork (several labels
may be, e.g. "roadwork" and "construction"), or, for multi-label checkpoints, the largest
sigmoid among them. Preprocessing comes from the checkpoint's own image processor, so resize
and normalisation always match the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from PIL import Image

from cascade.errors import ConfigError
from cascade.tier import Tier, TierOutput
from models.hf_common import TransformersTierMixin
from models._torch_utils import (checkpoint_or_raise, clamp_prob, per_item, release, resolve_device,
                                 rgb, to_device, torch_dtype)


@dataclass(frozen=True)
class Options:
    """Settings of an `hf_classifier` tier (YAML `options:`)."""

    # Label names (case-insensitive, as in the checkpoint's config.id2label) that mean roadwork.
    positive_labels: tuple[str, ...] = ("roadwork",)
    # Index of the roadwork logit for checkpoints with generic labels (LABEL_0/LABEL_1); overrides
    # positive_labels when set.
    positive_index: Optional[int] = None
    # "auto" (the checkpoint's problem_type decides), "softmax" or "sigmoid" (multi-label).
    activation: str = "auto"

    def validate(self, source: str, prefix: str) -> None:
        if self.activation not in ("auto", "softmax", "sigmoid"):
            raise ConfigError(source, f"{prefix}.activation", "one of auto, softmax, sigmoid",
                              self.activation)
        if self.positive_index is None and not self.positive_labels:
            raise ConfigError(source, f"{prefix}.positive_labels",
                              "at least one label name (or positive_index)")


def positive_indices(id2label: dict, options: Options) -> list[int]:
    """Indices of the logits that count as roadwork; no match is an error listing the labels."""
    labels = {int(i): str(name) for i, name in id2label.items()}
    if options.positive_index is not None:
        if options.positive_index not in labels:
            raise ValueError(f"positive_index {options.positive_index} is not one of the "
                             f"checkpoint's label indices {sorted(labels)}")
        return [options.positive_index]
    wanted = {name.lower() for name in options.positive_labels}
    idx = sorted(i for i, name in labels.items() if name.lower() in wanted)
    if not idx:
        raise ValueError(f"none of positive_labels {list(options.positive_labels)} is a label of "
                         f"this checkpoint; its labels are {[labels[i] for i in sorted(labels)]} "
                         "(set options.positive_labels or options.positive_index)")
    return idx


class HFClassifierTier(TransformersTierMixin, Tier):
    """A fine-tuned image classifier whose label set includes roadwork."""

    Options = Options
    auto_class = "AutoModelForImageClassification"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.model = None
        self.processor = None
        self._pos: list[int] = []
        self._sigmoid = False
        self._dtype = torch.float32

    def load(self, device: str) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        path = checkpoint_or_raise(self.spec)
        self.device = resolve_device(device)
        self._dtype = torch_dtype(self.spec.dtype, self.device)
        self.processor = AutoImageProcessor.from_pretrained(path)
        model = AutoModelForImageClassification.from_pretrained(path, dtype=self._dtype)
        self.model = model.to(self.device).eval()
        self._pos = positive_indices(self.model.config.id2label, self.options)
        if self.options.activation == "auto":
            self._sigmoid = self.model.config.problem_type == "multi_label_classification"
        else:
            self._sigmoid = self.options.activation == "sigmoid"

    @torch.inference_mode()
    def _batch(self, images: list[Image.Image]) -> list[TierOutput]:
        inputs = self.processor(images=rgb(images), return_tensors="pt")
        logits = self.model(**to_device(inputs, self.device, self._dtype)).logits.float()
        if self._sigmoid:
            probs = torch.sigmoid(logits)[:, self._pos].amax(dim=1)
        else:
            probs = torch.softmax(logits, dim=-1)[:, self._pos].sum(dim=1)
        top = logits.argmax(dim=-1).tolist()
        id2label = self.model.config.id2label
        return [TierOutput(prob=clamp_prob(p), evidence={"top_label": str(id2label[t])})
                for p, t in zip(probs.tolist(), top)]

    def predict(self, images: Sequence[Image.Image]) -> list[TierOutput | Exception]:
        if self.model is None:
            raise RuntimeError(f"tier {self.name} predict() before load()")
        return per_item(images, self._batch)

    def close(self) -> None:
        model, self.model = self.model, None
        release(model)
