"""`natix-miner train`: fit every trainable tier's head on labelled image folders.

The shell orchestrates data only: which images, which split, how many augmented copies, which
tiers. How features are made and how a head is fitted belongs to the tier (`TrainableTier`:
`load_backbone`, `embed`, `fit_head`, `head_probs`, `save_head`), so a new backbone family needs
no change here.

Honest held-out figures: the head's own choices (L2, MLP epochs) are made by grouped
cross-validation inside the training split, and the `val` split is only scored, per dataset and
per source, with the validator's decision rule (round at 0.5).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from loguru import logger
from PIL import Image
from tqdm import tqdm

from cascade.config import load_cascade_config
from cascade.tier import TrainableTier
from models.registry import build_tier
from natix_miner.toolkit import challenge, metrics
from natix_miner.toolkit.dataset import Sample, load_folder, select
from natix_miner.toolkit.train_augment import random_training_view


@dataclass(frozen=True)
class Item:
    """One training or evaluation image: which folder it came from and what it is."""

    sample: Sample
    dataset: str


def data_fingerprint(items: Iterable[Item]) -> str:
    """sha256 over the sorted (path, label) pairs: names exactly which data a head saw."""
    pairs = sorted((str(it.sample.path.resolve()), int(it.sample.label)) for it in items)
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cap(samples: list[Sample], n: Optional[int], seed: int) -> list[Sample]:
    """At most n samples, stratified by label, chosen deterministically from `seed`."""
    if n is None or len(samples) <= n:
        return samples
    rng = np.random.default_rng(seed)
    pos = [s for s in samples if s.label == 1]
    neg = [s for s in samples if s.label == 0]
    n_pos = min(len(pos), max(1 if pos else 0, round(n * len(pos) / len(samples))))
    n_neg = min(len(neg), n - n_pos)
    keep = ([pos[i] for i in sorted(rng.choice(len(pos), n_pos, replace=False))] +
            [neg[i] for i in sorted(rng.choice(len(neg), n_neg, replace=False))])
    return sorted(keep, key=lambda s: str(s.path))


def collect(folders: Sequence[Path], split: str, *, max_images: Optional[int] = None,
            seed: int = 0) -> list[Item]:
    """The `split` samples of every folder (dataset name = folder name), capped per folder."""
    items: list[Item] = []
    for folder in folders:
        folder = Path(folder)
        chosen = _cap(select(load_folder(folder), split), max_images, seed)
        items.extend(Item(s, folder.name) for s in chosen)
    return items


def _load(item: Item) -> Optional[Image.Image]:
    try:
        return item.sample.load()
    except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop training
        logger.warning("skipping unreadable image {}: {}", item.sample.path, exc)
        return None


def extract(tier: TrainableTier, items: Sequence[Item], *, copies: int = 0, seed: int = 0,
            batch: int = 8, desc: str = "features") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of each image and of `copies` augmented views of it.

    Returns (features [M, D], labels [M], group [M]) where group is the index of the source
    image in `items`, so an image and its copies stay on one side of any split. The augmented
    views draw from a generator seeded by (seed, image index, copy), so a rerun sees the same views.
    """
    feats: list[np.ndarray] = []
    labels: list[int] = []
    groups: list[int] = []
    pending: list[tuple[Image.Image, int, int]] = []

    def flush() -> None:
        if not pending:
            return
        f = np.asarray(tier.embed([im for im, _, _ in pending]), dtype=np.float32)
        feats.append(f)
        labels.extend(lab for _, lab, _ in pending)
        groups.extend(g for _, _, g in pending)
        pending.clear()

    with tqdm(total=len(items) * (1 + copies), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for idx, item in enumerate(items):
            image = _load(item)
            if image is None:
                bar.update(1 + copies)
                continue
            pending.append((image, item.sample.label, idx))
            for k in range(copies):
                rng = np.random.default_rng([seed, idx, k])
                pending.append((random_training_view(image, rng), item.sample.label, idx))
            if len(pending) >= batch:
                flush()
            bar.update(1 + copies)
        flush()
    if not feats:
        raise ValueError(f"{desc}: no readable images")
    return np.concatenate(feats), np.asarray(labels, dtype=np.int64), np.asarray(groups, dtype=np.int64)


def cached_extract(tier: TrainableTier, items: Sequence[Item], *, copies: int, seed: int, batch: int,
                   desc: str, cache_dir: Optional[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`extract`, reusing features saved by an earlier run with the same tier, options and data.

    The key hashes what the shell can see: the tier's name, backend, checkpoint and options
    (`describe()`), the (path, label) list, the copies, the seed and the validator pipeline's
    version (augmented copies are made with it). Refitting a head with other
    settings, or scoring an ablation, then costs seconds instead of a feature extraction.
    """
    if cache_dir is None:
        return extract(tier, items, copies=copies, seed=seed, batch=batch, desc=desc)
    key_src = {"tier": tier.name, "backend": tier.spec.backend, "checkpoint": tier.spec.checkpoint,
               "describe": {k: v for k, v in tier.describe().items() if k in ("options", "weights")},
               "data": data_fingerprint(items), "order": [str(it.sample.path) for it in items],
               "copies": copies, "seed": seed, "pipeline": challenge.PIPELINE_VERSION}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{tier.name}-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            logger.info("{}: features from cache {}", desc, path)
            return z["x"], z["y"], z["g"]
    x, y, g = extract(tier, items, copies=copies, seed=seed, batch=batch, desc=desc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y, g=g)
    tmp.replace(path)
    return x, y, g


def score(labels: Sequence[int], probs: Sequence[float]) -> dict[str, Any]:
    """Held-out figures with the validator's decision rule (round at 0.5)."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    out: dict[str, Any] = {"n": int(len(y)), "positives": int(y.sum()),
                           "mcc": metrics.mcc(y, metrics.binarize(p)),
                           "accuracy": metrics.accuracy(y, p), "auc": metrics.roc_auc(y, p)}
    (tn, fp), (fn, tp) = metrics.confusion(y, metrics.binarize(p)).tolist()
    out.update({"tp": tp, "fp": fp, "tn": tn, "fn": fn})
    try:
        out["ece"] = metrics.ece(p, y)
    except ImportError:  # the engine's calibration module is optional for this figure
        pass
    return out


def grouped_scores(items: Sequence[Item], groups: np.ndarray, labels: np.ndarray,
                   probs: np.ndarray) -> dict[str, Any]:
    """Pooled, per-dataset and per-source held-out scores."""
    result: dict[str, Any] = {"all": score(labels, probs)}
    for key in ("dataset", "source"):
        names = np.array([items[g].dataset if key == "dataset" else items[g].sample.source for g in groups])
        result[f"by_{key}"] = {str(n): score(labels[names == n], probs[names == n]) for n in np.unique(names)}
    return result


def _fmt(x: Any) -> str:
    return "  n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:5.3f}"


def summary_lines(name: str, report: dict[str, Any]) -> list[str]:
    lines = [f"tier {name}: head -> {report['head']}",
             f"  train: {report['n_train_images']} images (+{report['augment_copies']} augmented copies "
             f"each), chosen L2 {report['fit'].get('l2')}, {report['seconds']:.0f} s"]
    held = report.get("val")
    if held:
        lines.append(f"  held-out ({report['val_split']}):        n    pos   MCC   acc   AUC")
        rows = [("all", held["all"])] + [(f"{k}", v) for k, v in held["by_dataset"].items()]
        if len(held["by_source"]) > 1:
            rows += [(f"  source {k}", v) for k, v in held["by_source"].items()]
        for label, m in rows:
            lines.append(f"    {label:<28} {m['n']:5d} {m['positives']:5d} {_fmt(m['mcc'])} "
                         f"{_fmt(m['accuracy'])} {_fmt(m['auc'])}")
    return lines


def run_training(config_path: Path, images: Path | Sequence[Path], *, split: str = "train",
                 val_split: Optional[str] = "val", augment_copies: int = 2,
                 tiers: Optional[Sequence[str]] = None, max_images: Optional[int] = None,
                 seed: int = 0, device: Optional[str] = None, batch: int = 8,
                 cache_dir: Optional[Path] = None) -> dict[str, Any]:
    """Train the head of every trainable tier of a config; returns {tier name: report}.

    `images`: one folder or several (their `split` samples are trained on together and scored
    separately). `tiers`: names to train (default: every enabled tier). `device` overrides each
    tier's configured device for feature extraction. `cache_dir`: keep extracted features there
    and reuse them when tier options and data are unchanged.
    """
    config_path = Path(config_path)
    cfg = load_cascade_config(config_path)
    folders = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
    if not folders:
        raise ValueError("no image folders given")
    if tiers:
        known = {t.name for t in cfg.tiers}
        unknown = sorted(set(tiers) - known)
        if unknown:
            raise ValueError(f"{config_path}: no tier named {unknown}; tiers are {sorted(known)}")
        specs = [t for t in cfg.tiers if t.name in set(tiers)]
    else:
        specs = cfg.active_tiers

    train_items = collect(folders, split, max_images=max_images, seed=seed)
    val_items = collect(folders, val_split, max_images=max_images, seed=seed) if val_split else []
    if len({it.sample.label for it in train_items}) < 2:
        raise ValueError(f"split {split!r} of {', '.join(map(str, folders))} needs both labels "
                         f"(found {len(train_items)} images)")
    logger.info("training data: {} {} images, {} {} images from {}", len(train_items), split,
                len(val_items), val_split, ", ".join(str(f) for f in folders))

    config_hash = file_sha256(config_path)
    reports: dict[str, Any] = {}
    for spec in specs:
        tier = build_tier(spec)
        if not isinstance(tier, TrainableTier):
            logger.info("tier {} ({}) has no trainable head; skipped", spec.name, spec.backend)
            continue
        t0 = time.perf_counter()
        tier.load_backbone(device or spec.device)
        try:
            x, y, g = cached_extract(tier, train_items, copies=augment_copies, seed=seed, batch=batch,
                                     desc=f"{spec.name} {split}", cache_dir=cache_dir)
            fit = tier.fit_head(x, y, groups=g, seed=seed)
            report: dict[str, Any] = {"n_train_images": len(train_items), "n_train_rows": int(len(y)),
                                      "augment_copies": augment_copies, "fit": fit, "val_split": val_split}
            if val_items:
                xv, yv, gv = cached_extract(tier, val_items, copies=0, seed=seed, batch=batch,
                                            desc=f"{spec.name} {val_split}", cache_dir=cache_dir)
                report["val"] = grouped_scores(val_items, gv, yv, tier.head_probs(xv))
            metadata = {
                "data_fingerprint": data_fingerprint(train_items),
                "val_fingerprint": data_fingerprint(val_items) if val_items else None,
                "datasets": [str(f.resolve()) for f in folders],
                "split": split, "val_split": val_split, "augment_copies": augment_copies,
                "seed": seed, "max_images": max_images,
                "config": str(config_path.resolve()), "config_hash": config_hash,
                "metrics": report.get("val"),
            }
            report["head"] = str(tier.save_head(metadata))
        finally:
            tier.close()
        report["seconds"] = time.perf_counter() - t0
        for line in summary_lines(spec.name, report):
            logger.info(line)
        reports[spec.name] = report
    if not reports:
        logger.warning("{}: no trainable tier among {}", config_path, [s.name for s in specs])
    return reports
