"""`natix-miner quantize`: an int8 EfficientNet-Lite model, served only if it costs nothing measurable."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from loguru import logger

from natix_miner.commands.flags import EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_config_arg
from natix_miner.toolkit.challenge import ERA_CHOICES


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name, help="int8-quantise the EfficientNet-Lite tier; keep it only if val AUC and reward hold",
        description="Calibrate a static int8 ONNX model of the EfficientNet-Lite tier's backbone on "
                    "train-split images, evaluate float32 and int8 on the val split through the "
                    "engine (as `eval` does), and accept the int8 model only when the tier's ROC AUC "
                    "and the cascade's expected reward drop by no more than the tolerances. Accepted: "
                    "written next to the head (<artifacts_dir>/<tier>/onnx/features.int8.onnx) and "
                    "served with the tier's `options.quantize: int8`. Refused: nothing is written "
                    "and the command exits 1. Either way it prints what it measured.")
    add_config_arg(p)
    p.add_argument("--images", type=Path, action="append", required=True, metavar="DIR",
                   help="labelled image folder with train and val splits (manifest.csv); repeat to "
                        "pool several (judge on the dashcam folder: it is what validators send)")
    p.add_argument("--tier", default=None, metavar="NAME",
                   help="the efficientnet_lite tier to quantise (default: the first one)")
    p.add_argument("--calibration-images", type=int, default=48, metavar="N",
                   help="train images whose crops calibrate the activation ranges (default 48)")
    p.add_argument("--max-auc-drop", type=float, default=0.01, metavar="D",
                   help="largest drop of the tier's val ROC AUC that still accepts (default 0.01)")
    p.add_argument("--max-reward-drop", type=float, default=0.01, metavar="D",
                   help="largest drop of the cascade's expected val reward that still accepts (default 0.01)")
    p.add_argument("--era", default="mixed", choices=ERA_CHOICES,
                   help="validator image era for calibration and evaluation (default mixed)")
    p.add_argument("--seed", type=int, default=0, help="augmentation and subset seed (default 0)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate on a stratified subset of N val images (quick runs)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the summary here")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from natix_miner.toolkit.dataset import DatasetError
    from natix_miner.toolkit.quantize import Tolerance, format_summary, run_quantize

    if args.calibration_images < 1 or args.max_auc_drop < 0 or args.max_reward_drop < 0:
        logger.error("--calibration-images must be >= 1 and the tolerances >= 0")
        return EXIT_USAGE
    try:
        summary = asyncio.run(run_quantize(
            args.config, args.images, tier_name=args.tier, calibration_images=args.calibration_images,
            era=args.era, seed=args.seed, limit=args.limit,
            tolerance=Tolerance(tier_auc=args.max_auc_drop, reward=args.max_reward_drop),
            progress=not args.no_progress))
    except (DatasetError, ValueError) as exc:
        logger.error("quantize failed: {}", exc)
        return EXIT_USAGE
    print(format_summary(summary))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return EXIT_OK if summary["accepted"] else EXIT_FAILED
