"""Calibration maps, weights, threshold map and the calibration file."""

import json

import numpy as np
import pytest

from cascade.calibration import (CalibrationSet, ThresholdMap, expected_calibration_error, expected_reward,
                                 fit_calibration_set, fit_calibrator, fit_threshold_map, fit_weights)
from cascade.errors import ConfigError


def miscalibrated(n: int, seed: int):
    """Labels with a true probability, and an overconfident, shifted raw score."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    raw = 1 / (1 + np.exp(-(2.5 * z + 0.8)))
    return raw, y


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_calibrators_reduce_ece_on_held_out_data(method):
    raw_fit, y_fit = miscalibrated(3000, 0)
    raw_test, y_test = miscalibrated(3000, 1)
    cal = fit_calibrator(raw_fit, y_fit, method)
    before = expected_calibration_error(raw_test, y_test)
    after = expected_calibration_error(cal(raw_test), y_test)
    assert after < before * 0.7, (method, before, after)
    grid = np.linspace(0, 1, 101)
    assert np.all(np.diff(cal(grid)) >= -1e-12)  # monotone


def test_identity_and_one_class_fallback():
    assert fit_calibrator([0.2, 0.7], [0, 1], "identity")(0.3) == pytest.approx(0.3)
    assert fit_calibrator([0.2, 0.7], [1, 1], "platt")(0.3) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        fit_calibrator([0.2], [1], "beta")


def test_isotonic_map_is_scikit_learns_isotonic_regression():
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(5)
    p = np.round(rng.random(300), 2)                       # ties pooled before the fit
    y = (rng.random(300) < p).astype(float)
    cal = fit_calibrator(p, y, "isotonic")
    ref = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(p, y)
    grid = np.linspace(0, 1, 201)
    assert np.allclose(cal(grid), ref.predict(grid), atol=1e-12)
    # pool adjacent violators on a hand case: 1, 3, 2, 4 -> 1, 2.5, 2.5, 4 (scaled into [0, 1])
    hand = fit_calibrator([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1], "isotonic")
    assert hand([0.1, 0.2, 0.3, 0.4]).tolist() == [0.0, 0.5, 0.5, 1.0]


def test_ece_hand_computed():
    # two bins: probs 0.1 (labels 0,0 -> acc 0) and 0.9 (labels 1,0 -> acc 0.5)
    ece = expected_calibration_error([0.1, 0.1, 0.9, 0.9], [0, 0, 1, 0], bins=10)
    assert ece == pytest.approx(0.5 * 0.1 + 0.5 * 0.4)


def test_threshold_map_sends_t_star_just_above_half_and_is_monotone():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 4000).astype(float)
    p = np.clip(rng.normal(0.55 + 0.25 * y, 0.12), 0, 1)  # best cut near 0.675, not 0.5
    tmap = fit_threshold_map(p, y)
    assert 0.6 < tmap.t_star < 0.75
    assert 0.5 < tmap(tmap.t_star) < 0.5 + 1e-5 and round(tmap(tmap.t_star)) == 1
    assert round(tmap(tmap.t_star - 1e-4)) == 0
    assert tmap(0.0) == 0.0 and tmap(1.0) == 1.0
    grid = np.linspace(0, 1, 1001)
    assert np.all(np.diff(tmap(grid)) > 0)
    # the emitted, numpy-rounded decision is exactly `p >= t*` and beats rounding p itself
    emitted = np.round(tmap(p))
    assert np.array_equal(emitted, (p >= tmap.t_star).astype(float))
    assert expected_reward(y, emitted) > expected_reward(y, np.round(p))


def test_threshold_map_balances_classes():
    # 90 % positives: an unbalanced optimum would call everything positive
    rng = np.random.default_rng(4)
    y = (rng.random(5000) < 0.9).astype(float)
    p = np.clip(rng.normal(0.4 + 0.2 * y, 0.1), 0, 1)
    tmap = fit_threshold_map(p, y)
    assert 0.4 < tmap.t_star < 0.6


def test_fit_weights_prefers_the_informative_tier():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 2000).astype(float)
    good = np.clip(0.2 + 0.6 * y + rng.normal(0, 0.1, y.size), 0.01, 0.99)
    noise = rng.random(y.size)
    w = fit_weights(np.stack([noise, good], axis=1), y, prior=[1.0, 1.0])
    assert w.sum() == pytest.approx(1.0) and w[1] > 0.8
    # with one class only, the prior is returned (normalised)
    assert fit_weights(np.stack([noise, good], 1), np.ones_like(y), [1.0, 3.0]).tolist() == [0.25, 0.75]


def test_calibration_set_roundtrip_and_fit(tmp_path):
    raw, y = miscalibrated(1500, 7)
    other = np.where(np.arange(y.size) % 2 == 0, np.nan, raw * 0.5 + 0.25)
    cs = fit_calibration_set({"a": raw, "b": other}, y, methods={"a": "platt", "b": "isotonic"},
                             prior={"a": 1.0, "b": 2.0})
    assert cs.metrics["tiers"]["a"]["ece_calibrated"] < cs.metrics["tiers"]["a"]["ece_raw"]
    path = cs.save(tmp_path / "cal" / "calibration.json")
    loaded = CalibrationSet.load(path)
    for p in (0.1, 0.5, 0.93):
        assert loaded.calibrate("a", p) == pytest.approx(cs.calibrate("a", p))
        assert loaded.calibrate("b", p) == pytest.approx(cs.calibrate("b", p))
        assert loaded.final(p) == pytest.approx(cs.final(p))
    assert loaded.weights == pytest.approx(cs.weights)
    assert loaded.calibrate("unknown", 0.42) == 0.42


def test_missing_file_is_identity_with_a_warning(tmp_path):
    from loguru import logger
    seen = []
    hid = logger.add(seen.append, level="WARNING")
    try:
        cs = CalibrationSet.load(tmp_path / "nope.json")
    finally:
        logger.remove(hid)
    assert cs.is_identity and cs.final(0.5) == 0.5 and cs.final(0.51) == pytest.approx(0.51)
    assert any("not found" in str(m) for m in seen)


def test_malformed_file_names_file_and_key(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"version": 1, "weights": {"a": -1}}))
    with pytest.raises(ConfigError, match=r"cal.json: key 'weights.a'"):
        CalibrationSet.load(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cal.json"):
        CalibrationSet.load(path)
    path.write_text(json.dumps({"version": 1, "threshold_map": {"t_star": 1.5}}))
    with pytest.raises(ConfigError, match="threshold_map"):
        CalibrationSet.load(path)
    for eps in (-0.01, 0.6, float("nan")):  # would move the decision off t* or break monotonicity
        path.write_text(json.dumps({"version": 1, "threshold_map": {"t_star": 0.6, "eps": eps}}))
        with pytest.raises(ConfigError, match="threshold_map"):
            CalibrationSet.load(path)


def test_threshold_map_rejects_nan():
    assert ThresholdMap(0.6)(float("nan")) == pytest.approx(ThresholdMap(0.6)(0.5))
