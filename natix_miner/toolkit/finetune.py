"""End-to-end and LoRA fine-tuning of a tier's backbone with its head (`train --mode finetune|lora`).

The loop knows nothing of a backbone: the tier builds a `TrainingNet` (models.finetunable) whose
eval-mode output is what the served tier computes, gives each image's inputs (its own crops and
tiles) and saves what it trained. Here: sampling, on-the-fly augmentation, AdamW with a lower
learning rate for the backbone, a cosine schedule with warm-up, optional Gram anchoring, early
stopping on the val split's ROC AUC, and `accelerate` for device placement, mixed precision and
gradient accumulation, so one command runs on a CPU or a GPU.

Sampling: every epoch draws `epoch_size` training images with replacement, each (dataset, label)
cell (or each label, `balance="class"`) with equal probability, so a few dashcam positives are
not drowned by thousands of web photos and the head's probability refers to the validators'
50/50 prior. Each draw is its own augmented view (validator eras, conditions, JPEG; seeded by
(seed, epoch, draw)). A streamed training split is read in stream order through a seeded shuffle
buffer instead, with class-balanced loss weights per batch.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from loguru import logger
from tqdm import tqdm

from models.finetunable import FineTunable, LoraSettings, NetOptions, TrainingNet
from models.heads import Head, class_weights
from natix_miner.toolkit import metrics
from natix_miner.toolkit.gram import gram_loss
from natix_miner.toolkit.train_augment import random_training_view
from natix_miner.toolkit.training import load_item_image

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BALANCES = ("dataset", "class")


@dataclass(frozen=True)
class FinetuneSettings:
    """Every knob of one fine-tuning run (the `train` flags of the same names)."""

    mode: str = "finetune"
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 1
    lr_backbone: float = 1e-4
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    # Epochs without a better val criterion before stopping (0 = never stop early).
    patience: int = 2
    # Images drawn per epoch; None = as many as the training split holds.
    epoch_size: Optional[int] = None
    balance: str = "dataset"
    gram_weight: float = 0.0
    precision: str = "auto"
    # Start from a head fitted on frozen features ("probe") or an untrained one ("untrained").
    head_init: str = "probe"
    augment: bool = True
    workers: int = 0
    # Val criterion for early stopping: "mean" (of the per-dataset AUCs), "all" (pooled) or a
    # dataset name.
    select_on: str = "mean"
    max_grad_norm: float = 1.0
    lora: LoraSettings = field(default_factory=LoraSettings)

    def check(self) -> None:
        problems = []
        if self.mode not in ("finetune", "lora"):
            problems.append(f"mode {self.mode!r} (finetune or lora)")
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            problems.append("epochs, batch size and grad accumulation must be >= 1")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} (one of {PRECISIONS})")
        if self.balance not in BALANCES:
            problems.append(f"balance {self.balance!r} (one of {BALANCES})")
        if self.head_init not in ("probe", "untrained"):
            problems.append(f"head init {self.head_init!r} (probe or untrained)")
        if self.gram_weight < 0 or self.lr_backbone < 0 or self.lr_head <= 0:
            problems.append("gram weight and backbone lr must be >= 0, head lr > 0")
        if self.epoch_size is not None and self.epoch_size < 1:
            problems.append("epoch size must be >= 1")
        if problems:
            raise ValueError("fine-tuning settings: " + "; ".join(problems))


@dataclass
class FinetuneResult:
    net: TrainingNet
    history: list[dict[str, Any]]
    best_epoch: int
    val_probs: np.ndarray
    val_index: np.ndarray
    seconds: float
    peak_rss_mib: float
    peak_cuda_mib: Optional[float]
    precision: str
    device: str


def mixed_precision(precision: str, device: str) -> str:
    """accelerate's mixed_precision: bf16 on CUDA for "auto", full precision on the CPU."""
    if precision == "auto":
        return "bf16" if device.startswith("cuda") else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


