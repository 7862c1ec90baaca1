"""`router.skip_if_decided`: a tier whose whole output range cannot move the fused decision across
the threshold is skipped (the OCR tier on most frames), and only then."""

from typing import Optional

import pytest

from cascade.calibration import CalibrationSet
from cascade.config import load_cascade_config
from cascade.engine import CascadeEngine
from cascade.telemetry import Telemetry
from models.ocr_signs import OcrSignTier
from tests.test_engine_core import ScriptedTier, image, write_config


class RangedTier(ScriptedTier):
    """A scripted tier that declares the range of what it can answer (as the OCR tier does)."""

    def __init__(self, spec, prob: float, rng: Optional[tuple[float, float]]) -> None:
        super().__init__(spec, prob=prob)
        self.rng = rng

    def output_range(self):
        return self.rng


def engine(tmp_path, first: float, second: float, rng, **router):
    tiers = [{"name": "cnn.a", "weight": 0.9}, {"name": "ocr.b", "weight": 0.1}]
    cfg = load_cascade_config(write_config(tmp_path, tiers, router={"margin": 0.3, **router}))
    made = {}

    def factory(spec):
        made[spec.name] = (ScriptedTier(spec, prob=first) if spec.name == "cnn.a"
                           else RangedTier(spec, second, rng))
        return made[spec.name]

    return CascadeEngine(cfg, factory, telemetry=Telemetry(), calibration=CalibrationSet.identity()), made


async def test_a_tier_that_cannot_flip_the_decision_is_skipped(tmp_path):
    eng, made = engine(tmp_path, 0.7, 0.3, (0.3, 0.95))  # 0.7 is uncertain (margin 0.3)
    async with eng:
        res = await eng.predict(image())
    assert made["ocr.b"].batch_sizes == [] and res.skipped == {"ocr.b": "decided"}
    assert res.prob == pytest.approx(0.7) and res.prob > 0.5
    assert eng.telemetry.value("cascade_tier_skipped_total", {"tier": "ocr.b", "reason": "decided"}) == 1


async def test_a_tier_that_could_flip_it_is_asked(tmp_path):
    eng, made = engine(tmp_path, 0.52, 0.3, (0.3, 0.95))  # 0.3 from ocr.b would turn it to "no"
    async with eng:
        res = await eng.predict(image())
    assert made["ocr.b"].batch_sizes == [1] and "ocr.b" in res.tier_probs
    assert res.prob < 0.5  # and it did flip it


@pytest.mark.parametrize("rng, router", [(None, {}), ((0.3, 0.95), {"skip_if_decided": False})])
async def test_no_declared_range_or_the_switch_off_asks_as_before(tmp_path, rng, router):
    eng, made = engine(tmp_path, 0.7, 0.3, rng, **router)
    async with eng:
        res = await eng.predict(image())
    assert made["ocr.b"].batch_sizes == [1] and res.skipped == {}


def test_the_ocr_tier_declares_what_it_can_answer(tmp_path):
    from cascade.config import TierSpec

    t = OcrSignTier(TierSpec(name="ocr", backend="ocr_signs", source=str(tmp_path / "c.yaml"),
                             options={"prior_no_text": 0.3, "prior_unmatched": 0.35, "max_prob": 0.9}))
    assert t.output_range() == (0.3, 0.9)
