"""Calibration: per-tier probability maps, consensus weights and the final threshold map.

Three steps, fitted by `natix-miner calibrate` on labelled images the tiers never trained on:
1. each tier's raw probability goes through its own monotone map (temperature, Platt, isotonic or
   identity) so that "0.8" means the same thing from every tier before they are fused;
2. the consensus weights are fitted by maximising the likelihood of the fused geometric mean,
   shrunk toward the config's prior weights (a few hundred images cannot outvote a prior freely);
3. the final threshold map: the validator binarises with numpy `round`, where exactly 0.5 counts
   as "no roadwork". The threshold t* that maximises the subnet reward on the labelled data is
   found on the fused probability, and a monotone piecewise-linear map sends 0 -> 0, t* -> 0.5+eps
   and 1 -> 1, so "fused >= t*" is exactly "emitted rounds to 1" while the emitted value stays a
   probability-like, order-preserving number;
4. per condition (night, fog, rain, glare, motion blur, blur, low contrast; `cascade.conditions`)
   with enough labelled images (`engine.conditions.calibration_min_images` and `..._per_label`),
   its own consensus weights and threshold map, fitted on that condition's images on top of the
   pooled per-tier maps. The engine applies them to an image in that condition (the first one in
   `PRIORITY` order when it is in several) and the pooled ones to every other image.

Everything is numpy/scipy: the engine knows no model library. The fitted set is one JSON file;
a missing file means identity everywhere (with a warning), a malformed one is a clear error.
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from loguru import logger
from scipy import optimize

from cascade.conditions import PRIORITY
from cascade.config import CALIBRATION_METHODS
from cascade.consensus import clip_prob, fuse_matrix, logit, sigmoid
from cascade.errors import ConfigError

FORMAT_VERSION = 1
THRESHOLD_EPS = 1e-6


def _as_arrays(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} probabilities but {y.size} labels")
    keep = np.isfinite(p) & np.isfinite(y)
    p, y = p[keep], y[keep]
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 or 1")
    return p, y


def _nll(p: np.ndarray, y: np.ndarray, w: Optional[np.ndarray] = None) -> float:
    q = clip_prob(p)
    return float(-np.average(y * np.log(q) + (1 - y) * np.log1p(-q), weights=w))


def class_balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-row weights giving each label half the total (validators draw labels 50/50)."""
    y = np.asarray(y, dtype=np.float64)
    n_pos, n_neg = y.sum(), (1 - y).sum()
    if n_pos == 0 or n_neg == 0:
        return np.ones_like(y)
    return np.where(y == 1, 0.5 / n_pos, 0.5 / n_neg) * y.size


# --------------------------------------------------------------------------- per-tier calibrators

class Calibrator:
    """A monotone map from a tier's raw probability to a calibrated one."""

    method = "identity"

    def __call__(self, p: "float | np.ndarray") -> "float | np.ndarray":
        arr = np.asarray(p, dtype=np.float64)
        out = np.clip(np.nan_to_num(self._apply(arr), nan=0.5), 0.0, 1.0)
        return float(out) if out.ndim == 0 else out

    def _apply(self, p: np.ndarray) -> np.ndarray:
        return p

    def params(self) -> dict[str, Any]:
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.params()}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Calibrator":
        method = d.get("method")
        if method == "identity":
            return Calibrator()
        if method == "temperature":
            return TemperatureCalibrator(float(d["temperature"]))
        if method == "platt":
            return PlattCalibrator(float(d["a"]), float(d["b"]))
        if method == "isotonic":
            return IsotonicCalibrator(np.asarray(d["x"], float), np.asarray(d["y"], float))
        raise ValueError(f"unknown calibration method {method!r}; expected one of {list(CALIBRATION_METHODS)}")


class TemperatureCalibrator(Calibrator):
    """sigmoid(logit(p) / T): one parameter, cannot reorder, safe on small data."""

    method = "temperature"

    def __init__(self, temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def _apply(self, p: np.ndarray) -> np.ndarray:
        return sigmoid(logit(p) / self.temperature)

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}


