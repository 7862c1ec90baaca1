"""Fusion of the tiers' calibrated probabilities into one.

The weighted geometric mean of odds: p = prod(p_i^w_i) / (prod(p_i^w_i) + prod((1-p_i)^w_i)),
with the weights normalised over the tiers that answered. It is the log-linear pool: in logit
space it is the weighted mean of the tiers' logits, so a tier that did not answer (failed, cut by
the deadline, or never reached because the router stopped early) simply drops out and the rest
renormalise. Probabilities are clipped away from 0 and 1 before the logs so one overconfident tier
cannot veto the others with an infinite logit.
"""

import math
from typing import Sequence

import numpy as np

EPS = 1e-6


def clip_prob(p: "float | np.ndarray") -> "float | np.ndarray":
    """Clip into [EPS, 1-EPS]; NaN becomes 0.5 (no information) rather than poisoning a product."""
    arr = np.nan_to_num(np.asarray(p, dtype=np.float64), nan=0.5)
    out = np.clip(arr, EPS, 1.0 - EPS)
    return float(out) if np.ndim(out) == 0 else out


def logit(p: "float | np.ndarray") -> "float | np.ndarray":
    q = clip_prob(p)
    return np.log(q) - np.log1p(-q)


def sigmoid(z: "float | np.ndarray") -> "float | np.ndarray":
    z = np.asarray(z, dtype=np.float64)
    out = np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))
    return float(out) if out.ndim == 0 else out


def weighted_geometric_mean(probs: Sequence[float], weights: Sequence[float]) -> float:
    """Fused probability of the tiers that answered; weights need not sum to one.

    Non-finite or negative weights count as 0; when every weight is 0 the tiers count equally.
    An empty input is an error: the caller decides what "no answer" means (the fallback).
    """
    p = np.asarray(list(probs), dtype=np.float64)
    w = np.asarray(list(weights), dtype=np.float64)
    if p.size == 0:
        raise ValueError("weighted_geometric_mean needs at least one probability")
    if p.shape != w.shape:
        raise ValueError(f"{p.size} probabilities but {w.size} weights")
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    total = w.sum()
    w = np.full_like(p, 1.0 / p.size) if total <= 0 else w / total
    q = clip_prob(p)
    # log of the numerator and denominator; the ratio through a stable sigmoid of their difference.
    log_yes = float(np.sum(w * np.log(q)))
    log_no = float(np.sum(w * np.log1p(-q)))
    out = float(sigmoid(log_yes - log_no))
    return out if math.isfinite(out) else 0.5


def fuse_matrix(prob_matrix: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Row-wise weighted geometric mean of an [N, T] matrix; NaN marks a tier that did not answer.

    A row with no answer at all fuses to NaN (the caller substitutes its fallback).
    """
    P = np.asarray(prob_matrix, dtype=np.float64)
    if P.ndim != 2:
        raise ValueError(f"prob_matrix must be [N, T], got shape {P.shape}")
    w = np.asarray(list(weights), dtype=np.float64)
    if w.shape != (P.shape[1],):
        raise ValueError(f"{P.shape[1]} tiers but {w.size} weights")
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    answered = np.isfinite(P)
    W = np.where(answered, w[None, :], 0.0)
    tot = W.sum(axis=1, keepdims=True)
    # rows whose answering tiers all weigh 0 count those tiers equally
    eq = np.where(answered, 1.0, 0.0)
    W = np.where(tot > 0, W / np.where(tot > 0, tot, 1.0), eq / np.maximum(eq.sum(axis=1, keepdims=True), 1))
    z = np.sum(W * np.where(answered, logit(np.where(answered, P, 0.5)), 0.0), axis=1)
    out = sigmoid(z)
    out = np.asarray(out, dtype=np.float64).reshape(-1)
    out[~answered.any(axis=1)] = np.nan
    return out
