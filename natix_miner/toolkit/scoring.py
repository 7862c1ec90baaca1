"""The subnet's scoring of a miner, exactly as its validators compute it, plus its offline expectation.

Rules reproduced (SN72_PROTOCOL.md, "Scoring"; checked against the subnet's validator code):
- per miner the validator keeps the last 100 rounds, EVERY round: a -1 (timeout, error, refusal)
  takes its slot too. The history is reset when the hotkey behind a uid changes;
- each round, the windows of the last 100 and the last 10 rounds are cut first, and only then are
  the -1 answers dropped from them: a -1 shrinks the window that is scored instead of being
  skipped (a window of -1 only scores 0);
- the answers left are binarised with numpy `round` (0.5 -> 0; -0.2 -> 0, so a negative answer
  other than -1 counts as "no roadwork"; 1.2 -> 1; 1.7 -> 2);
- the metrics are computed with scikit-learn, binary, positive label 1. Whenever that raises, the
  validator replaces every metric of that window by 0. It raises when a window holds a NaN or
  infinite answer, or when the labels and rounded answers together are not a binary problem with
  label 1 in it (an answer that rounds to 2 or -1 next to both labels, say). So ONE answer of NaN
  or 1.7 zeroes the accuracy term for the next 10 rounds and the MCC term for the next 100;
- MCC is max(0, MCC), and 0 unless the window holds both true classes and both predicted classes;
- reward = (0.5 * MCC(100) + 0.5 * accuracy(10)) ** 3, and 0 for a round whose own answer is -1
  or outside [0, 1] (a NaN answer is not "outside", but its windows score 0 anyway);
- score = 0.05 * reward + 0.95 * score in float32 (the validator's score vector is float32), for
  the queried miners only.

The numbers (window sizes, weights, exponent, EMA factor) are a `ScoringRules`, so a protocol
revision is a change of configuration, not an edit through the code.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from natix_miner.toolkit.metrics import binarize
from natix_miner.toolkit.metrics import mcc as metrics_mcc
from natix_miner.toolkit.metrics import mcc_from_counts

# The prediction a validator reads when the miner did not answer (the synapse's default).
NO_ANSWER = -1.0


@dataclass(frozen=True)
class ScoringRules:
    """The numbers of the subnet's reward; defaults are the last active protocol (v0.4.1)."""

    # Rounds kept per miner and used for MCC.
    window: int = 100
    # Most recent rounds used for the accuracy term.
    short_window: int = 10
    # Weight of MCC (the accuracy term gets 1 - this).
    mcc_weight: float = 0.5
    # The mixed term is raised to this power.
    exponent: float = 3.0
    # score = alpha * reward + (1 - alpha) * score.
    ema_alpha: float = 0.05


DEFAULT_RULES = ScoringRules()


def is_valid_answer(answer: Any) -> bool:
    """A prediction that can earn a reward: a finite number in [0, 1]."""
    try:
        a = float(answer)
    except (TypeError, ValueError):
        return False
    return not math.isnan(a) and 0.0 <= a <= 1.0


def recorded_answer(answer: Any) -> float:
    """What the validator records for a round: the prediction as a float; -1 when there is none
    (a failed query leaves the synapse's default -1 in place)."""
    if answer is None:
        return NO_ANSWER
    try:
        return float(answer)
    except (TypeError, ValueError):
        return NO_ANSWER


@dataclass(frozen=True)
class WindowMetrics:
    """What the validator computes over one window of rounds."""

    accuracy: float
    mcc: float
    # Rounds scored: the window's rounds less its -1 answers.
    n: int
    # True when the metric computation raised and every metric was replaced by 0.
    poisoned: bool = False


_EMPTY = WindowMetrics(accuracy=0.0, mcc=0.0, n=0)


def _metrics_raise(labels: np.ndarray, rounded: np.ndarray) -> bool:
    """Whether scikit-learn's binary metrics (positive label 1) raise on these rounded answers.

    They do on a non-finite value; on a value no integer type holds (it is then "continuous");
    on more than two distinct values among labels and answers ("multiclass" with a binary average);
    and on two distinct values of which none is 1 ("pos_label=1 is not a valid label").
    """
    if not np.all(np.isfinite(rounded)) or np.any(np.abs(rounded) >= 2.0 ** 63):
        return True
    present = set(np.unique(labels).tolist()) | set(np.unique(rounded).tolist())
    return len(present) > 2 or (len(present) == 2 and 1 not in present)


def window_metrics(labels: Sequence[int], answers: Sequence[float]) -> WindowMetrics:
    """The validator's metrics over one window already cut to its length (oldest first).

    -1 answers are dropped here, after the cut; everything else counts, rounded by numpy.
    """
    keep = [i for i, a in enumerate(answers) if a != NO_ANSWER]
    if not keep:
        return _EMPTY
    y = np.asarray([labels[i] for i in keep], dtype=np.int64)
    rounded = np.round(np.asarray([answers[i] for i in keep], dtype=np.float64))
    if _metrics_raise(y, rounded):
        return WindowMetrics(accuracy=0.0, mcc=0.0, n=len(keep), poisoned=True)
    acc = float(np.mean(rounded == y))
    if len(np.unique(y)) > 1 and len(np.unique(rounded)) > 1:
        m = max(0.0, float(metrics_mcc(y, rounded.astype(np.int64))))
    else:
        m = 0.0
    return WindowMetrics(accuracy=acc, mcc=m, n=len(keep))


