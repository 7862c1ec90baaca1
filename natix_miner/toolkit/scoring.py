"""The subnet's scoring of a miner, to the letter of SN72_PROTOCOL.md, plus its offline expectation.

Rules reproduced:
- per miner, the validator keeps the last 100 answers and labels; the history is reset when the
  hotkey behind a uid changes; an answer of -1 (timeout, error, blacklist) is not recorded;
- reward = (0.5 * MCC over the last 100 + 0.5 * accuracy over the last 10) ** 3, predictions
  binarised with numpy round (0.5 -> 0);
- MCC is floored at 0 and is 0 when the window holds one true class or one predicted class;
- a round's reward is 0 for an invalid answer (-1, < 0, > 1, NaN);
- score = 0.05 * reward + 0.95 * score (queried miners only).

Where the facts are silent: an invalid answer other than -1 (NaN, 1.7, -0.2) is still recorded in
the windows, as the validator only filters -1; it counts there as a wrong prediction. The numbers
(window sizes, weights, exponent, EMA factor) are a `ScoringRules` so a protocol revision is a
config change, not an edit through the code.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from natix_miner.toolkit.metrics import binarize
from natix_miner.toolkit.metrics import mcc as metrics_mcc


@dataclass(frozen=True)
class ScoringRules:
    """The numbers of the subnet's reward; defaults are the last active protocol (v0.4.1)."""

    # Answers kept per miner for MCC.
    window: int = 100
    # Most recent answers used for the accuracy term.
    short_window: int = 10
    # Weight of MCC (the accuracy term gets 1 - this).
    mcc_weight: float = 0.5
    # The mixed term is raised to this power.
    exponent: float = 3.0
    # score = alpha * reward + (1 - alpha) * score.
    ema_alpha: float = 0.05


DEFAULT_RULES = ScoringRules()


def is_valid_answer(answer: Optional[float]) -> bool:
    """A prediction the validator accepts: a finite number in [0, 1]."""
    if answer is None:
        return False
    try:
        a = float(answer)
    except (TypeError, ValueError):
        return False
    return not math.isnan(a) and 0.0 <= a <= 1.0


def _as_prediction(answer: float, label: int) -> int:
    """Binarise a recorded answer; an out-of-range or NaN answer is recorded as wrong."""
    return int(binarize([answer])[0]) if is_valid_answer(answer) else 1 - int(label)


def window_mcc(labels: Sequence[int], answers: Sequence[float]) -> float:
    """The validator's MCC over a window: floored at 0, 0 with one true or one predicted class."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray([_as_prediction(a, l) for a, l in zip(answers, labels)], dtype=np.int64)
    if y.size == 0 or len(np.unique(y)) < 2 or len(np.unique(p)) < 2:
        return 0.0
    return max(0.0, metrics_mcc(y, p))


def window_accuracy(labels: Sequence[int], answers: Sequence[float]) -> float:
    """Share of correct binarised answers in a window (0 for an empty window)."""
    if len(labels) == 0:
        return 0.0
    return float(np.mean([_as_prediction(a, l) == int(l) for a, l in zip(answers, labels)]))


def reward_from_metrics(mcc_long: float, acc_short: float, rules: ScoringRules = DEFAULT_RULES) -> float:
    """(w * MCC + (1 - w) * accuracy) ** exponent."""
    return float((rules.mcc_weight * mcc_long + (1.0 - rules.mcc_weight) * acc_short) ** rules.exponent)


def reward(labels: Sequence[int], answers: Sequence[float], answer: Optional[float] = None,
           rules: ScoringRules = DEFAULT_RULES) -> float:
    """The round's reward given the miner's recorded window (oldest first, this round included).

    `answer` is this round's raw answer; when it is invalid the round earns 0 whatever the window.
    """
    if answer is not None and not is_valid_answer(answer):
        return 0.0
    labels, answers = list(labels)[-rules.window:], list(answers)[-rules.window:]
    m = window_mcc(labels, answers)
    a = window_accuracy(labels[-rules.short_window:], answers[-rules.short_window:])
    return reward_from_metrics(m, a, rules)


def ema(score: float, round_reward: float, rules: ScoringRules = DEFAULT_RULES) -> float:
    """The validator's moving average of rewards."""
    return rules.ema_alpha * round_reward + (1.0 - rules.ema_alpha) * score


