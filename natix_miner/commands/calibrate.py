"""`natix-miner calibrate`: fit the calibration file the engine loads, on held-out labelled images."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from loguru import logger

from cascade.config import CALIBRATION_METHODS
from natix_miner.commands.evaluate import add_common_arguments, check_folders
from natix_miner.commands.flags import EXIT_USAGE


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name, help="fit per-tier calibration, consensus weights and the decision threshold",
        description="Run every enabled tier on labelled images (validator pipeline of the chosen "
                    "era, JPEG q75), fit each tier's probability map, the consensus weights and the "
                    "reward-optimal threshold map, plus their own weights and threshold map for "
                    "each image condition (night, fog, rain, glare, motion blur, blur, low "
                    "contrast) with enough labelled images, and write the calibration file the "
                    "engine loads. A per-label random part of the images is held out of the fit "
                    "and the ECE before/after and the expected reward are reported on it. A fit "
                    "whose held-out ECE is worse than the current file's is not written (exit "
                    "status 1) unless --force.",
        epilog="Exit status: 0 written; 1 not written (held-out ECE worse than the current "
               "file's); 2 bad input or a tier that cannot start.")
    add_common_arguments(p, default_split="val")
    p.add_argument("--method", default=None, choices=list(CALIBRATION_METHODS),
                   help="calibration method for every tier (default: each tier's `calibration:` "
                        "key in the config, temperature unless set)")
    p.add_argument("--holdout-fraction", type=float, default=0.3, metavar="F",
                   help="share of images (per label) kept out of the fit to measure ECE and reward "
                        "honestly (default: 0.3; 0 fits and measures on the same images)")
    p.add_argument("--no-balance", action="store_true",
                   help="fit and measure at the data's own label mix instead of the validators' "
                        "50/50 (default: the minority label is repeated until both are equal)")
    p.add_argument("--out", type=Path, default=None, metavar="PATH",
                   help="calibration file to write (default: engine.calibration of the config, "
                        "else <artifacts_dir>/calibration.json)")
    p.add_argument("--force", action="store_true",
                   help="write the new file even when its held-out ECE is worse than that of the "
                        "file it replaces (or of no calibration, when there is none)")
    p.add_argument("--no-conditions", action="store_true",
                   help="fit the pooled maps only, no per-condition threshold maps and weights")
    p.add_argument("--condition-min-images", type=int, default=None, metavar="N",
                   help="fitting images a condition needs for its own maps (default: "
                        "engine.conditions.calibration_min_images of the config, 60)")
    p.add_argument("--condition-min-per-label", type=int, default=None, metavar="N",
                   help="... and of each label (default: engine.conditions."
                        "calibration_min_per_label, 10)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from natix_miner.commands.serve import report_start_failure
    from natix_miner.toolkit.dataset import DatasetError
    from natix_miner.toolkit.evaluation import format_calibration, run_calibration

    if args.limit is not None and args.limit < 4 or args.batch_size < 1:
        logger.error("--limit must be >= 4 and --batch-size >= 1")
        return EXIT_USAGE
    if not check_folders(args):
        return EXIT_USAGE
    try:
        summary = asyncio.run(run_calibration(
            args.config, args.images, split=args.split, era=args.era, seed=args.seed,
            limit=args.limit, method=args.method, out_path=args.out,
            holdout_fraction=args.holdout_fraction, balance=not args.no_balance, use_cache=not args.no_cache,
            batch_size=args.batch_size, progress=not args.no_progress, force=args.force,
            conditions=not args.no_conditions, condition_min_images=args.condition_min_images,
            condition_min_per_label=args.condition_min_per_label))
    except (DatasetError, ValueError) as exc:
        logger.error("calibrate failed: {}", exc)
        return 2
    except Exception as exc:  # engine start-up: the same message and exit code as `serve`
        code = report_start_failure(exc)
        if code < 0:
            raise
        return code
    print(format_calibration(summary))
    return 0 if summary["written"] else 1
