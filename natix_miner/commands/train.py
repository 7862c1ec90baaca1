"""`natix-miner train`: fit the heads of a config's tiers, or fine-tune their backbones, on
labelled image folders or Hugging Face datasets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loguru import logger


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name, help="train trainable tiers (head on frozen features, or fine-tune / LoRA the backbone)",
        description="--mode head (default): extract frozen backbone features of the training split "
                    "(plus augmented copies that mimic validator images and bad conditions) and fit "
                    "each trainable tier's head. --mode finetune: then train backbone and head end "
                    "to end (AdamW, cosine schedule, early stopping on val ROC AUC, augmentations "
                    "on the fly). --mode lora: LoRA adapters on a transformers ViT backbone. Every "
                    "mode scores the held-out split and writes head.pt + head.json (and the "
                    "fine-tuned backbone) under the config's artifacts_dir/<tier name>/, where "
                    "serve and eval load them with no extra flag.")
    p.add_argument("--config", type=Path, default=Path("configs/cpu.yaml"),
                   help="root YAML config whose tiers to train (default: configs/cpu.yaml)")
    data = p.add_argument_group("data")
    data.add_argument("--images", type=Path, action="append", default=[], metavar="DIR",
                      help="labelled image folder (roadwork/ + no_roadwork/ subfolders, or a "
                           "manifest.csv with path,label[,source,split]); repeat to train on several "
                           "folders together (each is scored separately)")
    data.add_argument("--dataset", action="append", default=[], metavar="NAME_OR_PATH",
                      help="Hugging Face dataset: a hub id (e.g. natix-network-org/roadwork), a "
                           "save_to_disk directory, or parquet file(s) / a folder or glob of them; "
                           "repeatable, combinable with --images")
    data.add_argument("--image-column", default="image", help="dataset column with the image (default: image)")
    data.add_argument("--label-column", default="label",
                      help="dataset column with the label, 1 = roadwork (default: label)")
    data.add_argument("--positive-label", default=None, metavar="VALUE",
                      help="label value meaning roadwork when labels are not 0/1 (e.g. roadwork)")
    data.add_argument("--group-column", default=None,
                      help="rows sharing this column's value stay on one side of a seeded split "
                           "(e.g. a drive or scene id); default: every row is its own group")
    data.add_argument("--source-column", default=None,
                      help="dataset column naming each row's source, for per-source figures")
    data.add_argument("--val-fraction", type=float, default=0.25,
                      help="share of groups held out when a dataset has no val split (default: 0.25)")
    data.add_argument("--streaming", action="store_true",
                      help="stream the dataset instead of loading it (sets larger than memory); the "
                           "val split is materialised, cap it with --max-images")
    data.add_argument("--revision", default=None, help="hub revision (branch, tag, commit) of --dataset ids")
    data.add_argument("--split", default="train",
                      help="split to train on ('all' = every image of a folder; default: train)")
    data.add_argument("--val-split", default="val",
                      help="held-out split to score on (a dataset's 'validation' counts as val); "
                           "'none' to skip (default: val)")
    data.add_argument("--max-images", type=int, metavar="N",
                      help="at most N images per folder/dataset and split, stratified by label (quick runs)")
    p.add_argument("--mode", choices=("head", "finetune", "lora"), default="head",
                   help="head: fit the head on frozen features (quick); finetune: train backbone + "
                        "head end to end; lora: LoRA adapters + head on a transformers ViT backbone "
                        "(default: head)")
    p.add_argument("--epochs-of-augmentation", type=int, default=2, metavar="K",
                   help="augmented copies per training image for the frozen-feature head (validator "
                        "eras, night, rain/fog, motion blur, JPEG, occlusion); 0 = originals only "
                        "(default: 2)")
    p.add_argument("--tiers", nargs="+", metavar="NAME",
                   help="train only these tiers (default: every enabled tier; tiers without a "
                        "trainable head, or without the asked mode, are skipped)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the augmentations, splits, sampling and the head's CV folds (default: 0)")
    p.add_argument("--device", default=None,
                   help="device, overriding each tier's (e.g. cpu, cuda:0)")
    p.add_argument("--batch", type=int, default=8,
                   help="images per embedding call (head) and per training step (finetune/lora) (default: 8)")
    p.add_argument("--feature-cache", type=Path, metavar="DIR",
                   help="save extracted features in DIR and reuse them when the tier's options and "
                        "the data are unchanged (refitting a head then takes seconds)")
    ft = p.add_argument_group("finetune / lora")
    ft.add_argument("--epochs", type=int, default=3, help="most epochs (default: 3)")
    ft.add_argument("--epoch-size", type=int, default=None, metavar="N",
                    help="images drawn per epoch, balanced per dataset and label (default: the size "
                         "of the training split)")
    ft.add_argument("--balance", choices=("dataset", "class"), default="dataset",
                    help="equal draw probability per (dataset, label) cell or per label (default: dataset)")
    ft.add_argument("--patience", type=int, default=2,
                    help="epochs without a better val AUC before stopping; 0 = never (default: 2)")
    ft.add_argument("--select-on", default="mean", metavar="WHAT",
                    help="val figure for early stopping: mean (of per-dataset AUCs), all (pooled "
                         "AUC) or a dataset name (default: mean)")
    ft.add_argument("--lr-backbone", type=float, default=None,
                    help="backbone / adapter learning rate (default: 1e-4 finetune, 5e-4 lora)")
    ft.add_argument("--lr-head", type=float, default=1e-3, help="head learning rate (default: 1e-3)")
    ft.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    ft.add_argument("--warmup", type=float, default=0.05,
                    help="share of steps of linear warm-up before the cosine decay (default: 0.05)")
    ft.add_argument("--grad-accum", type=int, default=1,
                    help="batches per optimiser step (gradient accumulation; default: 1)")
    ft.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                    help="mixed precision through accelerate; auto = bf16 on CUDA, fp32 on CPU")
    ft.add_argument("--gram-weight", type=float, default=0.0, metavar="L",
                    help="weight of Gram anchoring: keep the backbone's patch-feature Gram matrices "
                         "near the frozen starting backbone's (default: 0 = off)")
    ft.add_argument("--head-init", choices=("probe", "untrained"), default="probe",
                    help="start from a head fitted on frozen features (probe) or an untrained one")
    ft.add_argument("--no-augment", action="store_true",
                    help="train on the images as they are (no on-the-fly augmentation)")
    ft.add_argument("--workers", type=int, default=0,
                    help="data-loader worker processes for decoding and augmentation (default: 0)")
    ft.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default: 8)")
    ft.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (default: 16)")
    ft.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (default: 0.05)")
    ft.add_argument("--lora-targets", nargs="+", default=None, metavar="MODULE",
                    help="module names to adapt (default: every Linear inside the transformer blocks)")
    ft.add_argument("--lora-save", choices=("merged", "adapter"), default="merged",
                    help="save the backbone with adapters merged in, or the adapter alone "
                         "(served merged into the base checkpoint; needs peft) (default: merged)")
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="also write the full training report as JSON to FILE")
    p.set_defaults(func=run)
    return p


def finetune_settings(args: argparse.Namespace):
    """The `FinetuneSettings` the flags describe."""
    from models.finetunable import LoraSettings
    from natix_miner.toolkit.finetune import FinetuneSettings

    lr_backbone = args.lr_backbone if args.lr_backbone is not None else (5e-4 if args.mode == "lora" else 1e-4)
    return FinetuneSettings(
        mode=args.mode if args.mode != "head" else "finetune", epochs=args.epochs,
        batch_size=args.batch, grad_accum=args.grad_accum, lr_backbone=lr_backbone,
        lr_head=args.lr_head, weight_decay=args.weight_decay, warmup_fraction=args.warmup,
        patience=args.patience, epoch_size=args.epoch_size, balance=args.balance,
        gram_weight=args.gram_weight, precision=args.precision, head_init=args.head_init,
        augment=not args.no_augment, workers=args.workers, select_on=args.select_on,
        lora=LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          targets=tuple(args.lora_targets or ()), merge=args.lora_save == "merged"))


def dataset_sources(args: argparse.Namespace) -> list:
    from natix_miner.toolkit.hf_dataset import Columns, DatasetSource

    cols = Columns(image=args.image_column, label=args.label_column, group=args.group_column,
                   source=args.source_column, positive=args.positive_label)
    return [DatasetSource(name, columns=cols, streaming=args.streaming, val_fraction=args.val_fraction,
                          revision=args.revision) for name in args.dataset]


def run(args: argparse.Namespace) -> int:
    from cascade.errors import ConfigError
    from natix_miner.toolkit.dataset import DatasetError
    from natix_miner.toolkit.training import run_training

    if args.epochs_of_augmentation < 0 or (args.max_images is not None and args.max_images < 1) \
            or args.batch < 1:
        logger.error("--epochs-of-augmentation must be >= 0, --max-images and --batch >= 1")
        return 2
    if not args.images and not args.dataset:
        logger.error("no training data: give --images DIR and/or --dataset NAME_OR_PATH")
        return 2
    if not 0.0 < args.val_fraction < 1.0:
        logger.error("--val-fraction must be in (0, 1)")
        return 2
    try:
        settings = finetune_settings(args) if args.mode != "head" else None
        if settings is not None:
            settings.check()
        reports = run_training(args.config, args.images, split=args.split,
                               val_split=None if args.val_split in ("none", "") else args.val_split,
                               augment_copies=args.epochs_of_augmentation, tiers=args.tiers,
                               max_images=args.max_images, seed=args.seed, device=args.device,
                               batch=args.batch, cache_dir=args.feature_cache,
                               datasets=dataset_sources(args), mode=args.mode, finetune=settings)
    except (ConfigError, DatasetError, ValueError, ImportError) as exc:
        logger.error("train failed: {}", exc)
        return 2
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(reports, indent=2, default=str) + "\n", encoding="utf-8")
        logger.info("report written to {}", args.report)
    return 0 if reports else 1
