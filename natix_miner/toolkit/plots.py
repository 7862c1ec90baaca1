"""PNG figures for the toolkit (matplotlib, Agg backend: no display needed).

Plots are for a person reading a run, so every figure says what it shows in its title and axes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_validation(rewards: Sequence[float], scores: Sequence[float], path: Path, *,
                    title: str = "", invalid: Sequence[bool] = ()) -> Path:
    """Round rewards (dots; invalid answers in red) and the validator's EMA score over a run."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.arange(1, len(rewards) + 1)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    r = np.asarray(rewards, dtype=float)
    bad = np.asarray(invalid, dtype=bool) if len(invalid) == len(rewards) else np.zeros(len(r), bool)
    ax.scatter(x[~bad], r[~bad], s=10, alpha=0.6, label="round reward")
    if bad.any():
        ax.scatter(x[bad], r[bad], s=18, color="red", marker="x", label="invalid answer (reward 0)")
    ax.plot(x, scores, color="black", lw=2, label="score (EMA, alpha 0.05)")
    ax.set_xlabel("challenge")
    ax.set_ylabel("reward / score")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or "local validator: reward and score over the run")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reliability(curves: Mapping[str, Mapping[str, np.ndarray]], path: Path, *,
                     title: str = "reliability diagram") -> Path:
    """One line per model: observed roadwork rate against mean predicted probability per bin."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for name, b in curves.items():
        ok = b["count"] > 0
        ax.plot(b["confidence"][ok], b["positive_rate"][ok], marker="o", ms=4, label=name)
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("observed share of roadwork")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusions(matrices: Mapping[str, np.ndarray], path: Path, *,
                    title: str = "confusion matrices (rows: truth, columns: answer)") -> Path:
    """A grid of 2x2 confusion matrices, one per model."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(matrices)
    cols = min(4, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        m = np.asarray(matrices[name])
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(int(v)), ha="center", va="center",
                    color="white" if v > m.max() / 2 else "black")
        ax.set_xticks([0, 1], ["none", "roadwork"])
        ax.set_yticks([0, 1], ["none", "roadwork"])
        ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_learning_curve(history: Sequence[Mapping], path: Path, *, title: str = "",
                        best_epoch: int | None = None) -> Path:
    """Training loss (and the Gram term) per epoch on the left, val ROC AUC per dataset on the right."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [int(r["epoch"]) for r in history]
    fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    ax_l.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train loss (total)")
    ax_l.plot(epochs, [r["train_bce"] for r in history], marker=".", ls="--", label="train BCE")
    if any(r.get("gram") is not None for r in history):
        ax_l.plot(epochs, [r.get("gram") or 0.0 for r in history], marker="x", label="Gram term")
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("loss")
    ax_l.grid(alpha=0.3)
    ax_l.legend(fontsize=8)
    if any("val_auc" in r for r in history):
        ax_r.plot(epochs, [r.get("val_auc", np.nan) for r in history], marker="o", color="black",
                  label="val AUC (pooled)")
        names = sorted({k for r in history for k in (r.get("val_auc_by_dataset") or {})})
        for name in names:
            ax_r.plot(epochs, [(r.get("val_auc_by_dataset") or {}).get(name, np.nan) for r in history],
                      marker=".", label=f"val AUC {name}")
        if best_epoch:
            ax_r.axvline(best_epoch, color="grey", ls=":", label=f"kept: epoch {best_epoch}")
        ax_r.set_ylim(0.0, 1.02)
        ax_r.legend(fontsize=8, loc="lower right")
    ax_r.set_xlabel("epoch")
    ax_r.set_ylabel("ROC AUC")
    ax_r.grid(alpha=0.3)
    fig.suptitle(title or "fine-tuning learning curve", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
