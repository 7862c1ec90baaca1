"""Object-detector tier through transformers: RT-DETR, RT-DETRv2, D-FINE (any
`AutoModelForObjectDetection` whose image processor has `post_process_object_detection`).

Origin: RT-DETR / RT-DETRv2 by Baidu (`PekingU/rtdetr_r50vd`, `PekingU/rtdetr_v2_r50vd`,
Apache-2.0), D-FINE by USTC (`ustc-community/dfine-large-obj365`, `dfine-xlarge-obj2coco`,
Apache-2.0). COCO has no roadwork classes; Objects365 checkpoints have traffic cones, machinery
and cranes, and a checkpoint fine-tuned on roadwork data (cones, barriers, signs) is the real
target. Licence: that of the checkpoint.

Boxes of configured roadwork classes become one probability in `models.detection_evidence`
(noisy-OR of confidences, minimum box area, prior when nothing is seen).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from loguru import logger
from PIL import Image

from cascade.tier import Tier, TierOutput
from models.hf_common import TransformersTierMixin
from models._torch_utils import (checkpoint_or_raise, clamp_prob, per_item, release, resolve_device,
                                 rgb, to_device, torch_dtype)
from models.detection_evidence import (Box, EvidenceOptions, image_probability, label_names,
                                       matching_classes)


@dataclass(frozen=True)
class Options:
    """Settings of an `hf_detector` tier (YAML `options:`)."""

    # Boxes -> probability (roadwork class names, min score, min area, top_k, prior).
    evidence: EvidenceOptions = field(default_factory=EvidenceOptions)
    # RT-DETR/D-FINE score with a sigmoid per class (focal loss); DETR-style models use softmax
    # (their post-processing has no such flag: it is passed only where the processor takes it).
    use_focal_loss: bool = True
    # Load even if none of roadwork_classes is a label of the checkpoint (the tier then only
    # ever answers `prior`; useful for smoke tests of a COCO checkpoint, never for serving).
    allow_no_roadwork_classes: bool = False


class HFDetectorTier(TransformersTierMixin, Tier):
    """Transformers DETR-family detector; roadwork boxes -> image probability."""

    Options = Options
    auto_class = "AutoModelForObjectDetection"

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.model = None
        self.processor = None
        self._dtype = torch.float32
        self.matched: set[str] = set()

    def load(self, device: str) -> None:
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        path = checkpoint_or_raise(self.spec)
        self.device = resolve_device(device)
        self._dtype = torch_dtype(self.spec.dtype, self.device)
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.model = AutoModelForObjectDetection.from_pretrained(path, dtype=self._dtype)
        self.model = self.model.to(self.device).eval()
        labels = label_names(self.model.config.id2label)
        self.matched = matching_classes(labels, self.options.evidence.roadwork_classes)
        if not self.matched and not self.options.allow_no_roadwork_classes:
            raise ValueError(f"tier {self.name}: none of evidence.roadwork_classes is a class of "
                             f"this detector; its classes are {labels[:50]}"
                             f"{' ...' if len(labels) > 50 else ''}")
        logger.info("tier {}: roadwork evidence from classes {}", self.name, sorted(self.matched))

    @torch.inference_mode()
    def _batch(self, images: list[Image.Image]) -> list[TierOutput]:
        images = rgb(images)
        inputs = self.processor(images=images, return_tensors="pt")
        outputs = self.model(**to_device(inputs, self.device, self._dtype))
        sizes = [(im.height, im.width) for im in images]
        # Upcast what post-processing reads, so bf16 logits do not lose small scores.
        outputs.logits = outputs.logits.float()
        outputs.pred_boxes = outputs.pred_boxes.float()
        post = self.processor.post_process_object_detection
        extra = ({"use_focal_loss": self.options.use_focal_loss}
                 if "use_focal_loss" in inspect.signature(post).parameters else {})
        results = post(outputs, threshold=self.options.evidence.min_score, target_sizes=sizes, **extra)
        id2label = self.model.config.id2label
        out = []
        for im, res in zip(images, results):
            boxes = [Box(label=str(id2label[int(l)]), score=float(s), xyxy=tuple(map(float, b)))
                     for s, l, b in zip(res["scores"].tolist(), res["labels"].tolist(),
                                        res["boxes"].tolist())]
            prob, evidence = image_probability(boxes, im.width, im.height, self.options.evidence)
            out.append(TierOutput(prob=clamp_prob(prob), evidence=evidence))
        return out

    def predict(self, images: Sequence[Image.Image]) -> list[TierOutput | Exception]:
        if self.model is None:
            raise RuntimeError(f"tier {self.name} predict() before load()")
        return per_item(images, self._batch)

    def close(self) -> None:
        model, self.model = self.model, None
        release(model)
