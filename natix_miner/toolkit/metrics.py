"""Offline classification metrics on probabilities and 0/1 labels (numpy only).

Binarisation everywhere follows the validator: numpy `round`, so 0.5 is "no roadwork".
The subnet's windowed reward lives in `natix_miner.toolkit.scoring`; this module holds plain metrics.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def binarize(probs: ArrayLike) -> np.ndarray:
    """The validator's decision: numpy round (0.5 -> 0, anything above -> 1)."""
    return np.round(np.asarray(probs, dtype=np.float64)).astype(np.int64)


def confusion(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """2x2 counts [[tn, fp], [fn, tp]] of 0/1 labels against 0/1 predictions."""
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    if t.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {t.shape} vs {p.shape}")
    return np.array([[np.sum((t == 0) & (p == 0)), np.sum((t == 0) & (p == 1))],
                     [np.sum((t == 1) & (p == 0)), np.sum((t == 1) & (p == 1))]], dtype=np.int64)


def accuracy(y_true: ArrayLike, probs: ArrayLike) -> float:
    """Share of rounded probabilities equal to the label (0.0 on empty input)."""
    t = np.asarray(y_true, dtype=np.int64)
    if t.size == 0:
        return 0.0
    return float(np.mean(binarize(probs) == t))


def mcc_from_counts(tn: float, fp: float, fn: float, tp: float) -> float:
    """Matthews correlation from confusion counts; 0.0 where it is undefined (a zero margin)."""
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    if denom <= 0:
        return 0.0
    return float((tp * tn - fp * fn) / np.sqrt(denom))


def mcc(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Matthews correlation of 0/1 labels and 0/1 predictions (pass `binarize(probs)`)."""
    (tn, fp), (fn, tp) = confusion(y_true, y_pred).astype(np.float64)
    return mcc_from_counts(tn, fp, fn, tp)


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties as half.

    NaN when only one class is present (the AUC is undefined then).
    """
    t = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(np.sum(t == 1)), int(np.sum(t == 0))
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[t == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def ece(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> float:
    """Expected calibration error: the engine's definition, so every figure matches calibrate's."""
    from cascade.calibration import expected_calibration_error

    return float(expected_calibration_error(np.asarray(probs, dtype=np.float64),
                                            np.asarray(labels, dtype=np.int64), bins=bins))


def reliability_bins(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> dict[str, np.ndarray]:
    """Per equal-width bin: mean predicted probability, observed positive rate, count (for plots)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=bins) / count
        rate = np.bincount(idx, weights=y, minlength=bins) / count
    return {"edges": edges, "confidence": conf, "positive_rate": rate, "count": count}
