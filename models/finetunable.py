"""What a tier offers `natix-miner train --mode finetune|lora`: a trainable torch network whose
eval-mode output is exactly what the served tier computes, its per-image inputs, and the save.

Why here and not in the toolkit: how crops, tiles, pooling and the head fit together belongs to
the backend (the same code builds the served features), while the training loop
(`natix_miner.toolkit.finetune`) only sees `TrainingNet`: `forward(inputs) -> (logits, patches)`,
`teacher_patches(inputs)` for Gram anchoring, and parameter groups.

Licence: project code.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from models.heads import Head


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (peft) on a transformers ViT backbone's attention and MLP projections."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # Module names to adapt; empty = every nn.Linear inside the transformer blocks (q/k/v/o, MLP).
    targets: tuple[str, ...] = ()
    # Save merged weights (a plain backbone, no peft at serving) or the adapter alone.
    merge: bool = True


@dataclass(frozen=True)
class NetOptions:
    """How `training_net` builds the network for one run."""

    mode: str = "finetune"
    gram: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)


class TrainingNet(torch.nn.Module):
    """Backbone + head as one module; `eval()` output equals the served tier's probability logit."""

    head: torch.nn.Module

    @abc.abstractmethod
    def forward(self, inputs: Any, with_patches: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(logits [B], patch features [M, N, C] or None) for a collated batch of images."""

    @abc.abstractmethod
    def teacher_patches(self, inputs: Any) -> torch.Tensor:
        """Patch features of the frozen starting backbone for the same inputs (no grad)."""

    @abc.abstractmethod
    def backbone_parameters(self) -> list[torch.nn.Parameter]:
        """Trainable backbone (or adapter) parameters."""

    def param_groups(self, lr_backbone: float, lr_head: float, weight_decay: float) -> list[dict[str, Any]]:
        """A lower learning rate for the backbone than for the head; no decay on biases / scales."""
        groups = []
        for params, lr in ((self.backbone_parameters(), lr_backbone),
                           ([p for p in self.head.parameters() if p.requires_grad], lr_head)):
            decay = [p for p in params if p.ndim >= 2]
            rest = [p for p in params if p.ndim < 2]
            groups += [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                       {"params": rest, "lr": lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]


class FineTunable(abc.ABC):
    """Mixed into a `TrainableTier` whose backbone can be trained end to end."""

    # Training modes besides `head` this backend supports.
    finetune_modes: Sequence[str] = ("finetune",)

    def load_for_training(self, device: str) -> None:
        """Load the pretrained backbone in full precision (mixed precision is the loop's job)."""
        self.load_backbone(device)  # type: ignore[attr-defined]

    @abc.abstractmethod
    def training_net(self, head: Head, options: NetOptions) -> TrainingNet:
        """A `TrainingNet` on the loaded backbone (`load_backbone` first), starting from `head`."""

    @abc.abstractmethod
    def train_inputs(self, image: Any) -> Any:
        """One image's network inputs as CPU tensors (the served preprocessing, tiles included)."""

    @abc.abstractmethod
    def collate_inputs(self, items: list[Any]) -> Any:
        """A batch from `train_inputs` results (tensors only, so accelerate can move it)."""

    @abc.abstractmethod
    def save_finetuned(self, net: TrainingNet, metadata: dict[str, Any]) -> Path:
        """Write backbone (or adapter) and head under the tier's artefact dir; returns head.pt."""


def linear_names_in_blocks(model: torch.nn.Module) -> list[str]:
    """Every nn.Linear inside a numbered block (`layer.3.attention.q_proj`, `layers.0.mlp.fc1`).

    Embeddings, poolers and classifier heads stay out: LoRA adapts attention and MLP projections.
    """
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(part.isdigit() for part in name.split(".")):
            names.append(name)
    return names