class PlattCalibrator(Calibrator):
    """sigmoid(a * logit(p) + b): temperature plus a bias, for tiers whose 0.5 is off-centre."""

    method = "platt"

    def __init__(self, a: float, b: float) -> None:
        self.a, self.b = float(a), float(b)

    def _apply(self, p: np.ndarray) -> np.ndarray:
        return sigmoid(self.a * logit(p) + self.b)

    def params(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b}


class IsotonicCalibrator(Calibrator):
    """Pool-adjacent-violators fit, linearly interpolated between the edges of its flat blocks."""

    method = "isotonic"

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        if x.ndim != 1 or x.shape != y.shape or x.size == 0:
            raise ValueError("isotonic calibrator needs equal-length, non-empty x and y")
        self.x, self.y = x.astype(np.float64), y.astype(np.float64)

    def _apply(self, p: np.ndarray) -> np.ndarray:
        return np.interp(p, self.x, self.y)

    def params(self) -> dict[str, Any]:
        return {"x": self.x.tolist(), "y": self.y.tolist()}


def _fit_isotonic(p: np.ndarray, y: np.ndarray) -> IsotonicCalibrator:
    """scikit-learn's isotonic regression (tied inputs pooled, then pool-adjacent-violators); its
    knots are the first and last point of each flat block, so interpolating stays monotone."""
    from sklearn.isotonic import IsotonicRegression  # offline fitting only; serving never fits

    fit = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
    x, yk = fit.X_thresholds_.astype(np.float64), fit.y_thresholds_.astype(np.float64)
    # extend to the full [0, 1] domain with flat ends
    x = np.concatenate([[0.0], x, [1.0]]) if x[0] > 0 or x[-1] < 1 else x
    yk = np.concatenate([[yk[0]], yk, [yk[-1]]]) if x.size == yk.size + 2 else yk
    return IsotonicCalibrator(x, yk)


