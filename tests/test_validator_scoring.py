"""The subnet's reward, windows and EMA against hand-computed rounds; offline metrics.

Each sequence below is played through `ScoreTracker` round by round and every round's reward is
checked against the validator's rules worked out by hand: (MCC of the last 100, accuracy of the
last 10) per round, -1 answers taking a slot and dropped after the cut.
"""

import math

import numpy as np
import pytest
from scipy.stats import binom

from natix_miner.toolkit import metrics, scoring
from natix_miner.toolkit.scoring import ScoreTracker, ScoringRules

R1, R0 = 0.8, 0.2      # a right answer for label 1 / label 0
W1, W0 = 0.2, 0.8      # a wrong one


def _mix(mcc: float, acc: float) -> float:
    return (0.5 * mcc + 0.5 * acc) ** 3


def _play(rounds, rules: ScoringRules = scoring.DEFAULT_RULES):
    t = ScoreTracker(rules)
    return t, [t.update(0, "hk", answer, label) for label, answer in rounds]


def test_timeouts_every_fifth_round_take_a_slot_and_shrink_the_windows():
    # label, answer, then by hand: MCC over the valid answers so far, accuracy over the valid
    # answers among the last 10 rounds (rounds 5 and 10 are timeouts: -1)
    hand = [
        (1, W1, None, 0.0, 0.0),            # 1: one true class -> MCC 0; 0 of 1 right
        (0, R0, None, 0.0, 1 / 2),          # 2: both predicted 0 -> MCC 0
        (1, R1, None, 1 / 2, 2 / 3),        # 3: tp1 tn1 fn1 -> 1/sqrt(4)
        (0, R0, None, 2 / math.sqrt(12), 3 / 4),
        (1, -1.0, 0.0, None, None),         # 5: timeout: round earns 0
        (0, R0, None, 3 / math.sqrt(24), 4 / 5),   # 6: 5 valid of 6 rounds
        (1, R1, None, 6 / math.sqrt(72), 5 / 6),
        (0, R0, None, 8 / math.sqrt(120), 6 / 7),
        (1, R1, None, 12 / math.sqrt(240), 7 / 8),
        (0, -1.0, 0.0, None, None),         # 10: timeout
        # 11: the last 10 rounds are 2..11; less two timeouts, 8 answers, all right (skipping the
        # -1s instead would reach back to round 1 and give 8/9); MCC tp4 tn4 fn1 -> 16/20
        (1, R1, None, 0.8, 1.0),
        (0, R0, None, 20 / math.sqrt(600), 1.0),
    ]
    t, got = _play([(h[0], h[1]) for h in hand])
    for i, ((label, answer, fixed, m, a), r) in enumerate(zip(hand, got), start=1):
        want = fixed if fixed is not None else _mix(m, a)
        assert r.reward == pytest.approx(want, abs=1e-12), f"round {i}"
    assert [r.short.n for r in got][-2:] == [8, 8] and got[-1].long.n == 10
    assert len(t.miners[0].answers) == 12 and t.miners[0].answers[4] == -1.0   # every round stored
    assert got[10].reward == pytest.approx(0.729)


def test_a_window_of_timeouts_only_scores_zero():
    _, got = _play([(1, -1.0), (0, -1.0), (1, R1)])
    assert [r.reward for r in got] == [0.0, 0.0, pytest.approx(0.125)]   # MCC 0 (one class), acc 1
    assert got[1].long.n == 0 and got[2].long.n == 1


@pytest.mark.parametrize("bad", [float("nan"), 1.7, float("inf"), -0.7, 2.5])
def test_one_nan_or_out_of_range_answer_zeroes_10_rounds_of_accuracy_and_100_of_mcc(bad):
    # -0.7 rounds to -1.0 (only an exact -1 is dropped) and 2.5 to 2: neither is a binary label
    seq = [(1, 0.9), (0, 0.1), (1, bad)] + [(i % 2, 0.9 if i % 2 else 0.1) for i in range(102)]
    t, got = _play(seq)
    rewards = [r.reward for r in got]
    assert rewards[:2] == [0.125, 1.0]
    assert rewards[2] == 0.0                                 # the bad round itself
    assert rewards[3:12] == [0.0] * 9                        # rounds 4-12: both windows hold it
    assert got[11].short.poisoned and got[11].long.poisoned
    # rounds 13-102: the last 10 are clean (accuracy 1), the last 100 still hold it (MCC 0)
    assert rewards[12:102] == [0.125] * 90
    assert not got[12].short.poisoned and got[101].long.poisoned
    assert rewards[102:] == [1.0] * 3                        # round 103: it left the window of 100
    assert len(t.miners[0].answers) == 100


