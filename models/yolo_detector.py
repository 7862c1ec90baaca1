"""Ultralytics YOLO tier: YOLO11 / YOLO26 fixed-vocabulary detectors and YOLO-World open
vocabulary (text-prompted classes via `set_classes`). GPU extra: `pip install ultralytics`
(imported only when a config uses this backend).

Origin: Ultralytics (`yolo11x.pt`, `yolo26x.pt`, `yolov8x-worldv2.pt`; the release assets that
`ultralytics` itself downloads, or a file in a Hugging Face repo via `options.hf_filename`).
Licence: AGPL-3.0 for Ultralytics code and weights (an Enterprise licence exists); YOLO-World
weights GPL-3.0 upstream. Check before serving commercially.

A fixed-vocabulary checkpoint must have been trained on roadwork classes (cones, barriers,
signs) to be useful; YOLO-World is prompted with the roadwork class names themselves plus a few
ordinary distractor classes, so a car is called a car and not a cone. Boxes become one
probability in `models.detection_evidence`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from loguru import logger
from PIL import Image

from cascade.tier import Tier, TierOutput
from models._torch_utils import checkpoint_or_raise, clamp_prob, per_item, rgb
from models.detection_evidence import (Box, EvidenceOptions, image_probability, matching_classes)


@dataclass(frozen=True)
class Options:
    """Settings of a `yolo` tier (YAML `options:`)."""

    # Boxes -> probability (roadwork class names, min score, min area, top_k, prior).
    evidence: EvidenceOptions = field(default_factory=EvidenceOptions)
    # YOLO-World: prompt the model with evidence.roadwork_classes + extra_classes.
    open_vocabulary: bool = False
    # Non-roadwork classes added to the open vocabulary as distractors.
    extra_classes: tuple[str, ...] = ("car", "truck", "bus", "person", "traffic light")
    # Inference size (pixels, long side).
    imgsz: int = 640
    # If set, `checkpoint` is a Hugging Face repo id and this is the weight file inside it.
    hf_filename: Optional[str] = None
    # IoU threshold of non-maximum suppression.
    iou: float = 0.6


def _weights_path(checkpoint: str, hf_filename: Optional[str]) -> str:
    if hf_filename is None:
        return checkpoint
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=checkpoint, filename=hf_filename)


class YoloTier(Tier):
    """Ultralytics detector; roadwork boxes -> image probability."""

    Options = Options

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.model = None
        self._half = False

    def load(self, device: str) -> None:
        try:
            from ultralytics import YOLO
        except ImportError as exc:  # the GPU extra is optional
            raise RuntimeError("backend 'yolo' needs the GPU extra: pip install ultralytics") from exc

        weights = _weights_path(checkpoint_or_raise(self.spec), self.options.hf_filename)
        self.device = "cuda:0" if device == "cuda" else device
        self.model = YOLO(weights)
        if self.options.open_vocabulary:
            classes = list(dict.fromkeys([*self.options.evidence.roadwork_classes,
                                          *self.options.extra_classes]))
            current = list(self.model.names.values()) if isinstance(self.model.names, dict) \
                else list(self.model.names)
            # A checkpoint saved after set_classes (model.save(...)) already carries the text
            # embeddings; re-encoding would need the CLIP text model (and, first time, a download).
            if current != classes:
                self.model.set_classes(classes)
        self._half = self.device.startswith("cuda") and self.spec.dtype in (
            "float16", "fp16", "bfloat16", "bf16")
        names = list(self.model.names.values()) if isinstance(self.model.names, dict) \
            else list(self.model.names)
        matched = matching_classes(names, self.options.evidence.roadwork_classes)
        if not matched:
            raise ValueError(f"tier {self.name}: none of evidence.roadwork_classes is a class of "
                             f"this YOLO model; its classes are {names[:50]}")
        logger.info("tier {}: roadwork evidence from classes {}", self.name, sorted(matched))

    def _batch(self, images: list[Image.Image]) -> list[TierOutput]:
        images = rgb(images)
        results = self.model.predict(images, conf=self.options.evidence.min_score,
                                     iou=self.options.iou, imgsz=self.options.imgsz,
                                     device=self.device, half=self._half, verbose=False)
        out = []
        for im, res in zip(images, results):
            names = res.names
            boxes = [Box(label=str(names[int(c)]), score=float(s), xyxy=tuple(map(float, b)))
                     for b, s, c in zip(res.boxes.xyxy.tolist(), res.boxes.conf.tolist(),
                                        res.boxes.cls.tolist())]
            prob, evidence = image_probability(boxes, im.width, im.height, self.options.evidence)
            out.append(TierOutput(prob=clamp_prob(prob), evidence=evidence))
        return out

    def predict(self, images: Sequence[Image.Image]) -> list[TierOutput | Exception]:
        if self.model is None:
            raise RuntimeError(f"tier {self.name} predict() before load()")
        return per_item(images, self._batch)

    def close(self) -> None:
        self.model = None
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
