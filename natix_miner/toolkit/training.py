"""`natix-miner train`: fit every trainable tier's head, or fine-tune its backbone with the head.

The shell orchestrates data only: which images (folders, or Hugging Face datasets through
`natix_miner.toolkit.hf_dataset`), which split, how many augmented copies, which tiers, which
mode. How features are made and how a head is fitted belongs to the tier (`TrainableTier`:
`load_for_features`, `embed`, `fit_head`, `head_probs`, `save_head`); how its backbone trains end to
end belongs to it too (`models.finetunable.FineTunable`, driven by
`natix_miner.toolkit.finetune`), so a new backbone family needs no change here.

Modes: `head` fits the head on frozen features (the quick path); `finetune` first fits that head
(a linear probe, unless `head_init="untrained"`) and then trains backbone and head together;
`lora` does the same with LoRA adapters on a transformers ViT backbone.

Honest held-out figures: the head's own choices (L2, MLP epochs) are made by grouped
cross-validation inside the training split, and the `val` split is only scored, per dataset and
per source, with the validator's decision rule (round at 0.5).
"""

from __future__ import annotations

import dataclasses
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
from natix_miner.toolkit.hf_dataset import DatasetSource, HFSample, StreamedItems, load_splits
from natix_miner.toolkit.train_augment import random_training_view


@dataclass(frozen=True)
class Item:
    """One training or evaluation image: which folder it came from and what it is."""

    sample: Sample | HFSample
    dataset: str


MODES = ("head", "finetune", "lora")


def data_fingerprint(items: Iterable[Item] | StreamedItems) -> str:
    """sha256 over the sorted (key, label) pairs: names exactly which data a head saw.

    A key is a file's absolute path or `hf:<dataset>:<split>:<row>`; a streamed split is named by
    the rows its last full pass yielded.
    """
    if isinstance(items, StreamedItems):
        pairs = sorted((k, int(lab)) for k, lab in items.seen)
    else:
        pairs = sorted((it.sample.key, int(it.sample.label)) for it in items)
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


class _StreamedAsItems:
    """A streamed training split seen as Items (its samples wrapped on the fly)."""

    def __init__(self, stream: StreamedItems, dataset: str) -> None:
        self.stream, self.dataset = stream, dataset

    @property
    def seen(self) -> list[tuple[str, int]]:
        return self.stream.seen

    def shuffled(self, epoch: int) -> StreamedItems:
        return self.stream.shuffled(epoch)

    def __iter__(self):
        for sample in self.stream:
            yield Item(sample, self.dataset)


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


def collect_datasets(sources: Sequence[DatasetSource], split: str, val_split: Optional[str], *,
                     max_images: Optional[int] = None, seed: int = 0) -> tuple[Any, list[Item]]:
    """(training Items, val Items) of Hugging Face datasets (their own splits or a seeded one).

    In memory the training Items are a list (capped per dataset like folders); a streamed dataset
    gives an iterable (only one streamed dataset at a time, and not mixed with lists).
    """
    train: list[Item] = []
    streams: list[_StreamedAsItems] = []
    val: list[Item] = []
    for src in sources:
        tr, va = load_splits(src, split, val_split, seed=seed, max_images=max_images)
        if isinstance(tr, StreamedItems):
            streams.append(_StreamedAsItems(tr, src.short_name))
        else:
            train.extend(Item(s, src.short_name) for s in _cap(tr, max_images, seed))
        val.extend(Item(s, src.short_name) for s in (va if src.streaming else _cap(va, max_images, seed)))
    if streams and (train or len(streams) > 1):
        raise ValueError("one streamed --dataset at a time, not mixed with in-memory data "
                         "(drop --streaming for the small ones)")
    return (streams[0] if streams else train), val