def test_an_answer_that_rounds_to_2_is_only_fatal_next_to_both_labels():
    # with only label 1 in the window, {1, 2} is still a binary problem: 2 simply counts as wrong
    _, got = _play([(1, 0.9), (1, 1.7), (1, 0.8), (0, 0.1), (1, 0.9)])
    assert got[1].reward == 0.0                               # > 1: the round earns 0
    assert got[2].reward == pytest.approx(_mix(0.0, 2 / 3)) and not got[2].short.poisoned
    assert got[3].reward == 0.0 and got[3].short.poisoned     # label 0 arrives: {0, 1, 2}
    assert got[4].reward == 0.0


def test_a_negative_answer_rounds_to_no_roadwork_and_counts_later():
    _, got = _play([(1, 0.9), (0, -0.2), (1, 0.9), (0, 0.3)])
    # round 2: windows perfect (-0.2 -> 0 is right) but the answer is < 0: the round earns 0
    assert [r.reward for r in got] == [0.125, 0.0, 1.0, 1.0]
    assert got[1].long.mcc == 1.0 and got[1].short.accuracy == 1.0
    # a wrong negative answer counts as a wrong "no roadwork"
    _, got = _play([(1, 0.9), (0, 0.1), (1, -0.2)])
    assert got[2].reward == 0.0 and got[2].long.mcc == 0.5 and got[2].short.accuracy == pytest.approx(2 / 3)


def test_half_is_a_valid_no_roadwork():
    _, got = _play([(1, 0.9), (0, 0.5), (1, 0.5)])
    assert [r.reward for r in got] == [0.125, 1.0, pytest.approx(_mix(0.5, 2 / 3))]


def test_none_counts_as_a_timeout():
    t, got = _play([(1, 0.9), (0, None)])
    assert got[1].reward == 0.0 and list(t.miners[0].answers) == [0.9, -1.0]


def test_score_is_a_float32_moving_average():
    t = ScoreTracker()
    t.update(0, "hk", 0.9, 1)                                 # reward 0.125
    f32 = float(np.float32(0.05) * np.float32(0.125))
    assert t.score(0) == f32 == 0.0062500000931322575 != 0.05 * 0.125
    seq = [(i % 2, 0.9 if i % 2 else 0.1) for i in range(1, 60)]
    s32, s64 = np.float32(f32), f32
    for label, answer in seq:
        r = t.update(0, "hk", answer, label).reward
        s32 = np.float32(0.05) * np.float32(r) + np.float32(0.95) * s32
        s64 = 0.05 * r + 0.95 * s64
    assert t.score(0) == float(s32) and float(s32) != s64
    assert scoring.ema(0.4, 1.0) == pytest.approx(0.43)
    assert scoring.ema(0.4, 1.0, ScoringRules(ema_alpha=0.5)) == pytest.approx(0.7)


def test_tracker_resets_on_hotkey_change_and_keeps_100():
    t = ScoreTracker()
    for i in range(130):
        t.update(3, "old", float(i % 2), i % 2)
    assert len(t.miners[3].answers) == 100
    assert t.score(3) > 0.9
    t.update(3, "new", 1.0, 1)
    assert list(t.miners[3].answers) == [1.0] and t.miners[3].hotkey == "new"
    assert t.score(3) == pytest.approx(0.05 * 0.5 ** 3)      # a replaced hotkey starts from 0


def test_window_sizes_are_configuration():
    rules = ScoringRules(window=4, short_window=2)
    _, got = _play([(1, 0.9), (0, 0.9), (1, 0.9), (0, 0.1), (1, 0.9), (0, 0.1)], rules)
    # round 6: last 4 = rounds 3-6, all right -> MCC 1; last 2 right -> 1
    assert got[-1].reward == 1.0 and got[-1].long.n == 4 and got[-1].short.n == 2
    assert got[3].reward == pytest.approx(_mix(2 / math.sqrt(12), 1.0))   # rounds 1-4: tp2 tn1 fp1


