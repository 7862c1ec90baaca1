"""From detector boxes to one image probability of roadwork (shared by every detector tier).

A detector says where cones, barriers and machinery are; the subnet asks one yes/no question.
Each kept box of a roadwork class is treated as independent evidence with probability equal to
its confidence, so the image probability is a noisy-OR with a leak term:

    p = 1 - (1 - prior) * prod_i (1 - c_i)

`prior` is what the tier answers when it sees nothing (the leak), boxes smaller than
`min_area_frac` of the image are dropped (a distant or hallucinated cone must not decide the
answer alone), and only the `top_k` most confident boxes count, so twenty duplicate boxes of one
cone do not add up to certainty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from cascade.errors import ConfigError

DEFAULT_ROADWORK_CLASSES: tuple[str, ...] = (
    "traffic cone", "cone", "barricade", "barrier", "road barrier", "construction sign",
    "road work sign", "roadwork sign", "detour sign", "machinery vehicle", "excavator", "crane",
    "construction vehicle", "bulldozer", "road roller", "safety vest", "arrow board",
    "jersey barrier", "construction fence",
)


def normalise_label(name: str) -> str:
    """Case- and separator-insensitive class name ("Traffic_cone" == "traffic cone")."""
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


@dataclass(frozen=True)
class EvidenceOptions:
    """How boxes become a probability (embedded in each detector tier's Options)."""

    # Class names counted as roadwork evidence (matched case/separator-insensitively).
    roadwork_classes: tuple[str, ...] = DEFAULT_ROADWORK_CLASSES
    # Boxes below this confidence are ignored.
    min_score: float = 0.25
    # Boxes smaller than this fraction of the image area are ignored.
    min_area_frac: float = 0.0005
    # Only the most confident `top_k` roadwork boxes enter the noisy-OR.
    top_k: int = 5
    # Probability when no roadwork box is kept (the noisy-OR's leak).
    prior: float = 0.05

    def validate(self, source: str, prefix: str) -> None:
        for key in ("min_score", "min_area_frac", "prior"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(source, f"{prefix}.{key}", "a number in [0, 1)", value)
        if self.top_k < 1:
            raise ConfigError(source, f"{prefix}.top_k", "an integer >= 1", self.top_k)
        if not self.roadwork_classes:
            raise ConfigError(source, f"{prefix}.roadwork_classes", "at least one class name")


@dataclass(frozen=True)
class Box:
    """One detection in pixel coordinates (x0, y0, x1, y1)."""

    label: str
    score: float
    xyxy: tuple[float, float, float, float]

    def area_frac(self, width: int, height: int) -> float:
        x0, y0, x1, y1 = self.xyxy
        area = max(0.0, min(x1, width) - max(x0, 0.0)) * max(0.0, min(y1, height) - max(y0, 0.0))
        return area / float(max(1, width * height))


def matching_classes(model_labels: Iterable[str], wanted: Sequence[str]) -> set[str]:
    """The model's own label names that are roadwork classes (normalised)."""
    want = {normalise_label(w) for w in wanted}
    return {normalise_label(l) for l in model_labels if normalise_label(l) in want}


def label_names(id2label: Mapping) -> list[str]:
    return [str(v) for _, v in sorted(((int(k), v) for k, v in id2label.items()))]


def image_probability(boxes: Sequence[Box], width: int, height: int,
                      options: EvidenceOptions) -> tuple[float, dict]:
    """Noisy-OR of the kept roadwork boxes' confidences, with `prior` as the leak term.

    Returns (probability, evidence) where evidence lists the boxes that counted.
    """
    want = {normalise_label(c) for c in options.roadwork_classes}
    kept = [b for b in boxes
            if normalise_label(b.label) in want and b.score >= options.min_score
            and b.area_frac(width, height) >= options.min_area_frac]
    kept.sort(key=lambda b: b.score, reverse=True)
    kept = kept[:options.top_k]
    miss = 1.0 - options.prior
    for b in kept:
        miss *= 1.0 - min(max(float(b.score), 0.0), 1.0)
    prob = 1.0 - miss
    evidence = {
        "n_boxes": len(boxes),
        "roadwork_boxes": [{"label": b.label, "score": round(float(b.score), 4),
                            "xyxy": [round(float(v), 1) for v in b.xyxy]} for b in kept],
    }
    return prob, evidence
