"""The subnet's reward, windows and EMA against hand-computed cases; offline metrics."""

import math

import numpy as np
import pytest
from scipy.stats import binom

from natix_miner.toolkit import metrics, scoring
from natix_miner.toolkit.scoring import ScoreTracker, ScoringRules


def _window_mcc_half_acc_08():
    """16 answers: tp=6, tn=6, fp=2, fn=2 (MCC = 32/64 = 0.5), 8 of the last 10 right."""
    labels = [1, 0, 1, 0, 1, 0] + [1, 0, 1, 1, 1, 0, 0, 0, 1, 0]
    right = [False, False, True, True, True, True] + [False, False, True, True, True, True,
                                                      True, True, True, True]
    answers = [0.9 if (l == 1) == r else 0.1 for l, r in zip(labels, right)]
    return labels, answers


def test_hand_window_mcc_05_and_accuracy_08_gives_065_cubed():
    labels, answers = _window_mcc_half_acc_08()
    assert scoring.window_mcc(labels, answers) == pytest.approx(0.5)
    assert scoring.window_accuracy(labels[-10:], answers[-10:]) == pytest.approx(0.8)
    assert scoring.reward(labels, answers) == pytest.approx(0.65 ** 3)


def test_single_class_windows_have_zero_mcc():
    assert scoring.window_mcc([1, 1, 1, 1], [0.9, 0.8, 0.1, 0.7]) == 0.0    # one true class
    assert scoring.window_mcc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6]) == 0.0    # one predicted class
    # constant answer: all-right on the positive half of the last 10 only
    assert scoring.reward([1, 0] * 5, [1.0] * 10) == pytest.approx((0.5 * 0 + 0.5 * 0.5) ** 3)


def test_mcc_is_floored_at_zero_and_half_rounds_down():
    assert scoring.window_mcc([1, 0, 1, 0], [0.1, 0.9, 0.2, 0.8]) == 0.0   # MCC -1 -> 0
    assert metrics.mcc([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert scoring.window_accuracy([0, 1], [0.5, 0.5]) == 0.5          # 0.5 counts as "no roadwork"
    assert list(metrics.binarize([0.5, 0.5000001, 0.49, 1.0])) == [0, 1, 0, 1]


def test_tracker_leaves_out_minus_one_and_zeroes_invalid_rounds():
    t = ScoreTracker()
    assert t.update(0, "hk", 0.9, 1) == pytest.approx(0.5 ** 3)   # MCC 0 (one class), acc 1
    assert t.update(0, "hk", -1.0, 0) == 0.0                       # timeout: round earns 0
    assert list(t.miners[0].answers) == [0.9]                      # ... and is not recorded
    assert t.update(0, "hk", 0.1, 0) == pytest.approx(1.0)         # MCC 1 over [1, 0], acc 1
    for bad in (1.5, -0.2, float("nan")):
        assert t.update(0, "hk", bad, 1) == 0.0
    assert len(t.miners[0].answers) == 5                          # recorded, as the validator does
    assert scoring.window_accuracy(list(t.miners[0].labels), list(t.miners[0].answers)) == 0.4


def test_tracker_resets_on_hotkey_change_and_keeps_100():
    t = ScoreTracker()
    for i in range(130):
        t.update(3, "old", float(i % 2), i % 2)
    assert len(t.miners[3].answers) == 100
    assert t.score(3) > 0.9
    t.update(3, "new", 1.0, 1)
    assert list(t.miners[3].answers) == [1.0] and t.miners[3].hotkey == "new"
    assert t.score(3) == pytest.approx(0.05 * 0.5 ** 3)


def test_ema():
    t = ScoreTracker()
    r1 = t.update(1, "hk", 0.9, 1)
    assert t.score(1) == pytest.approx(0.05 * r1)
    r2 = t.update(1, "hk", 0.2, 0)
    assert t.score(1) == pytest.approx(0.05 * r2 + 0.95 * 0.05 * r1)
    assert scoring.ema(0.4, 1.0) == pytest.approx(0.43)
    assert scoring.ema(0.4, 1.0, ScoringRules(ema_alpha=0.5)) == pytest.approx(0.7)


def test_expected_reward_perfect_constant_and_inverted():
    y = np.array([0] * 30 + [1] * 70)
    assert scoring.expected_reward(y.astype(float), y) == pytest.approx(1.0)
    assert scoring.expected_reward(1.0 - y, y) == 0.0               # MCC floored, acc 0
    # constant answer: MCC 0, accuracy over 10 ~ Binomial(10, 0.5)/10 -> E[(X/20)^3]
    k = np.arange(11)
    exact = float(np.sum(binom.pmf(k, 10, 0.5) * (k / 20) ** 3))
    assert scoring.expected_reward(np.zeros(100), y, draws=20000) == pytest.approx(exact, rel=0.03)
    assert math.isnan(scoring.expected_reward([0.2, 0.3], [1, 1]))


def test_expected_reward_matches_a_simulated_validator():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(y * 0.6 + rng.uniform(0, 0.5, 400), 0, 1)           # ~80 % right
    t = ScoreTracker()
    rewards = []
    for i in range(3000):
        label = int(rng.integers(0, 2))
        idx = rng.choice(np.flatnonzero(y == label))
        r = t.update(0, "hk", float(p[idx]), label)
        if i >= 100:
            rewards.append(r)
    assert scoring.expected_reward(p, y) == pytest.approx(np.mean(rewards), abs=0.02)


def test_metrics_against_hand_values():
    y = [1, 1, 0, 0, 1, 0]
    p = [0.9, 0.4, 0.2, 0.6, 0.7, 0.5]
    assert metrics.confusion(y, metrics.binarize(p)).tolist() == [[2, 1], [1, 2]]
    assert metrics.accuracy(y, p) == pytest.approx(4 / 6)
    assert metrics.mcc(y, metrics.binarize(p)) == pytest.approx((4 - 1) / 9)
    # AUC: pairs (pos, neg) = 9; pos scores .9 .4 .7 vs neg .2 .6 .5 -> 3 + 1 + 3 wins = 7/9
    assert metrics.roc_auc(y, p) == pytest.approx(7 / 9)
    assert metrics.roc_auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)  # ties = half
    assert math.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))
    assert metrics.mcc([1, 1, 0], [1, 1, 1]) == 0.0