def test_reward_of_a_hand_window_mcc_05_and_accuracy_08():
    """16 answers: tp=6, tn=6, fp=2, fn=2 (MCC = 32/64 = 0.5), 8 of the last 10 right."""
    labels = [1, 0, 1, 0, 1, 0] + [1, 0, 1, 1, 1, 0, 0, 0, 1, 0]
    right = [False, False, True, True, True, True] + [False, False, True, True, True, True,
                                                      True, True, True, True]
    answers = [0.9 if (lab == 1) == r else 0.1 for lab, r in zip(labels, right)]
    reward, long, short = scoring.score_history(labels, answers)
    assert long.mcc == pytest.approx(0.5) and short.accuracy == pytest.approx(0.8)
    assert reward == pytest.approx(0.65 ** 3) == scoring.reward(labels, answers)


def test_single_class_windows_and_floored_mcc():
    assert scoring.window_metrics([1, 1, 1, 1], [0.9, 0.8, 0.1, 0.7]).mcc == 0.0    # one true class
    assert scoring.window_metrics([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6]).mcc == 0.0    # one predicted
    assert scoring.window_metrics([1, 0, 1, 0], [0.1, 0.9, 0.2, 0.8]).mcc == 0.0    # -1 -> 0
    assert metrics.mcc([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert scoring.reward([1, 0] * 5, [1.0] * 10) == pytest.approx((0.5 * 0 + 0.5 * 0.5) ** 3)


def test_window_metrics_match_scikit_learn_as_the_validator_calls_it():
    """Cross-check of the "metrics raise -> all 0" rule against scikit-learn itself, where it is
    installed: binary metrics with positive label 1 on the rounded answers, ROC AUC on the raw
    ones; any exception zeroes the window."""
    sk = pytest.importorskip("sklearn.metrics")

    def validator(labels, answers):
        keep = [i for i, a in enumerate(answers) if a != -1]
        if not keep:
            return 0.0, 0.0
        y = np.array([labels[i] for i in keep])
        probs = np.array([answers[i] for i in keep], dtype=np.float64)
        pred = np.round(probs)
        try:
            acc = sk.accuracy_score(y, pred)
            for f in (sk.precision_score, sk.recall_score, sk.f1_score):
                f(y, pred, zero_division=0)
            both = len(np.unique(y)) > 1 and len(np.unique(pred)) > 1
            m = max(0.0, sk.matthews_corrcoef(y, pred)) if both else 0.0
            if len(np.unique(y)) > 1:
                sk.roc_auc_score(y, probs)
        except Exception:  # noqa: BLE001 - the validator's own catch-all
            return 0.0, 0.0
        return float(acc), float(m)

    rng = np.random.default_rng(0)
    odd = [float("nan"), 1.7, -0.2, -0.7, 1.2, 2.5, -1.0, 0.5, float("inf"), 3e19]
    for _ in range(400):
        n = int(rng.integers(1, 12))
        labels = list(rng.integers(0, 2, n))
        answers = [float(rng.choice(odd)) if rng.random() < 0.25 else float(rng.random()) for _ in range(n)]
        w = scoring.window_metrics(labels, answers)
        acc, m = validator(labels, answers)
        assert (w.accuracy, w.mcc) == pytest.approx((acc, m)), (labels, answers)


def test_expected_reward_perfect_constant_and_inverted():
    y = np.array([0] * 30 + [1] * 70)
    assert scoring.expected_reward(y.astype(float), y) == pytest.approx(1.0)
    assert scoring.expected_reward(1.0 - y, y) == 0.0               # MCC floored, acc 0
    # constant answer: MCC 0, accuracy over 10 ~ Binomial(10, 0.5)/10 -> E[(X/20)^3]
    k = np.arange(11)
    exact = float(np.sum(binom.pmf(k, 10, 0.5) * (k / 20) ** 3))
    assert scoring.expected_reward(np.zeros(100), y, draws=20000) == pytest.approx(exact, rel=0.03)
    assert math.isnan(scoring.expected_reward([0.2, 0.3], [1, 1]))
    with pytest.raises(ValueError, match="valid answers"):
        scoring.expected_reward([0.2, float("nan")], [1, 0])


def test_expected_reward_matches_a_simulated_validator():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(y * 0.6 + rng.uniform(0, 0.5, 400), 0, 1)           # ~80 % right
    t = ScoreTracker()
    rewards = []
    for i in range(3000):
        label = int(rng.integers(0, 2))
        idx = rng.choice(np.flatnonzero(y == label))
        r = t.update(0, "hk", float(p[idx]), label).reward
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
    assert list(metrics.binarize([0.5, 0.5000001, 0.49, 1.0])) == [0, 1, 0, 1]


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
