"""When to stop the cascade, and whether the next tier fits the time left.

After each tier the fused probability is compared with the decision threshold: far enough away
(the margin, widened for hard image conditions) and the answer will not change by asking a bigger
model, so the cascade stops. Otherwise the next tier runs only if its expected latency fits the
remaining budget: a measured EMA once the tier has answered, the config's `expected_latency_ms`
before that.
"""

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from cascade.conditions import active_conditions
from cascade.config import RouterConfig


@dataclass(frozen=True)
class StopDecision:
    stop: bool
    margin: float
    distance: float
    reason: str


class Router:
    def __init__(self, config: RouterConfig, *, threshold: Optional[float] = None,
                 latency_safety: float = 1.0) -> None:
        self.config = config
        # the calibration's fitted t* replaces the configured threshold when one is loaded
        self.threshold = config.threshold if threshold is None else float(threshold)
        self.latency_safety = latency_safety

    def margin_for(self, conditions: Optional[Mapping[str, Any]]) -> float:
        """The margin for this image: the widest configured margin among its active conditions
        (the most careful one wins), else the default `margin`."""
        if not conditions or not self.config.condition_margins:
            return self.config.margin
        found = [self.config.condition_margins[c] for c in active_conditions(dict(conditions))
                 if c in self.config.condition_margins]
        return max(found) if found else self.config.margin

    def should_stop(self, fused: float, answered: int,
                    conditions: Optional[Mapping[str, Any]] = None, *,
                    threshold: Optional[float] = None) -> StopDecision:
        """`threshold` overrides the decision threshold for this image (a condition's own t*)."""
        margin = self.margin_for(conditions)
        distance = abs(fused - (self.threshold if threshold is None else threshold))
        if answered < self.config.min_tiers:
            return StopDecision(False, margin, distance, f"{answered} < min_tiers")
        if distance >= margin:
            return StopDecision(True, margin, distance, "confident")
        return StopDecision(False, margin, distance, "uncertain")

    def fits(self, expected_ms: float, remaining_ms: float) -> bool:
        """Whether a tier expected to take `expected_ms` can answer within `remaining_ms`."""
        return expected_ms * self.latency_safety <= remaining_ms