def load_item_image(item: Item) -> Optional[Image.Image]:
    """The item's RGB image, or None (with a warning) when it cannot be read."""
    try:
        return item.sample.load()
    except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop training
        logger.warning("skipping unreadable image {}: {}", item.sample.key, exc)
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

    total = len(items) * (1 + copies) if hasattr(items, "__len__") else None
    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for idx, item in enumerate(items):
            image = load_item_image(item)
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
    if cache_dir is None or not isinstance(items, (list, tuple)):
        return extract(tier, items, copies=copies, seed=seed, batch=batch, desc=desc)
    key_src = {"tier": tier.name, "backend": tier.spec.backend, "checkpoint": tier.spec.checkpoint,
               "describe": {k: v for k, v in tier.describe().items() if k in ("options", "weights")},
               "data": data_fingerprint(items), "order": [it.sample.key for it in items],
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
    lines = [f"tier {name} ({report.get('mode', 'head')}): head -> {report['head']}",
             f"  train: {report['n_train_images']} images"
             + (f" (+{report['augment_copies']} augmented copies each), chosen L2 {report['fit'].get('l2')}"
                if "l2" in report["fit"] else " (untrained head to start)")
             + f", {report['seconds']:.0f} s"]
    ft = report.get("finetune")
    if ft:
        lines.append(f"  {report['mode']}: {ft['epochs_run']} epochs, kept epoch {ft['best_epoch']}, "
                     f"{ft['seconds']:.0f} s, peak RSS {ft['peak_rss_mib']:.0f} MiB, "
                     f"precision {ft['precision']}, curve {ft['learning_curve']}")
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


def run_training(config_path: Path, images: Path | Sequence[Path] = (), *, split: str = "train",
                 val_split: Optional[str] = "val", augment_copies: int = 2,
                 tiers: Optional[Sequence[str]] = None, max_images: Optional[int] = None,
                 seed: int = 0, device: Optional[str] = None, batch: int = 8,
                 cache_dir: Optional[Path] = None, datasets: Sequence[DatasetSource] = (),
                 mode: str = "head", finetune: Optional[Any] = None) -> dict[str, Any]:
    """Train every trainable tier of a config; returns {tier name: report}.

    `images`: folders, `datasets`: Hugging Face datasets (their `split` samples are trained on
    together and scored separately). `tiers`: names to train (default: every enabled tier).
    `device` overrides each tier's configured device. `cache_dir`: keep extracted features there
    and reuse them when tier options and data are unchanged. `mode`: head, finetune or lora;
    `finetune`: a `FinetuneSettings` for the last two.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    config_path = Path(config_path)
    cfg = load_cascade_config(config_path)
    folders = [Path(images)] if isinstance(images, (str, Path)) else [Path(p) for p in images]
    if not folders and not datasets:
        raise ValueError("no training data: give --images DIR and/or --dataset NAME_OR_PATH")
    if tiers:
        known = {t.name for t in cfg.tiers}
        unknown = sorted(set(tiers) - known)
        if unknown:
            raise ValueError(f"{config_path}: no tier named {unknown}; tiers are {sorted(known)}")
        specs = [t for t in cfg.tiers if t.name in set(tiers)]
    else:
        specs = cfg.active_tiers

    train_items: Any = collect(folders, split, max_images=max_images, seed=seed)
    val_items = collect(folders, val_split, max_images=max_images, seed=seed) if val_split else []
    if datasets:
        hf_train, hf_val = collect_datasets(datasets, split, val_split, max_images=max_images, seed=seed)
        if isinstance(hf_train, list):
            train_items = train_items + hf_train
        elif train_items:
            raise ValueError("a streamed --dataset cannot be mixed with --images folders")
        else:
            train_items = hf_train
        val_items = val_items + hf_val
    names = [str(f) for f in folders] + [d.name for d in datasets]
    streamed = not isinstance(train_items, list)
    if not streamed and len({it.sample.label for it in train_items}) < 2:
        raise ValueError(f"split {split!r} of {', '.join(names)} needs both labels "
                         f"(found {len(train_items)} images)")
    logger.info("training data: {} {} images, {} {} images from {}",
                "streamed" if streamed else len(train_items), split, len(val_items), val_split,
                ", ".join(names))
    if mode != "head":
        from natix_miner.toolkit.finetune import FinetuneSettings

        finetune = finetune or FinetuneSettings(mode=mode)
        if finetune.mode != mode:
            finetune = dataclasses.replace(finetune, mode=mode)
        finetune.check()

    config_hash = file_sha256(config_path)
    reports: dict[str, Any] = {}
    for spec in specs:
        tier = build_tier(spec)
        if not isinstance(tier, TrainableTier):
            logger.info("tier {} ({}) has no trainable head; skipped", spec.name, spec.backend)
            continue
        if mode != "head" and mode not in getattr(tier, "finetune_modes", ()):
            if tiers:
                raise ValueError(f"tier {spec.name} ({spec.backend}) cannot train in mode {mode!r} "
                                 f"(modes: {['head', *getattr(tier, 'finetune_modes', ())]})")
            logger.info("tier {} ({}) trains in head mode only; skipped by --mode {}", spec.name,
                        spec.backend, mode)
            continue
        t0 = time.perf_counter()
        dev = device or spec.device
        if mode == "head":
            tier.load_for_features(dev)
        else:
            tier.load_for_training(dev)
        try:
            report = _train_tier(tier, train_items, val_items, mode=mode, finetune=finetune,
                                 augment_copies=augment_copies, seed=seed, batch=batch,
                                 cache_dir=cache_dir, split=split, val_split=val_split, device=dev)
            metadata = {
                "mode": mode,
                "data_fingerprint": data_fingerprint(train_items),
                "val_fingerprint": data_fingerprint(val_items) if val_items else None,
                "datasets": [str(f.resolve()) for f in folders] + [d.name for d in datasets],
                "split": split, "val_split": val_split, "augment_copies": augment_copies,
                "seed": seed, "max_images": max_images,
                "config": str(config_path.resolve()), "config_hash": config_hash,
                "metrics": report.get("val"),
            }
            if mode == "head":
                report["head"] = str(tier.save_head({**metadata, "backbone": None}))
            else:
                ft = report["finetune"]
                metadata.update({"finetune": ft["settings"], "epochs_run": ft["epochs_run"],
                                 "best_epoch": ft["best_epoch"], "history": ft["history"],
                                 "train_seconds": ft["seconds"], "peak_rss_mib": ft["peak_rss_mib"],
                                 "peak_cuda_mib": ft["peak_cuda_mib"], "head_info": report.pop("_head_info")})
                report["head"] = str(tier.save_finetuned(report.pop("_net"), metadata))
                from natix_miner.toolkit.plots import plot_learning_curve

                ft["learning_curve"] = str(plot_learning_curve(
                    ft["history"], spec.artifact("learning_curve.png"), best_epoch=ft["best_epoch"],
                    title=f"{spec.name}: {mode}, {ft['epochs_run']} epochs (kept {ft['best_epoch']})"))
        finally:
            tier.close()
        report["seconds"] = time.perf_counter() - t0
        for line in summary_lines(spec.name, report):
            logger.info(line)
        reports[spec.name] = report
    if not reports:
        logger.warning("{}: no trainable tier among {}", config_path, [s.name for s in specs])
    return reports


def _train_tier(tier: Any, train_items: Any, val_items: list[Item], *, mode: str, finetune: Any,
                augment_copies: int, seed: int, batch: int, cache_dir: Optional[Path], split: str,
                val_split: Optional[str], device: str) -> dict[str, Any]:
    """Fit the head on frozen features (every mode starts there unless told otherwise), then for
    finetune / lora train backbone and head together; the report holds held-out figures."""
    from models.heads import initial_head

    report: dict[str, Any] = {"mode": mode, "augment_copies": augment_copies, "val_split": val_split}
    probe = mode == "head" or finetune.head_init == "probe"
    if probe:
        x, y, g = cached_extract(tier, train_items, copies=augment_copies, seed=seed, batch=batch,
                                 desc=f"{tier.name} {split}", cache_dir=cache_dir)
        report["fit"] = tier.fit_head(x, y, groups=g, seed=seed)
        report["n_train_rows"] = int(len(y))
    else:
        dim = int(np.asarray(tier.embed([Image.new("RGB", (64, 64), (128, 128, 128))])).shape[1])
        tier.head = initial_head(dim, tier.head_options().get("kind", "logistic"),
                                 tier.head_options().get("hidden", 256), seed=seed)
        report["fit"] = dict(tier.head.info)
    report["n_train_images"] = (len(train_items) if isinstance(train_items, list)
                                else len(train_items.seen))
    if mode == "head":
        if val_items:
            xv, yv, gv = cached_extract(tier, val_items, copies=0, seed=seed, batch=batch,
                                        desc=f"{tier.name} {val_split}", cache_dir=cache_dir)
            report["val"] = grouped_scores(val_items, gv, yv, tier.head_probs(xv))
        return report

    from natix_miner.toolkit.finetune import finetune as run_finetune, settings_record

    if val_items and probe:
        xv, yv, gv = cached_extract(tier, val_items, copies=0, seed=seed, batch=batch,
                                    desc=f"{tier.name} {val_split}", cache_dir=cache_dir)
        report["val_probe"] = grouped_scores(val_items, gv, yv, tier.head_probs(xv))
    res = run_finetune(tier, train_items, val_items, tier.head, finetune, seed=seed, device=device)
    if val_items and len(res.val_index):
        labels = np.array([val_items[i].sample.label for i in res.val_index], dtype=np.int64)
        report["val"] = grouped_scores(val_items, res.val_index, labels, res.val_probs)
        report["val_predictions"] = {val_items[i].sample.key: float(p)
                                     for i, p in zip(res.val_index, res.val_probs)}
    if not isinstance(train_items, list):
        report["n_train_images"] = len(train_items.seen)
    report["finetune"] = {"settings": settings_record(finetune), "epochs_run": len(res.history),
                          "best_epoch": res.best_epoch, "history": res.history, "seconds": res.seconds,
                          "peak_rss_mib": res.peak_rss_mib, "peak_cuda_mib": res.peak_cuda_mib,
                          "precision": res.precision, "device": res.device}
    report["_head_info"] = {"probe": report["fit"]}
    report["_net"] = res.net
    return report
