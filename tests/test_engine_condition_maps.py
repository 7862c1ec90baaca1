"""Condition-aware decisions: fitted per condition, saved, loaded and applied by the engine."""

import json

import numpy as np
import pytest
from PIL import Image

from cascade.calibration import (POOLED, CalibrationSet, ConditionMap, ThresholdMap, assign_conditions,
                                 expected_reward, fit_condition_maps)
from cascade.errors import ConfigError
from tests.test_engine_core import make_engine


def two_regimes(n: int, seed: int):
    """Fused-like probabilities: in daylight the classes split at 0.5; at night the tiers are
    timid, so roadwork scores ~0.35 and nothing ~0.15 (the pooled t* misses every night positive)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(float)
    night = rng.random(n) < 0.4
    centre = np.where(night, np.where(y == 1, 0.35, 0.15), np.where(y == 1, 0.8, 0.2))
    p = np.clip(centre + rng.normal(0, 0.06, n), 0.01, 0.99)
    return p, y, night


def test_a_condition_with_enough_images_gets_its_own_threshold_map_and_it_pays_off():
    p, y, night = two_regimes(600, 0)
    rare = np.zeros_like(night)
    rare[:5] = True                                   # 5 foggy images: too few for their own map
    maps = fit_condition_maps(p[:, None], y, {"night": night, "fog": rare}, ["a"], [1.0],
                              min_images=60, min_per_label=10)
    assert set(maps) == {"night"}
    assert 0.2 < maps["night"].threshold_map.t_star < 0.3      # between the two night clusters
    assert maps["night"].n == int(night.sum()) and maps["night"].n_positive == int(y[night].sum())
    pooled = CalibrationSet(threshold_map=ThresholdMap(0.5))
    aware = CalibrationSet(threshold_map=ThresholdMap(0.5), conditions=maps)
    pt, yt, nt = two_regimes(600, 1)                   # fresh images of the same two regimes
    conds = [{"night": bool(v)} for v in nt]
    _, emitted_pooled, _ = pooled.apply({"a": pt}, {"a": 1.0}, conds)
    _, emitted_aware, decisions = aware.apply({"a": pt}, {"a": 1.0}, conds)
    assert (decisions == "night").sum() == nt.sum() and (decisions == POOLED).sum() == (~nt).sum()
    r_pooled = expected_reward(yt, (emitted_pooled > 0.5).astype(float))
    r_aware = expected_reward(yt, (emitted_aware > 0.5).astype(float))
    assert r_aware > r_pooled + 0.1


def test_images_go_to_the_first_fitted_condition_in_priority_order():
    flags = {"night": np.array([1, 0, 0, 1], bool), "rain": np.array([1, 1, 0, 0], bool),
             "blur": np.array([0, 1, 1, 0], bool)}
    assert assign_conditions(flags, ["rain", "blur"]).tolist() == ["rain", "rain", "blur", POOLED]
    assert assign_conditions(flags, ["night", "rain", "blur"]).tolist() == ["night", "rain", "blur", "night"]
    cs = CalibrationSet(conditions={"rain": ConditionMap({}, ThresholdMap(0.3))})
    assert cs.decision_for({"night": True, "rain": True}) == "rain"
    assert cs.decision_for({"night": True}) == POOLED and cs.decision_for(None) == POOLED


def test_condition_maps_roundtrip_and_bad_entries_are_named(tmp_path):
    cs = CalibrationSet(weights={"a": 0.7, "b": 0.3}, threshold_map=ThresholdMap(0.45),
                        conditions={"fog": ConditionMap({"a": 0.2, "b": 0.8}, ThresholdMap(0.3), 80, 20)})
    path = cs.save(tmp_path / "cal.json")
    loaded = CalibrationSet.load(path)
    assert loaded.conditions["fog"].threshold_map.t_star == 0.3
    assert loaded.weights_for("fog", {"a": 1.0, "b": 1.0}) == {"a": 0.2, "b": 0.8}
    assert loaded.weights_for(POOLED, {"a": 1.0, "b": 1.0, "c": 1.0}) == pytest.approx(
        {"a": 0.7, "b": 0.3, "c": 0.5})              # a tier unknown to the file: rescaled prior
    assert not loaded.pooled_only().conditions and not loaded.is_identity
    data = json.loads(path.read_text())
    data["conditions"]["snow"] = data["conditions"]["fog"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"conditions.snow"):
        CalibrationSet.load(path)
    data["conditions"] = {"fog": {"weights": {"a": 1}, "threshold_map": {"t_star": 2}}}
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"conditions.fog.threshold_map"):
        CalibrationSet.load(path)


def frame(red: int, dark: bool) -> Image.Image:
    """Tier a reads the red channel of the first pixel; dark frames are night for the estimator."""
    im = Image.new("RGB", (64, 48), (red, 10, 10) if dark else (red, 200, 200))
    return im


async def test_engine_applies_the_conditions_own_maps_weights_and_router_threshold(tmp_path):
    cal = CalibrationSet(weights={"a": 1.0, "b": 0.0}, threshold_map=ThresholdMap(0.5),
                         conditions={"night": ConditionMap({"a": 0.0, "b": 1.0}, ThresholdMap(0.2))})
    eng, made = make_engine(tmp_path, {"a": {"prob": None}, "b": {"prob": 0.9}},
                            router={"margin": 0.2}, calibration=cal)
    async with eng:
        day = await eng.predict(frame(64, dark=False))          # tier a: 0.25
        night = await eng.predict(frame(64, dark=True))
        eng.condition_aware = False
        night_pooled = await eng.predict(frame(64, dark=True))
    # daylight: pooled maps; 0.25 is 0.25 from t* = 0.5, beyond the margin: stop after tier a
    assert day.decision == POOLED and not day.conditions["night"]
    assert not day.escalated and round(day.prob) == 0 and day.fused == pytest.approx(0.25, abs=0.01)
    # night: its own t* = 0.2 is 0.05 away, so tier b is asked, and night's weights trust only b
    assert night.decision == "night" and night.conditions["night"]
    assert night.escalated and night.fused == pytest.approx(0.9) and round(night.prob) == 1
    assert night_pooled.decision == POOLED and round(night_pooled.prob) == 0
