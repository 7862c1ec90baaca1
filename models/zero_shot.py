"""Zero-shot tier: CLIP / SigLIP / SigLIP 2 image-text similarity against roadwork prompts.

Origin: OpenAI CLIP (`openai/clip-vit-large-patch14`, MIT), Google SigLIP and SigLIP 2
(`google/siglip-so400m-patch14-384`, `google/siglip2-so400m-patch14-384`, Apache-2.0), LAION
OpenCLIP ports on the hub (MIT); all through transformers `AutoModel` + `AutoProcessor`.
Licence: that of the checkpoint.

Each concept (e.g. "traffic cones on the road") is embedded under every template ("a dashcam
photo of {}.") and the normalised embeddings are averaged (a prompt ensemble, as in the CLIP
paper); concept embeddings are computed once at load. The two families are read differently
because they were trained differently:
- CLIP is trained with a softmax over texts: p = softmax mass of the positive concepts among all
  concepts, logits = logit_scale.exp() * cosine.
- SigLIP is trained with an independent sigmoid per image-text pair: each concept gets a match
  probability sigmoid(logit_scale.exp() * cosine + logit_bias); the roadwork probability is the
  best positive match against the best negative match, m_pos / (m_pos + m_neg).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from cascade.errors import ConfigError
from cascade.tier import Tier, TierOutput
from models.hf_common import TransformersTierMixin
from models._torch_utils import (checkpoint_or_raise, clamp_prob, per_item, release, resolve_device,
                                 rgb, to_device, torch_dtype)

SIGMOID_MODEL_TYPES = ("siglip", "siglip2")


@dataclass(frozen=True)
class Options:
    """Settings of a `zero_shot` tier (YAML `options:`)."""

    # Concepts whose presence means roadwork.
    positive_prompts: tuple[str, ...] = (
        "road construction work", "orange traffic cones on the road", "a road work zone",
        "construction barriers blocking a lane", "a road work ahead sign",
        "workers repairing the road", "an excavator on the street", "temporary traffic barriers",
    )
    # Concepts of ordinary street scenes without roadwork.
    negative_prompts: tuple[str, ...] = (
        "an empty road", "a normal street with traffic", "a highway with cars",
        "a city street with parked cars", "a country road", "a residential street",
        "a road at night with car lights", "a parking lot",
    )
    # Templates each concept is embedded under; `{}` is replaced by the concept.
    templates: tuple[str, ...] = (
        "a dashcam photo of {}.", "a photo of {}.", "a street view image of {}.",
        "a blurry photo of {}.", "a photo of {} at night.",
    )
    # "auto" (SigLIP families -> sigmoid, others -> softmax), "softmax" or "sigmoid".
    mode: str = "auto"
    # Text padding: SigLIP was trained on "max_length" (64 tokens); CLIP on "longest".
    text_padding: str = "auto"

    def validate(self, source: str, prefix: str) -> None:
        if not self.positive_prompts or not self.negative_prompts:
            raise ConfigError(source, f"{prefix}.positive_prompts/negative_prompts",
                              "at least one prompt each")
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ConfigError(source, f"{prefix}.templates", "templates each containing '{}'",
                              list(self.templates))
        if self.mode not in ("auto", "softmax", "sigmoid"):
            raise ConfigError(source, f"{prefix}.mode", "one of auto, softmax, sigmoid", self.mode)
        if self.text_padding not in ("auto", "max_length", "longest"):
            raise ConfigError(source, f"{prefix}.text_padding", "one of auto, max_length, longest",
                              self.text_padding)


def _pooled(out) -> torch.Tensor:
    """Projected embedding from get_*_features (a tensor in transformers 4, an output in 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def concept_probability(logits: torch.Tensor, n_pos: int, sigmoid: bool) -> torch.Tensor:
    """Roadwork probability from [N, C] concept logits whose first `n_pos` columns are positive.

    softmax: mass of the positive concepts; sigmoid: best positive match against best negative.
    """
    if sigmoid:
        match = torch.sigmoid(logits)
        m_pos = match[:, :n_pos].amax(dim=1)
        m_neg = match[:, n_pos:].amax(dim=1)
        return m_pos / (m_pos + m_neg).clamp_min(1e-12)
    return torch.softmax(logits, dim=-1)[:, :n_pos].sum(dim=1)


class ZeroShotTier(TransformersTierMixin, Tier):
    """CLIP/SigLIP zero-shot roadwork scorer with cached prompt-ensemble text embeddings."""

    Options = Options
    auto_class = "AutoModel"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.model = None
        self.processor = None
        self._text = None  # [C, D] normalised concept embeddings (positives first)
        self._sigmoid = False
        self._scale = 1.0
        self._bias = 0.0
        self._dtype = torch.float32

    @property
    def concepts(self) -> list[str]:
        return [*self.options.positive_prompts, *self.options.negative_prompts]

    def load(self, device: str) -> None:
        from transformers import AutoModel, AutoProcessor

        path = checkpoint_or_raise(self.spec)
        self.device = resolve_device(device)
        self._dtype = torch_dtype(self.spec.dtype, self.device)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=self._dtype).to(self.device).eval()
        model_type = getattr(self.model.config, "model_type", "")
        if self.options.mode == "auto":
            self._sigmoid = model_type in SIGMOID_MODEL_TYPES or hasattr(self.model, "logit_bias")
        else:
            self._sigmoid = self.options.mode == "sigmoid"
        self._scale = float(self.model.logit_scale.float().exp().item())
        bias = getattr(self.model, "logit_bias", None)
        self._bias = float(bias.float().item()) if bias is not None and self._sigmoid else 0.0
        self._text = self._encode_concepts()

    @torch.inference_mode()
    def _encode_concepts(self) -> torch.Tensor:
        padding = self.options.text_padding
        if padding == "auto":
            padding = "max_length" if self._sigmoid else "longest"
        rows = []
        for concept in self.concepts:
            texts = [t.format(concept) for t in self.options.templates]
            kwargs = {"padding": padding, "truncation": True, "return_tensors": "pt"}
            if padding == "max_length":
                kwargs["max_length"] = min(64, getattr(self.processor.tokenizer, "model_max_length", 64))
            tok = self.processor(text=texts, **kwargs)
            tok = {k: v.to(self.device) for k, v in tok.items()
                   if k in ("input_ids", "attention_mask", "position_ids")}
            if getattr(self.model.config, "model_type", "") in SIGMOID_MODEL_TYPES:
                tok.pop("attention_mask", None)  # SigLIP's text tower attends to padding by design
            emb = _pooled(self.model.get_text_features(**tok)).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean = emb.mean(dim=0)
            rows.append(mean / mean.norm())
        return torch.stack(rows)

    @torch.inference_mode()
    def _batch(self, images: list[Image.Image]) -> list[TierOutput]:
        inputs = self.processor(images=rgb(images), return_tensors="pt")
        inputs = to_device(inputs, self.device, self._dtype)
        emb = _pooled(self.model.get_image_features(**inputs)).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        logits = self._scale * emb @ self._text.T + self._bias
        n_pos = len(self.options.positive_prompts)
        probs = concept_probability(logits, n_pos, self._sigmoid)
        concepts = self.concepts
        best = logits.argmax(dim=-1).tolist()
        return [TierOutput(prob=clamp_prob(p), evidence={"best_concept": concepts[b]})
                for p, b in zip(probs.tolist(), best)]

    def predict(self, images: Sequence[Image.Image]) -> list[TierOutput | Exception]:
        if self.model is None:
            raise RuntimeError(f"tier {self.name} predict() before load()")
        return per_item(images, self._batch)

    def close(self) -> None:
        model, self.model = self.model, None
        self._text = None
        release(model)