@dataclass
class MinerRecord:
    """One miner's state at a validator: its hotkey, windows and score."""

    hotkey: str
    answers: deque = field(default_factory=deque)
    labels: deque = field(default_factory=deque)
    score: float = 0.0


class ScoreTracker:
    """A validator's per-uid bookkeeping: windows reset on a new hotkey, -1 left out, EMA score."""

    def __init__(self, rules: ScoringRules = DEFAULT_RULES) -> None:
        self.rules = rules
        self.miners: dict[int, MinerRecord] = {}

    def _record(self, uid: int, hotkey: str) -> MinerRecord:
        rec = self.miners.get(uid)
        if rec is None or rec.hotkey != hotkey:
            rec = MinerRecord(hotkey=hotkey, answers=deque(maxlen=self.rules.window),
                              labels=deque(maxlen=self.rules.window))
            self.miners[uid] = rec
        return rec

    def update(self, uid: int, hotkey: str, answer: Optional[float], label: int) -> float:
        """Record one round; return its reward (the score moves by the EMA)."""
        rec = self._record(uid, hotkey)
        a = -1.0 if answer is None else float(answer)
        if a != -1.0:
            rec.answers.append(a)
            rec.labels.append(int(label))
        r = reward(rec.labels, rec.answers, answer=a, rules=self.rules)
        rec.score = ema(rec.score, r, self.rules)
        return r

    def score(self, uid: int) -> float:
        rec = self.miners.get(uid)
        return 0.0 if rec is None else rec.score


def expected_reward(probs: Sequence[float], labels: Sequence[int], *, draws: int = 2000,
                    seed: int = 0, rules: ScoringRules = DEFAULT_RULES) -> float:
    """The reward a validator would pay on average if it drew challenges from this data.

    Method (Monte Carlo, vectorised): `draws` full windows of `rules.window` challenges are built;
    each challenge gets a label drawn 50/50 (as validators do, so a window's class counts vary
    binomially) and a uniformly chosen example of that label, with replacement. For each window
    the formula is applied as-is: floored MCC over the whole window with the one-class rules,
    accuracy over its last `rules.short_window`, cubed mix. The mean over windows is returned.
    This is the steady-state reward of a miner whose answers on validator images behave like
    `probs` on this data; it needs both labels present and is NaN otherwise. Invalid answers in
    `probs` (NaN, outside [0, 1]) count as wrong, as in the windows.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    valid = np.isfinite(p) & (p >= 0) & (p <= 1)
    pred = np.where(valid, np.round(np.where(valid, p, 0.0)), 1 - y).astype(np.int64)
    correct_pos = pred[pos] == 1
    correct_neg = pred[neg] == 0
    rng = np.random.default_rng(seed)
    w, k = rules.window, rules.short_window
    lab = rng.integers(0, 2, size=(draws, w))
    hit = np.where(lab == 1,
                   correct_pos[rng.integers(0, pos.size, size=(draws, w))],
                   correct_neg[rng.integers(0, neg.size, size=(draws, w))])
    tp = np.sum((lab == 1) & hit, axis=1).astype(np.float64)
    fn = np.sum((lab == 1) & ~hit, axis=1).astype(np.float64)
    tn = np.sum((lab == 0) & hit, axis=1).astype(np.float64)
    fp = np.sum((lab == 0) & ~hit, axis=1).astype(np.float64)
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)   # 0 <=> one true or one predicted class
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(denom > 0, (tp * tn - fp * fn) / np.sqrt(np.where(denom > 0, denom, 1.0)), 0.0)
    m = np.maximum(m, 0.0)
    acc = hit[:, w - k:].mean(axis=1)
    r = (rules.mcc_weight * m + (1.0 - rules.mcc_weight) * acc) ** rules.exponent
    return float(r.mean())


def mcc(y_true: Sequence[int], y_pred: Sequence[float]) -> float:
    """The validator's MCC (floored, 0 with one class); `y_pred` may be 0/1 or probabilities."""
    return window_mcc(y_true, y_pred)