def fit_calibrator(probs: Any, labels: Any, method: str) -> Calibrator:
    """Fit one tier's map from its raw probabilities on labelled data (method from the config)."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {list(CALIBRATION_METHODS)}")
    p, y = _as_arrays(probs, labels)
    if method == "identity":
        return Calibrator()
    if p.size < 2 or y.min() == y.max():
        logger.warning("calibration of {} needs both classes; got {} samples with labels {} -> identity",
                       method, p.size, sorted(set(y.tolist())))
        return Calibrator()
    z = logit(p)
    if method == "temperature":
        res = optimize.minimize_scalar(lambda lt: _nll(sigmoid(z / math.exp(lt)), y),
                                       bounds=(-5.0, 5.0), method="bounded")
        return TemperatureCalibrator(math.exp(float(res.x)))
    if method == "platt":
        # Platt's smoothed targets keep a perfectly separable tier from running to infinite slope.
        n_pos, n_neg = y.sum(), (1 - y).sum()
        t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

        def loss(ab: np.ndarray) -> float:
            q = clip_prob(sigmoid(ab[0] * z + ab[1]))
            return float(-np.mean(t * np.log(q) + (1 - t) * np.log1p(-q)))

        res = optimize.minimize(loss, x0=np.array([1.0, 0.0]), method="L-BFGS-B",
                                bounds=[(1e-3, 100.0), (-50.0, 50.0)])
        return PlattCalibrator(float(res.x[0]), float(res.x[1]))
    return _fit_isotonic(p, y)


# --------------------------------------------------------------------------- consensus weights

def fit_weights(prob_matrix: Any, labels: Any, prior: Sequence[float], *,
                shrinkage: float = 0.05, sample_weight: Optional[Any] = None) -> np.ndarray:
    """Consensus weights (normalised to sum 1) maximising the fused log-likelihood.

    `prob_matrix` is [N, T] calibrated probabilities with NaN where a tier did not answer.
    The objective is the mean negative log-likelihood of the fused probability plus
    `shrinkage * sum((w - prior)^2)` on normalised weights: with little data the prior wins.
    `sample_weight` (per row) weighs the likelihood, e.g. `class_balanced_weights(labels)`.
    """
    P = np.asarray(prob_matrix, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if P.ndim != 2 or P.shape[0] != y.size:
        raise ValueError(f"prob_matrix must be [N, T] with N = {y.size} labels, got {P.shape}")
    prior_arr = np.asarray(list(prior), dtype=np.float64)
    if prior_arr.shape != (P.shape[1],):
        raise ValueError(f"{P.shape[1]} tiers but {prior_arr.size} prior weights")
    prior_arr = np.clip(np.nan_to_num(prior_arr, nan=0.0), 0.0, None)
    prior_n = prior_arr / prior_arr.sum() if prior_arr.sum() > 0 else np.full(P.shape[1], 1 / P.shape[1])
    rows = np.isfinite(P).any(axis=1) & np.isfinite(y)
    sw = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64).reshape(-1)[rows]
    P, y = P[rows], y[rows]
    if P.shape[1] == 1 or P.shape[0] < 2 or y.min() == y.max():
        return prior_n

    def objective(w: np.ndarray) -> float:
        s = w.sum()
        wn = w / s if s > 0 else prior_n
        return _nll(fuse_matrix(P, wn), y, sw) + shrinkage * float(np.sum((wn - prior_n) ** 2))

    res = optimize.minimize(objective, x0=prior_n.copy(), method="L-BFGS-B",
                            bounds=[(0.0, 1.0)] * P.shape[1])
    w = np.clip(res.x, 0.0, None)
    if not np.all(np.isfinite(w)) or w.sum() <= 0:
        return prior_n
    return w / w.sum()


# --------------------------------------------------------------------------- threshold map

def expected_reward(y: np.ndarray, pred: np.ndarray, *, balanced: bool = True) -> float:
    """(0.5 * max(MCC, 0) + 0.5 * accuracy) ** 3, the subnet reward with both windows on one set.

    Validators draw labels 50/50, so by default each class gets equal total weight whatever the
    prevalence of the labelled data.
    """
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    n_pos, n_neg = y.sum(), (1 - y).sum()
    if n_pos == 0 or n_neg == 0:
        return 0.0
    tpr = float(np.sum(pred * y) / n_pos)
    fpr = float(np.sum(pred * (1 - y)) / n_neg)
    return float(_reward_from_rates(np.array([tpr]), np.array([fpr]),
                                    0.5 if balanced else n_pos / (n_pos + n_neg))[0])


def _reward_from_rates(tpr: np.ndarray, fpr: np.ndarray, prevalence: float) -> np.ndarray:
    pi = prevalence
    tp, fn = pi * tpr, pi * (1 - tpr)
    fp, tn = (1 - pi) * fpr, (1 - pi) * (1 - fpr)
    acc = tp + tn
    return (0.5 * np.maximum(mcc_from_counts(tp, fp, fn, tn), 0.0) + 0.5 * acc) ** 3


def mcc_from_counts(tp: Any, fp: Any, fn: Any, tn: Any) -> np.ndarray:
    """Matthews correlation from confusion counts (or rates), elementwise over arrays; 0 where a
    margin is empty (one true or one predicted class), as scikit-learn's matthews_corrcoef.

    The one vectorised MCC of the project (threshold sweeps, Monte-Carlo windows); the toolkit
    re-exports it from `natix_miner.toolkit.metrics`.
    """
    tp, fp, fn, tn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn))
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return np.where(den > 0, (tp * tn - fp * fn) / np.sqrt(np.where(den > 0, den, 1.0)), 0.0)


@dataclass(frozen=True)
class ThresholdMap:
    """Monotone piecewise-linear map through (0, 0), (t*, 0.5 + eps), (1, 1).

    `fused >= t*` emits a value above 0.5 (numpy round -> 1); `fused < t* * (1 - 2 eps)` emits a
    value at or below 0.5 (round -> 0).
    """

    t_star: float = 0.5
    eps: float = THRESHOLD_EPS
    reward: Optional[float] = None

    def __call__(self, p: "float | np.ndarray") -> "float | np.ndarray":
        arr = np.clip(np.nan_to_num(np.asarray(p, dtype=np.float64), nan=0.5), 0.0, 1.0)
        t, mid = self.t_star, 0.5 + self.eps
        out = np.where(arr <= t, arr / t * mid, mid + (arr - t) / (1.0 - t) * (1.0 - mid))
        out = np.clip(out, 0.0, 1.0)
        return float(out) if out.ndim == 0 else out

    @property
    def is_identity(self) -> bool:
        return self.t_star == 0.5 and self.eps == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"t_star": self.t_star, "eps": self.eps, "reward": self.reward}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "ThresholdMap":
        t = float(d["t_star"])
        if not 0.0 < t < 1.0:
            raise ValueError(f"t_star must be in (0, 1), got {t}")
        eps = float(d.get("eps", THRESHOLD_EPS))
        if not 0.0 <= eps < 0.5:  # eps < 0 moves the decision off t*; eps >= 0.5 breaks monotonicity
            raise ValueError(f"eps must be in [0, 0.5), got {eps}")
        reward = d.get("reward")
        return ThresholdMap(t, eps, None if reward is None else float(reward))


IDENTITY_MAP = ThresholdMap(0.5, 0.0)


def fit_threshold_map(probs: Any, labels: Any, *, balanced: bool = True,
                      eps: float = THRESHOLD_EPS, bounds: tuple[float, float] = (0.01, 0.99)) -> ThresholdMap:
    """Pick t* maximising the expected subnet reward of `p >= t*` and build the map.

    Candidates are midpoints between consecutive distinct probabilities, so no labelled point sits
    on the threshold; among equally good candidates the middle of the best plateau wins.
    """
    p, y = _as_arrays(probs, labels)
    if p.size < 2 or y.min() == y.max():
        logger.warning("threshold map needs both classes ({} samples) -> t* = 0.5", p.size)
        return ThresholdMap(0.5, eps)
    u = np.unique(p)
    cand = (u[:-1] + u[1:]) / 2 if u.size > 1 else u
    cand = np.unique(np.clip(np.concatenate([cand, [0.5]]), *bounds))
    pos, neg = p[y == 1], p[y == 0]
    pos_s, neg_s = np.sort(pos), np.sort(neg)
    tpr = 1.0 - np.searchsorted(pos_s, cand, side="left") / pos.size
    fpr = 1.0 - np.searchsorted(neg_s, cand, side="left") / neg.size
    prevalence = 0.5 if balanced else pos.size / p.size
    r = _reward_from_rates(tpr, fpr, prevalence)
    best = r.max()
    idx = np.flatnonzero(r >= best - 1e-12)
    # the plateau around the first best index
    run = [idx[0]]
    for i in idx[1:]:
        if i == run[-1] + 1:
            run.append(i)
        else:
            break
    t = float(cand[run[len(run) // 2]]) if len(run) % 2 else float((cand[run[len(run) // 2 - 1]] + cand[run[len(run) // 2]]) / 2)
    return ThresholdMap(float(np.clip(t, *bounds)), eps, float(best))


def reliability_bins(probs: Any, labels: Any, bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width bins on [0, 1] (a probability on an edge goes to the lower bin): per bin the
    mean probability, the observed positive rate (NaN when empty) and the count.

    The one binning behind ECE and the reliability plots; NaN inputs are left out.
    """
    p, y = _as_arrays(probs, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, weights=p, minlength=bins) / count
        rate = np.bincount(which, weights=y, minlength=bins) / count
    return {"edges": edges, "confidence": conf, "positive_rate": rate, "count": count}