class _EpochPlan(torch.utils.data.Dataset):
    """The images of one epoch, in draw order; position p gets its own seeded augmentation."""

    def __init__(self, tier: FineTunable, items: Sequence[Any], plan: np.ndarray, *, seed: int,
                 epoch: int, augment: bool) -> None:
        self.tier, self.items, self.plan = tier, items, plan
        self.seed, self.epoch, self.augment = seed, epoch, augment

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, pos: int) -> Optional[tuple[Any, int]]:
        item = self.items[int(self.plan[pos])]
        image = load_item_image(item)
        if image is None:
            return None
        if self.augment:
            image = random_training_view(image, np.random.default_rng([self.seed, self.epoch, pos]))
        return self.tier.train_inputs(image), int(item.sample.label)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, tier: FineTunable, items: Any, *, seed: int, epoch: int, augment: bool,
                 limit: Optional[int]) -> None:
        self.tier, self.items, self.seed, self.epoch, self.augment = tier, items, seed, epoch, augment
        self.limit = limit

    def __iter__(self):
        for pos, sample in enumerate(self.items.shuffled(self.epoch)):
            if self.limit is not None and pos >= self.limit:
                break
            try:
                image = sample.load()
            except Exception as exc:  # noqa: BLE001
                logger.warning("skipping unreadable image {}: {}", sample.key, exc)
                continue
            if self.augment:
                image = random_training_view(image, np.random.default_rng([self.seed, self.epoch, pos]))
            yield self.tier.train_inputs(image), int(sample.label)


def _collate(tier: FineTunable) -> Callable[[list], Optional[dict[str, Any]]]:
    def collate(batch: list) -> Optional[dict[str, Any]]:
        batch = [b for b in batch if b is not None]
        if not batch:
            return None
        return {"inputs": tier.collate_inputs([x for x, _ in batch]),
                "labels": torch.tensor([y for _, y in batch], dtype=torch.float32)}
    return collate


def draw_plan(labels: np.ndarray, strata: Optional[np.ndarray], n: int, seed: int, epoch: int) -> np.ndarray:
    """`n` training indices drawn with replacement so each (stratum, label) cell is equally likely."""
    w = class_weights(labels, True, strata).astype(np.float64)
    rng = np.random.default_rng([seed, epoch, 7])
    return rng.choice(len(labels), size=n, replace=True, p=w / w.sum())


def val_figures(labels: np.ndarray, probs: np.ndarray, datasets: np.ndarray) -> dict[str, Any]:
    """Pooled and per-dataset ROC AUC (and pooled MCC at the validator's 0.5) of one epoch."""
    out: dict[str, Any] = {"auc": metrics.roc_auc(labels, probs),
                           "mcc": metrics.mcc(labels, metrics.binarize(probs)), "by_dataset": {}}
    for name in np.unique(datasets):
        m = datasets == name
        out["by_dataset"][str(name)] = metrics.roc_auc(labels[m], probs[m])
    return out


def criterion(fig: dict[str, Any], select_on: str) -> float:
    if select_on == "all":
        value = fig["auc"]
    elif select_on == "mean":
        vals = [v for v in fig["by_dataset"].values() if v is not None and math.isfinite(v)]
        value = float(np.mean(vals)) if vals else float("nan")
    else:
        if select_on not in fig["by_dataset"]:
            raise ValueError(f"--select-on {select_on!r}: no val dataset of that name "
                             f"({sorted(fig['by_dataset'])})")
        value = fig["by_dataset"][select_on]
    return value if value is not None and math.isfinite(value) else float("-inf")


