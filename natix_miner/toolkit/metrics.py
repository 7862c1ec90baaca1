"""Offline classification metrics on probabilities and 0/1 labels: one implementation each.

- MCC, accuracy and ROC AUC are scikit-learn's `matthews_corrcoef`, `accuracy_score` and
  `roc_auc_score`: the functions the subnet's validator itself calls, so a figure here is the
  validator's figure (checked equal to the former hand-written versions on 3000 random cases).
- ECE, the reliability bins and the vectorised MCC from confusion counts live in the engine
  (`cascade.calibration`, which may not import the toolkit) and are re-exported here.

Binarisation everywhere follows the validator: numpy `round`, so 0.5 is "no roadwork".
The subnet's windowed reward lives in `natix_miner.toolkit.scoring`; this module holds plain metrics.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, matthews_corrcoef, roc_auc_score

from cascade.calibration import mcc_from_counts, reliability_bins
from cascade.calibration import expected_calibration_error as _ece

ArrayLike = Sequence[float] | np.ndarray

__all__ = ["accuracy", "binarize", "confusion", "ece", "mcc", "mcc_from_counts", "reliability_bins",
           "roc_auc"]


def binarize(probs: ArrayLike) -> np.ndarray:
    """The validator's decision: numpy round (0.5 -> 0, anything above -> 1)."""
    return np.round(np.asarray(probs, dtype=np.float64)).astype(np.int64)


def _labels(y: ArrayLike) -> np.ndarray:
    return np.asarray(y, dtype=np.int64).reshape(-1)


def confusion(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """2x2 counts [[tn, fp], [fn, tp]] of 0/1 labels against 0/1 predictions."""
    t, p = _labels(y_true), _labels(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {t.shape} vs {p.shape}")
    return np.bincount(2 * t + p, minlength=4).reshape(2, 2).astype(np.int64)


def accuracy(y_true: ArrayLike, probs: ArrayLike) -> float:
    """Share of rounded probabilities equal to the label (0.0 on empty input)."""
    t = _labels(y_true)
    if t.size == 0:
        return 0.0
    return float(accuracy_score(t, binarize(probs).reshape(-1)))


def mcc(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Matthews correlation of 0/1 labels and 0/1 predictions (pass `binarize(probs)`); 0.0 when
    undefined (one true or one predicted class, or no data)."""
    t, p = _labels(y_true), _labels(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {t.shape} vs {p.shape}")
    if t.size == 0 or np.unique(t).size < 2 or np.unique(p).size < 2:
        return 0.0  # scikit-learn's value too, without its warning
    return float(matthews_corrcoef(t, p))


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    t = _labels(y_true)
    if np.unique(t).size < 2:
        return math.nan
    return float(roc_auc_score(t, np.asarray(scores, dtype=np.float64).reshape(-1)))


def ece(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> float:
    """Expected calibration error: the engine's definition, so every figure matches calibrate's."""
    return float(_ece(np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64),
                      bins=bins))