def reward_from_metrics(mcc_long: float, acc_short: float, rules: ScoringRules = DEFAULT_RULES) -> float:
    """(w * MCC + (1 - w) * accuracy) ** exponent."""
    return float((rules.mcc_weight * mcc_long + (1.0 - rules.mcc_weight) * acc_short) ** rules.exponent)


@dataclass(frozen=True)
class RoundScore:
    """One round as the validator scores it: the reward, the two windows behind it, the score."""

    reward: float
    long: WindowMetrics
    short: WindowMetrics
    score: float


def round_reward(answer: float, long: WindowMetrics, short: WindowMetrics,
                 rules: ScoringRules = DEFAULT_RULES) -> float:
    """The round's reward: 0 for -1 or an answer outside [0, 1], else the formula on the windows."""
    if answer == NO_ANSWER or answer < 0.0 or answer > 1.0:
        return 0.0
    return reward_from_metrics(long.mcc, short.accuracy, rules)


def score_history(labels: Sequence[int], answers: Sequence[float],
                  rules: ScoringRules = DEFAULT_RULES) -> tuple[float, WindowMetrics, WindowMetrics]:
    """Reward and windows of the round that ends a recorded history (oldest first, this round
    last, -1 answers included)."""
    labels, answers = list(labels), [recorded_answer(a) for a in answers]
    if not answers:
        raise ValueError("a history needs at least this round")
    long = window_metrics(labels[-rules.window:], answers[-rules.window:])
    short = window_metrics(labels[-rules.short_window:], answers[-rules.short_window:])
    return round_reward(answers[-1], long, short, rules), long, short


def reward(labels: Sequence[int], answers: Sequence[float], rules: ScoringRules = DEFAULT_RULES) -> float:
    """The reward of the last round of a recorded history (see `score_history`)."""
    return score_history(labels, answers, rules)[0]


def ema(score: float, round_reward: float, rules: ScoringRules = DEFAULT_RULES) -> float:
    """The validator's moving average, in float32 as its score vector is kept."""
    a = np.float32(rules.ema_alpha)
    b = np.float32(1.0 - rules.ema_alpha)
    return float(a * np.float32(round_reward) + b * np.float32(score))


@dataclass
class MinerRecord:
    """One miner's state at a validator: its hotkey, its last rounds and its score."""

    hotkey: str
    answers: deque = field(default_factory=deque)
    labels: deque = field(default_factory=deque)
    score: float = 0.0


class ScoreTracker:
    """A validator's per-uid bookkeeping: every round recorded, windows reset on a new hotkey,
    float32 EMA score."""

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

    def update(self, uid: int, hotkey: str, answer: Any, label: int) -> RoundScore:
        """Record one round (None or a failed query counts as -1) and score it."""
        rec = self._record(uid, hotkey)
        rec.answers.append(recorded_answer(answer))
        rec.labels.append(int(label))
        r, long, short = score_history(rec.labels, rec.answers, self.rules)
        rec.score = ema(rec.score, r, self.rules)
        return RoundScore(reward=r, long=long, short=short, score=rec.score)

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
    This is the steady-state reward of a miner that answers every challenge and whose answers on
    validator images behave like `probs` on this data; it needs both labels present and is NaN
    otherwise. `probs` must be valid answers (finite, in [0, 1]): anything else zeroes whole
    windows at a validator, which `ScoreTracker` reproduces round by round.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    bad = ~(np.isfinite(p) & (p >= 0) & (p <= 1))
    if bad.any():
        raise ValueError(f"expected_reward takes valid answers (finite, in [0, 1]); got "
                         f"{p[bad][0]!r} among {int(bad.sum())} invalid ones")
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    pred = binarize(p)
    rng = np.random.default_rng(seed)
    w, k = rules.window, rules.short_window
    lab = rng.integers(0, 2, size=(draws, w))
    # each challenge: an example of its label; the miner's rounded answer on that example
    answer = np.where(lab == 1, pred[pos][rng.integers(0, pos.size, size=(draws, w))],
                      pred[neg][rng.integers(0, neg.size, size=(draws, w))])
    # every window's MCC at once from its confusion counts (the same figure as metrics.mcc, 0
    # where one true or one predicted class leaves it undefined, as validators do; one
    # scikit-learn call per window made eval and calibrate spend seconds per figure here)
    tp = np.sum((answer == 1) & (lab == 1), axis=1)
    fp = np.sum((answer == 1) & (lab == 0), axis=1)
    fn = np.sum((answer == 0) & (lab == 1), axis=1)
    tn = np.sum((answer == 0) & (lab == 0), axis=1)
    m = np.maximum(mcc_from_counts(tp, fp, fn, tn), 0.0)
    acc = (answer[:, w - k:] == lab[:, w - k:]).mean(axis=1)
    mix = rules.mcc_weight * m + (1.0 - rules.mcc_weight) * acc
    return float(np.mean(mix ** rules.exponent))
