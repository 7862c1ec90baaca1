"""`natix-miner train`: fit the trained heads of a config's tiers on labelled image folders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loguru import logger


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name, help="train the heads of trainable tiers (e.g. EfficientNet-Lite) on image folders",
        description="Extract frozen backbone features of the training split (plus augmented "
                    "copies that mimic validator images and bad conditions), fit each trainable "
                    "tier's head, score it on the held-out split and write head.pt + head.json "
                    "under the config's artifacts_dir/<tier name>/.")
    p.add_argument("--config", type=Path, default=Path("configs/cpu.yaml"),
                   help="root YAML config whose tiers to train (default: configs/cpu.yaml)")
    p.add_argument("--images", type=Path, action="append", required=True, metavar="DIR",
                   help="labelled image folder (roadwork/ + no_roadwork/ subfolders, or a "
                        "manifest.csv with path,label[,source,split]); repeat to train on several "
                        "folders together (each is scored separately)")
    p.add_argument("--split", default="train",
                   help="split to train on ('all' = every image; default: train)")
    p.add_argument("--val-split", default="val",
                   help="held-out split to score the head on; 'none' to skip (default: val)")
    p.add_argument("--epochs-of-augmentation", type=int, default=2, metavar="K",
                   help="augmented copies per training image (validator eras, night, rain/fog, "
                        "motion blur, JPEG, occlusion); 0 = originals only (default: 2)")
    p.add_argument("--tiers", nargs="+", metavar="NAME",
                   help="train only these tiers (default: every enabled tier; tiers without a "
                        "trainable head are skipped)")
    p.add_argument("--max-images", type=int, metavar="N",
                   help="at most N images per folder and split, stratified by label (quick runs)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the augmentations and the head's cross-validation folds (default: 0)")
    p.add_argument("--device", default=None,
                   help="device for feature extraction, overriding each tier's (e.g. cpu, cuda:0)")
    p.add_argument("--batch", type=int, default=8,
                   help="images per embedding call (default: 8)")
    p.add_argument("--feature-cache", type=Path, metavar="DIR",
                   help="save extracted features in DIR and reuse them when the tier's options and "
                        "the data are unchanged (refitting a head then takes seconds)")
    p.add_argument("--report", type=Path, metavar="FILE",
                   help="also write the full training report as JSON to FILE")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from cascade.errors import ConfigError
    from natix_miner.toolkit.dataset import DatasetError
    from natix_miner.toolkit.training import run_training

    if args.epochs_of_augmentation < 0 or (args.max_images is not None and args.max_images < 1) \
            or args.batch < 1:
        logger.error("--epochs-of-augmentation must be >= 0, --max-images and --batch >= 1")
        return 2
    try:
        reports = run_training(args.config, args.images, split=args.split,
                               val_split=None if args.val_split in ("none", "") else args.val_split,
                               augment_copies=args.epochs_of_augmentation, tiers=args.tiers,
                               max_images=args.max_images, seed=args.seed, device=args.device,
                               batch=args.batch, cache_dir=args.feature_cache)
    except (ConfigError, DatasetError, ValueError, ImportError) as exc:
        logger.error("train failed: {}", exc)
        return 2
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(reports, indent=2, default=str) + "\n", encoding="utf-8")
        logger.info("report written to {}", args.report)
    return 0 if reports else 1
