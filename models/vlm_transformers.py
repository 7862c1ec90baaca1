"""VLM tier through plain transformers: one forward pass, logits of the last position.

Origin: any `AutoModelForImageTextToText` chat VLM whose processor has a chat template:
Qwen2-VL / Qwen2.5-VL (`Qwen/Qwen2.5-VL-3B-Instruct`, `-7B-Instruct`; Apache-2.0 for 7B, Qwen
Research licence for 3B), InternVL3 HF ports (`OpenGVLab/InternVL3-8B-hf`, MIT), Gemma 3, SmolVLM
(Apache-2.0). Licence: that of the checkpoint.

This is the fallback and the CPU-testable path; on GPUs the vLLM tier (`vlm_vllm`) serves the same
question with continuous batching and prefix caching. The probability is read from the next-token
logits of the yes/no answer tokens (`models.vlm_common`), never from generated text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from cascade.tier import Tier, TierOutput
from models.hf_common import TransformersTierMixin
from models._torch_utils import (checkpoint_or_raise, clamp_prob, per_item, release, resolve_device,
                                 to_device, torch_dtype)
from models.vlm_common import VLMOptions, answer_token_ids, chat_messages, prob_from_logits, shrink


@dataclass(frozen=True)
class Options(VLMOptions):
    """Settings of a `vlm_transformers` tier (YAML `options:`); see VLMOptions for the rest."""

    # Attention implementation passed to from_pretrained ("sdpa", "eager", "flash_attention_2").
    attn_implementation: str = "sdpa"


class TransformersVLMTier(TransformersTierMixin, Tier):
    """Yes/no roadwork question scored from next-token logits, with transformers."""

    Options = Options
    auto_class = "AutoModelForImageTextToText"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.model = None
        self.processor = None
        self.yes_ids: list[int] = []
        self.no_ids: list[int] = []
        self._dtype = torch.float32
        self._prompt = ""

    def load(self, device: str) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = checkpoint_or_raise(self.spec)
        self.device = resolve_device(device)
        self._dtype = torch_dtype(self.spec.dtype, self.device)
        self.processor = AutoProcessor.from_pretrained(path)
        # Left padding keeps every sequence's last real token at position -1 in a batch.
        self.processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=self._dtype, attn_implementation=self.options.attn_implementation)
        self.model = model.to(self.device).eval()
        self.yes_ids, self.no_ids = answer_token_ids(self.processor.tokenizer)
        self._prompt = self.prompt_text()

    def prompt_text(self) -> str:
        messages = chat_messages(self.options, {"type": "image"})
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    @torch.inference_mode()
    def _batch(self, images: list[Image.Image]) -> list[TierOutput]:
        images = [shrink(im, self.options.max_image_side) for im in images]
        inputs = self.processor(text=[self._prompt] * len(images), images=[[im] for im in images],
                                padding=True, return_tensors="pt")
        inputs = to_device(inputs, self.device, self._dtype)
        logits = self.model(**inputs, logits_to_keep=1).logits[:, -1, :].float().cpu().numpy()
        out = []
        for row in logits:
            prob, evidence = prob_from_logits(row, self.yes_ids, self.no_ids)
            out.append(TierOutput(prob=clamp_prob(prob), evidence=evidence))
        return out

    def predict(self, images: Sequence[Image.Image]) -> list[TierOutput | Exception]:
        if self.model is None:
            raise RuntimeError(f"tier {self.name} predict() before load()")
        return per_item(images, self._batch)

    def close(self) -> None:
        model, self.model = self.model, None
        release(model)