def expected_calibration_error(probs: Any, labels: Any, bins: int = 15) -> float:
    """Binned |mean label - mean probability|, weighted by bin size (`reliability_bins`)."""
    b = reliability_bins(probs, labels, bins)
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    full = b["count"] > 0
    gap = np.abs(b["positive_rate"][full] - b["confidence"][full])
    return float(np.sum(b["count"][full] / n * gap))


# --------------------------------------------------------------------------- per-condition maps

POOLED = "pooled"


def resolve_weights(fitted: Mapping[str, float], priors: Mapping[str, float]) -> dict[str, float]:
    """Consensus weight of every tier in `priors`: the fitted one where there is one, else the
    config prior rescaled onto the fitted scale (fitted weights sum to 1, priors are often 1 each,
    so an unscaled prior of a tier added after calibrating would outvote every fitted tier)."""
    known = {n: float(w) for n, w in fitted.items() if n in priors}
    prior_mass = sum(priors[n] for n in known)
    scale = sum(known.values()) / prior_mass if known and prior_mass > 0 else 1.0
    return {n: known.get(n, float(p) * scale) for n, p in priors.items()}


@dataclass(frozen=True)
class ConditionMap:
    """One condition's own consensus weights and threshold map, fitted on its labelled images."""

    weights: dict[str, float]
    threshold_map: ThresholdMap
    n: int = 0  # images it was fitted on (distinct, before class balancing)
    n_positive: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "threshold_map": self.threshold_map.to_dict(),
                "n": self.n, "n_positive": self.n_positive}