def test_one_implementation_each_and_the_validators_own_numbers():
    """MCC, accuracy and AUC are scikit-learn's (what the subnet's validator calls); ECE, the bins
    and the vectorised MCC are the engine's, re-exported rather than written again."""
    import warnings

    from sklearn.metrics import accuracy_score, matthews_corrcoef, roc_auc_score

    from cascade import calibration

    assert metrics._ece is calibration.expected_calibration_error
    assert metrics.reliability_bins is calibration.reliability_bins
    assert metrics.mcc_from_counts is calibration.mcc_from_counts
    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 10, 100):
        for _ in range(12):
            y = rng.integers(0, 2, n)
            p = np.round(rng.random(n), 1)
            pred = metrics.binarize(p)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # sklearn warns on one-class windows
                assert metrics.mcc(y, pred) == pytest.approx(matthews_corrcoef(y, pred), abs=1e-12)
            assert metrics.accuracy(y, p) == pytest.approx(accuracy_score(y, pred))
            if len(set(y)) == 2:
                assert metrics.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))
            (tn, fp), (fn, tp) = metrics.confusion(y, pred)
            assert float(metrics.mcc_from_counts(tp, fp, fn, tn)) == pytest.approx(metrics.mcc(y, pred))


def test_ece_and_reliability_bins():
    p = np.array([0.1, 0.1, 0.9, 0.9])
    y = np.array([0, 0, 1, 1])
    assert metrics.ece(p, y) == pytest.approx(0.1)
    assert metrics.ece(np.array([0.8] * 10), np.array([1] * 4 + [0] * 6)) == pytest.approx(0.4)
    b = metrics.reliability_bins(p, y, bins=10)
    assert b["count"].sum() == 4 and b["positive_rate"][8] == 1.0 and b["confidence"][0] == pytest.approx(0.1)