def predict_items(net: TrainingNet, tier: FineTunable, items: Sequence[Any], accelerator: Any, *,
                  batch_size: int, desc: str = "val") -> tuple[np.ndarray, np.ndarray]:
    """(P(roadwork) per readable item, their indices) from the net in eval mode, unaugmented."""
    net.eval()
    probs: list[np.ndarray] = []
    index: list[int] = []
    pending: list[tuple[Any, int]] = []

    def flush() -> None:
        if not pending:
            return
        inputs = tier.collate_inputs([x for x, _ in pending])
        inputs = {k: v.to(accelerator.device) for k, v in inputs.items()}
        with torch.no_grad(), accelerator.autocast():
            logits, _ = net(inputs)
        probs.append(torch.sigmoid(logits.double()).cpu().numpy())
        index.extend(i for _, i in pending)
        pending.clear()

    for i, item in enumerate(tqdm(items, desc=desc, unit="img", leave=False, dynamic_ncols=True)):
        image = load_item_image(item)
        if image is None:
            continue
        pending.append((tier.train_inputs(image), i))
        if len(pending) >= batch_size:
            flush()
    flush()
    return (np.concatenate(probs) if probs else np.zeros(0)), np.asarray(index, dtype=np.int64)


def finetune(tier: Any, train_items: Any, val_items: Sequence[Any], head: Head,
             settings: FinetuneSettings, *, seed: int = 0, device: str = "cpu") -> FinetuneResult:
    """Train `tier`'s backbone (loaded) and `head` together; return the best-val-epoch net.

    `train_items`: a list of Items (sampled per epoch, see module docstring) or a streamed
    split (`hf_dataset.StreamedItems`). `val_items` is scored after every epoch, unaugmented.
    """
    from accelerate import Accelerator
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    settings.check()
    if not isinstance(tier, FineTunable):
        raise ValueError(f"tier {tier.name} ({tier.spec.backend}) cannot be fine-tuned; "
                         "use --mode head")
    if settings.mode not in tier.finetune_modes:
        raise ValueError(f"tier {tier.name} ({tier.spec.backend}) trains in modes "
                         f"{['head', *tier.finetune_modes]}, not {settings.mode!r}")
    t0 = time.perf_counter()
    mp = mixed_precision(settings.precision, device)
    accelerator = Accelerator(cpu=not device.startswith("cuda"), mixed_precision=mp,
                              gradient_accumulation_steps=settings.grad_accum)
    torch.manual_seed(seed)
    gram_on = settings.gram_weight > 0
    net = tier.training_net(head, NetOptions(mode=settings.mode, gram=gram_on, lora=settings.lora))
    streamed = not isinstance(train_items, (list, tuple))
    if streamed:
        labels = strata = None
        n_epoch = settings.epoch_size
    else:
        labels = np.array([it.sample.label for it in train_items], dtype=np.int64)
        if len(set(labels.tolist())) < 2:
            raise ValueError("fine-tuning needs both labels in the training split")
        strata = (np.array([it.dataset for it in train_items]) if settings.balance == "dataset" else None)
        n_epoch = settings.epoch_size or len(train_items)
    params = net.param_groups(settings.lr_backbone, settings.lr_head, settings.weight_decay)
    optimizer = torch.optim.AdamW(params)
    if n_epoch:
        steps_per_epoch = math.ceil(n_epoch / settings.batch_size / settings.grad_accum)
        total_steps = max(1, steps_per_epoch * settings.epochs)
        scheduler = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_fraction * total_steps),
                                                    total_steps)
    else:  # a stream of unknown length: warm up over about one epoch's first steps, then constant
        scheduler = get_constant_schedule_with_warmup(optimizer, 10)
    net, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    raw_net: TrainingNet = accelerator.unwrap_model(net)
    val_labels = np.array([it.sample.label for it in val_items], dtype=np.int64)
    val_sets = np.array([it.dataset for it in val_items])
    trainable = {n for n, p in raw_net.named_parameters() if p.requires_grad}
    history: list[dict[str, Any]] = []
    best: tuple[float, int, Optional[dict[str, torch.Tensor]], np.ndarray, np.ndarray] = (
        float("-inf"), 0, None, np.zeros(0), np.zeros(0, np.int64))
    bad = 0
    collate = _collate(tier)
    for epoch in range(settings.epochs):
        if streamed:
            data = _Stream(tier, train_items, seed=seed, epoch=epoch, augment=settings.augment,
                           limit=settings.epoch_size)
        else:
            plan = draw_plan(labels, strata, n_epoch, seed, epoch)
            data = _EpochPlan(tier, train_items, plan, seed=seed, epoch=epoch, augment=settings.augment)
        loader = accelerator.prepare_data_loader(torch.utils.data.DataLoader(
            data, batch_size=settings.batch_size, collate_fn=collate, num_workers=settings.workers),
            device_placement=True)
        net.train()
        sums = {"loss": 0.0, "bce": 0.0, "gram": 0.0, "n": 0}
        bar = tqdm(loader, desc=f"{tier.name} {settings.mode} epoch {epoch + 1}/{settings.epochs}",
                   unit="batch", dynamic_ncols=True,
                   total=math.ceil(n_epoch / settings.batch_size) if n_epoch else None)
        for batch in bar:
            if batch is None:
                continue
            with accelerator.accumulate(net):
                logits, patches = net(batch["inputs"], with_patches=gram_on)
                y = batch["labels"]
                weight = (torch.from_numpy(class_weights(y.cpu().numpy(), True)).to(y.device)
                          if streamed and len(torch.unique(y)) > 1 else None)
                bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y, weight=weight)
                loss = bce
                g = None
                if gram_on:
                    g = gram_loss(patches, raw_net.teacher_patches(batch["inputs"]))
                    loss = loss + settings.gram_weight * g
                accelerator.backward(loss)
                if accelerator.sync_gradients and settings.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(net.parameters(), settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            sums["loss"] += float(loss.detach())
            sums["bce"] += float(bce.detach())
            sums["gram"] += 0.0 if g is None else float(g.detach())
            sums["n"] += 1
            bar.set_postfix(loss=f"{sums['loss'] / sums['n']:.4f}")
        n = max(sums["n"], 1)
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": sums["loss"] / n, "train_bce": sums["bce"] / n,
                               "gram": sums["gram"] / n if gram_on else None,
                               "lr_backbone": optimizer.param_groups[0]["lr"]}
        if len(val_items):
            probs, idx = predict_items(net, tier, val_items, accelerator, batch_size=settings.batch_size)
            fig = val_figures(val_labels[idx], probs, val_sets[idx])
            row.update({"val_auc": fig["auc"], "val_mcc": fig["mcc"], "val_auc_by_dataset": fig["by_dataset"]})
            crit = criterion(fig, settings.select_on)
            row["criterion"] = crit
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", val_auc=f"{fig['auc']:.3f}",
                            **{f"auc_{k[:12]}": f"{v:.3f}" for k, v in fig["by_dataset"].items()})
            if crit > best[0] + 1e-6 or best[2] is None:
                state = {k: v.detach().cpu().clone() for k, v in raw_net.state_dict().items()
                         if k in trainable or k.startswith("head.")}
                best, bad = (crit, epoch + 1, state, probs, idx), 0
            else:
                bad += 1
        bar.close()
        history.append(row)
        logger.info("{} epoch {}: loss {:.4f}{}{}", tier.name, epoch + 1, row["train_loss"],
                    f", gram {row['gram']:.5f}" if gram_on else "",
                    f", val AUC {row['val_auc']:.3f} ({', '.join(f'{k} {v:.3f}' for k, v in row['val_auc_by_dataset'].items())})"
                    if "val_auc" in row else "")
        if len(val_items) and settings.patience and bad >= settings.patience:
            logger.info("{}: early stop after epoch {} (best epoch {})", tier.name, epoch + 1, best[1])
            break
    if best[2] is not None:
        raw_net.load_state_dict(best[2], strict=False)
    else:  # no val split: the last epoch
        best = (float("nan"), len(history), None, np.zeros(0), np.zeros(0, np.int64))
    raw_net.eval()
    peak_cuda = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda")
                 and torch.cuda.is_available() else None)
    return FinetuneResult(net=raw_net, history=history, best_epoch=best[1], val_probs=best[3],
                          val_index=best[4], seconds=time.perf_counter() - t0,
                          peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          peak_cuda_mib=peak_cuda, precision=mp, device=str(accelerator.device))


def settings_record(settings: FinetuneSettings) -> dict[str, Any]:
    return asdict(settings)