def assign_conditions(flags: Mapping[str, Any], fitted: Sequence[str]) -> np.ndarray:
    """Per row, the first condition of `PRIORITY` that is set and in `fitted`, else "pooled".

    `flags` maps condition name -> [N] booleans. The engine makes the same choice per image
    (`CalibrationSet.decision_for`), and the fit assigns its images the same way, so a
    condition's map is fitted on exactly the images it will be applied to.
    """
    n = len(next(iter(flags.values()))) if flags else 0
    out = np.full(n, POOLED, dtype=object)
    free = np.ones(n, dtype=bool)
    for c in PRIORITY:
        if c in fitted and c in flags:
            rows = free & np.asarray(flags[c], dtype=bool)
            out[rows] = c
            free &= ~rows
    return out


def fit_condition_maps(calibrated: Any, labels: Any, flags: Mapping[str, Any], names: Sequence[str],
                       pooled_weights: Sequence[float], *, min_images: int, min_per_label: int,
                       balanced: bool = True) -> dict[str, ConditionMap]:
    """Fit a threshold map and consensus weights per condition that has enough labelled images.

    Conditions are taken in `PRIORITY` order; each claims its images that no earlier fitted
    condition claimed (the order the engine applies them in). A condition with fewer than
    `min_images` such images, or fewer than `min_per_label` of either label, gets nothing: its
    images keep the pooled maps. The weights are shrunk toward the pooled ones, not the config's
    priors, so a small condition moves only as far as its data says.
    """
    C = np.asarray(calibrated, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    free = np.ones(y.size, dtype=bool)
    maps: dict[str, ConditionMap] = {}
    for c in PRIORITY:
        if c not in flags:
            continue
        rows = free & np.asarray(flags[c], dtype=bool)
        n_pos = int(y[rows].sum())
        n = int(rows.sum())
        if n < min_images or min(n_pos, n - n_pos) < min_per_label:
            continue
        Pc, yc = C[rows], y[rows]
        sw = class_balanced_weights(yc) if balanced else None
        w = fit_weights(Pc, yc, pooled_weights, sample_weight=sw)
        fused = fuse_matrix(Pc, w)
        ok = np.isfinite(fused)
        tmap = fit_threshold_map(fused[ok], yc[ok], balanced=balanced)
        maps[c] = ConditionMap(dict(zip(names, map(float, w))), tmap, n, n_pos)
        free &= ~rows
    return maps


# --------------------------------------------------------------------------- the set the engine loads

@dataclass
class CalibrationSet:
    """Everything `natix-miner calibrate` fits, as the engine applies it."""

    calibrators: dict[str, Calibrator] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    threshold_map: ThresholdMap = IDENTITY_MAP
    metrics: dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None
    # condition name -> its own weights and threshold map (only where it had enough images)
    conditions: dict[str, ConditionMap] = field(default_factory=dict)

    @classmethod
    def identity(cls) -> "CalibrationSet":
        return cls()

    @property
    def is_identity(self) -> bool:
        return not self.calibrators and not self.weights and self.threshold_map.is_identity \
            and not self.conditions

    def pooled_only(self) -> "CalibrationSet":
        """The same file without its per-condition maps (to measure what they change)."""
        return dataclasses.replace(self, conditions={})

    def calibrate(self, tier: str, p: float) -> float:
        cal = self.calibrators.get(tier)
        return float(cal(p)) if cal is not None else float(np.clip(np.nan_to_num(p, nan=0.5), 0.0, 1.0))

    def weight(self, tier: str, prior: float) -> float:
        return float(self.weights.get(tier, prior))

    def final(self, p: float) -> float:
        return float(self.threshold_map(p))

    def decision_for(self, conditions: Optional[Mapping[str, Any]]) -> str:
        """Which maps an image gets: the first of its conditions (in `PRIORITY` order) that has
        its own, else "pooled"."""
        if self.conditions and conditions:
            for c in PRIORITY:
                if c in self.conditions and conditions.get(c) is True:
                    return c
        return POOLED

    def threshold_map_for(self, decision: str) -> ThresholdMap:
        cm = self.conditions.get(decision)
        return self.threshold_map if cm is None else cm.threshold_map

    def weights_for(self, decision: str, priors: Mapping[str, float]) -> dict[str, float]:
        """Consensus weights of every tier in `priors` under `decision` (see `resolve_weights`)."""
        cm = self.conditions.get(decision)
        return resolve_weights(self.weights if cm is None else cm.weights, priors)

    def apply(self, raw: Mapping[str, Any], priors: Mapping[str, float],
              conditions: Optional[Sequence[Optional[Mapping[str, Any]]]] = None, *,
              condition_aware: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Offline twin of the engine's decision for every tier answering: (fused, emitted,
        decision per row) for `raw` tier name -> [N] raw probabilities (NaN = no answer)."""
        names = list(raw)
        R = np.stack([np.asarray(raw[n], dtype=np.float64).reshape(-1) for n in names], axis=1)
        C = np.full_like(R, np.nan)
        for j, n in enumerate(names):
            ok = np.isfinite(R[:, j])
            cal = self.calibrators.get(n)
            C[ok, j] = R[ok, j] if cal is None else np.asarray(cal(R[ok, j]), dtype=np.float64)
        conds = list(conditions) if conditions is not None else [None] * R.shape[0]
        decisions = np.array([self.decision_for(c) if condition_aware else POOLED for c in conds],
                             dtype=object)
        fused = np.full(R.shape[0], np.nan)
        emitted = np.full(R.shape[0], np.nan)
        for d in set(decisions.tolist()):
            rows = decisions == d
            w = self.weights_for(d, priors)
            fused[rows] = fuse_matrix(C[rows], [w.get(n, 0.0) for n in names])
            ok = rows & np.isfinite(fused)
            emitted[ok] = self.threshold_map_for(d)(fused[ok])
        return fused, emitted, decisions

    def decision_threshold(self, default: float) -> float:
        """The fused-probability threshold the router should keep its distance from."""
        return default if self.threshold_map.is_identity else self.threshold_map.t_star

    def to_dict(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION,
                "tiers": {k: c.to_dict() for k, c in self.calibrators.items()},
                "weights": dict(self.weights),
                "threshold_map": self.threshold_map.to_dict(),
                "conditions": {k: m.to_dict() for k, m in self.conditions.items()},
                "metrics": self.metrics}

    def save(self, path: "str | Path") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: "str | Path | None") -> "CalibrationSet":
        """Load a calibration file; a missing (or unset) file is identity everywhere, with a warning."""
        if path is None:
            logger.warning("no calibration file configured: identity calibration, threshold 0.5")
            return cls.identity()
        path = Path(path)
        if not path.exists():
            logger.warning("calibration file {} not found: identity calibration, threshold 0.5 "
                           "(fit one with `natix-miner calibrate`)", path)
            return cls.identity()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(str(path), "<file>", f"a JSON calibration file ({exc})") from None
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ConfigError(str(path), "version", f"{FORMAT_VERSION}",
                              data.get("version") if isinstance(data, dict) else type(data).__name__)
        calibrators: dict[str, Calibrator] = {}
        for name, d in (data.get("tiers") or {}).items():
            try:
                calibrators[name] = Calibrator.from_dict(d)
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(str(path), f"tiers.{name}", f"a valid calibrator ({exc})") from None
        weights = _load_weights(data.get("weights"), str(path), "weights")
        tmap = _load_threshold_map(data.get("threshold_map"), str(path), "threshold_map")
        conditions: dict[str, ConditionMap] = {}
        raw_conditions = data.get("conditions") or {}
        if not isinstance(raw_conditions, dict):
            raise ConfigError(str(path), "conditions", "a mapping of condition name to its maps",
                              type(raw_conditions).__name__)
        for name, d in raw_conditions.items():
            key = f"conditions.{name}"
            if name not in PRIORITY:
                raise ConfigError(str(path), key, f"one of {list(PRIORITY)} (unknown condition)")
            if not isinstance(d, dict) or not d.get("threshold_map"):
                raise ConfigError(str(path), key, "{weights, threshold_map, n, n_positive}", d)
            conditions[name] = ConditionMap(_load_weights(d.get("weights"), str(path), f"{key}.weights"),
                                            _load_threshold_map(d["threshold_map"], str(path),
                                                                f"{key}.threshold_map"),
                                            int(d.get("n") or 0), int(d.get("n_positive") or 0))
        return cls(calibrators, weights, tmap, dict(data.get("metrics") or {}), str(path), conditions)


def _load_weights(raw: Any, source: str, key: str) -> dict[str, float]:
    weights = {}
    for name, w in (raw or {}).items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ConfigError(source, f"{key}.{name}", "a finite number >= 0", w)
        weights[name] = float(w)
    return weights


def _load_threshold_map(raw: Any, source: str, key: str) -> ThresholdMap:
    try:
        return ThresholdMap.from_dict(raw) if raw else IDENTITY_MAP
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(source, key, f"{{t_star in (0, 1), eps}} ({exc})") from None


def fit_calibration_set(raw: Mapping[str, Any], labels: Any, *, methods: Mapping[str, str],
                        prior: Mapping[str, float], bins: int = 15) -> CalibrationSet:
    """The whole fit, as `natix-miner calibrate` runs it.

    `raw` maps tier name -> [N] raw probabilities (NaN where the tier did not answer), in cascade
    order. Each tier's map is fitted on its answered rows, the weights on the calibrated matrix,
    and the threshold map on the fused result. `metrics` records ECE before/after per tier and of
    the fused probability, and the reward at t* versus at 0.5.
    """
    names = list(raw)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    R = np.stack([np.asarray(raw[n], dtype=np.float64).reshape(-1) for n in names], axis=1)
    if R.shape[0] != y.size:
        raise ValueError(f"{R.shape[0]} rows of tier probabilities but {y.size} labels")
    calibrators: dict[str, Calibrator] = {}
    C = np.full_like(R, np.nan)
    metrics: dict[str, Any] = {"n": int(y.size), "tiers": {}}
    for j, n in enumerate(names):
        ok = np.isfinite(R[:, j])
        cal = fit_calibrator(R[ok, j], y[ok], methods.get(n, "temperature"))
        calibrators[n] = cal
        C[ok, j] = cal(R[ok, j])
        metrics["tiers"][n] = {"method": cal.method, "answered": int(ok.sum()),
                               "ece_raw": expected_calibration_error(R[ok, j], y[ok], bins),
                               "ece_calibrated": expected_calibration_error(C[ok, j], y[ok], bins)}
    w = fit_weights(C, y, [prior.get(n, 1.0) for n in names])
    fused = fuse_matrix(C, w)
    ok = np.isfinite(fused)
    tmap = fit_threshold_map(fused[ok], y[ok])
    metrics["fused"] = {"ece": expected_calibration_error(fused[ok], y[ok], bins),
                        "t_star": tmap.t_star, "reward_at_t_star": tmap.reward,
                        "reward_at_0_5": expected_reward(y[ok], (fused[ok] > 0.5).astype(float))}
    return CalibrationSet(calibrators, dict(zip(names, map(float, w))), tmap, metrics)
