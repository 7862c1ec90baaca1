"""`natix-miner eval`: the cascade and every tier alone, offline, on validator-style images."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from loguru import logger

from natix_miner.commands.flags import EXIT_USAGE, add_config_arg, check_challenge_folder
from natix_miner.toolkit.challenge import ERA_CHOICES


def add_common_arguments(p: argparse.ArgumentParser, *, default_split: str) -> None:
    """Flags `eval` and `calibrate` share (one definition, one meaning)."""
    add_config_arg(p)
    p.add_argument("--images", type=Path, action="append", required=True, metavar="DIR",
                   help="labelled image folder (manifest.csv with path,label[,source,split] or "
                        "roadwork/ + no_roadwork/ subfolders); repeat to pool several folders")
    p.add_argument("--split", default=default_split,
                   help=f"split of the folder to use: train, val or all (default: {default_split}; "
                        "never the split the heads were trained on)")
    p.add_argument("--era", default="mixed", choices=ERA_CHOICES,
                   help="validator image era applied before scoring: augmented, letterbox, raw, or "
                        "mixed (one of the three per image; default)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the per-image augmentation (fixed per image, era and seed) and of "
                        "subsets/splits (default: 0)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use a stratified random subset of N images (quick runs)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="images per tier call when scoring tiers alone (default: 8)")
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write the cache of raw tier outputs "
                        "(<artifacts_dir>/.eval_cache/tier_outputs.json)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def check_folders(args: argparse.Namespace) -> bool:
    """Every --images folder has images in --split; else say which does not (before tiers load)."""
    for folder in args.images:
        problem = check_challenge_folder(folder, args.split, both_labels=False)
        if problem:
            logger.error("{}", problem)
            return False
    return True


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name, help="evaluate the cascade and each tier offline (MCC, accuracy, AUC, ECE, reward)",
        description="Run the cascade (routed, as the miner answers) and every enabled tier alone on "
                    "labelled images after the validator's image pipeline and JPEG q75. Reports "
                    "MCC, accuracy, ROC AUC, ECE and the expected subnet reward at a 50/50 label "
                    "mix, by tier, by era and by the folder's source column.")
    add_common_arguments(p, default_split="val")
    p.add_argument("--calibration", type=Path, default=None, metavar="PATH",
                   help="calibration file to evaluate (default: engine.calibration of the config)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help='write {"cascade", "tiers", "by_source", "by_era"} figures as JSON')
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write reliability.png, confusion.png and predictions.csv here")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from natix_miner.commands.serve import report_start_failure
    from natix_miner.toolkit.dataset import DatasetError
    from natix_miner.toolkit.evaluation import format_report, run_eval

    if args.limit is not None and args.limit < 2 or args.batch_size < 1:
        logger.error("--limit must be >= 2 and --batch-size >= 1")
        return EXIT_USAGE
    if not check_folders(args):
        return EXIT_USAGE
    try:
        rep = asyncio.run(run_eval(args.config, args.images, split=args.split, era=args.era,
                                   seed=args.seed, limit=args.limit, calibration_path=args.calibration,
                                   json_path=args.json, out_dir=args.out,
                                   use_cache=not args.no_cache, batch_size=args.batch_size,
                                   progress=not args.no_progress))
    except (DatasetError, ValueError) as exc:
        logger.error("eval failed: {}", exc)
        return 2
    except Exception as exc:  # engine start-up: the same message and exit code as `serve`
        code = report_start_failure(exc)
        if code < 0:
            raise
        return code
    print(format_report(rep))
    return 0
