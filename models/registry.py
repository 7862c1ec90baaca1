"""Backend registry: short family names to lazily imported "module:Class" strings.

Only the backend a config names is imported, so a CPU box never imports vllm or ultralytics.
"""

import importlib
from typing import Callable

from cascade.config import TierSpec
from cascade.errors import ConfigError
from cascade.tier import Tier

BACKENDS: dict[str, str] = {
    # offline CPU tiers
    "efficientnet_lite": "models.efficientnet_lite:EfficientNetLiteTier",
    "ocr_signs": "models.ocr_signs:OcrSignTier",
    "hazard_cues": "models.hazard_cues:HazardCueTier",
    # production backends (transformers; GPU extras import lazily)
    "hf_classifier": "models.hf_classifier:HFClassifierTier",
    "hf_backbone_head": "models.hf_backbone_head:HFBackboneHeadTier",
    "zero_shot": "models.zero_shot:ZeroShotTier",
    "hf_detector": "models.hf_detector:HFDetectorTier",
    "yolo": "models.yolo_detector:YoloTier",
    "vlm_transformers": "models.vlm_transformers:TransformersVLMTier",
    "vlm_vllm": "models.vlm_vllm:VLLMTier",
    "vlm_openai": "models.vlm_openai:OpenAIVLMTier",
}


def backend_class(name: str, *, source: str = "<memory>", key: str = "backend") -> type[Tier]:
    """Import and return the class registered under `name`; unknown names list the known ones."""
    target = BACKENDS.get(name)
    if target is None:
        raise ConfigError(source, key, f"one of {sorted(BACKENDS)}", name)
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def build_tier(spec: TierSpec) -> Tier:
    """Construct (not load) the tier a spec describes; options are validated here."""
    cls = backend_class(spec.backend, source=spec.source, key=f"tiers.{spec.name}.backend")
    return cls(spec)


TierFactory = Callable[[TierSpec], Tier]
