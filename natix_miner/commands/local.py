"""`natix-miner local`: the whole miner, tested end to end on this machine, offline.

Starts the miner exactly as `natix-miner serve --local` does (the same `Miner` and `serve_until`,
on a background thread of this process): throwaway wallet, axon on 127.0.0.1, guard admitting
only the built-in validator's hotkey, signatures verified. Then the built-in validator
(`natix_miner.toolkit.validator.run_validation`) sends it challenges over the real wire, built with the
subnet's image pipeline of the chosen era, and prints MCC, accuracy, the subnet reward, latency
p50/p99 and the count of invalid answers.

When the config's trained head does not exist yet, it is trained first from the folder's
`train` split (what `natix-miner train` does), and the challenges are drawn from the `val`
split so the report is on images the head never saw.

The report ends with how to read the score and what to try next.

Exit codes: 0 after the report; 1 when training, the port or every answer failed; 2 for bad
input, caught before any tier loads (a flag value, the config, an image folder that cannot feed
challenges from the split), or a missing artefact with --no-train.
"""

import argparse
import asyncio
import socket
import sys
import tempfile
from pathlib import Path

from loguru import logger

from natix_miner.commands.flags import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_config_arg,
                                        add_count_arg, add_logging_args, add_split_arg,
                                        check_challenge_folder, existing_dir, port)
from natix_miner.commands.serve import configure_logging, report_start_failure
from natix_miner.toolkit.challenge import ERA_CHOICES

# What a miner that guesses (or answers one constant) earns per round: MCC 0, accuracy 0.5.
GUESS_REWARD = (0.5 * 0.0 + 0.5 * 0.5) ** 3


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="serve the miner locally and score it with the built-in validator",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(parser)
    parser.add_argument("--images", required=True, type=existing_dir, metavar="DIR",
                        help="labelled image folder (manifest.csv, or roadwork/ + no_roadwork/)")
    parser.add_argument("--era", default="mixed", choices=ERA_CHOICES,
                        help="validator image era: augmented, letterbox, raw, or mixed (default mixed)")
    add_count_arg(parser)
    parser.add_argument("--seed", type=int, default=0, help="challenge draw seed (default 0)")
    add_split_arg(parser)
    parser.add_argument("--axon.port", type=port, default=None, metavar="PORT",
                        help="port of the local axon (default: any free port)")
    parser.add_argument("--no-train", action="store_true",
                        help="fail (exit 2) instead of training a missing head first")
    parser.add_argument("--train-max-images", type=int, default=None, metavar="N",
                        help="cap the images used if a head has to be trained (default: all)")
    parser.add_argument("--train-augment-copies", type=int, default=0, metavar="K",
                        help="augmented copies per training image if a head has to be trained "
                             "(default 0: a quick first head; `natix-miner train` uses more)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the report as JSON here")
    parser.add_argument("--png", type=Path, default=None, metavar="PATH",
                        help="also write the report's plot here")
    add_logging_args(parser)
    parser.set_defaults(func=run)
    return parser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_local_miner(settings, cascade, port: int, validator_hotkey: str, *, quiet: bool = True):
    import dataclasses

    from natix_miner.neuron import BackgroundMiner, Miner, NeuronOptions

    if quiet:  # the validator's table reports every answer; per-request lines would break the bar
        settings = dataclasses.replace(settings, request_log="off")
    options = NeuronOptions(netuid=settings.netuid, local=True, axon_port=port,
                            allow_hotkeys=(validator_hotkey,), rate_limit_per_minute=0)
    return BackgroundMiner(Miner(settings, cascade, options)).start()


def _train(args: argparse.Namespace, config_path: Path, missing, tiers) -> int:
    from natix_miner.toolkit.dataset import DatasetError
    from natix_miner.toolkit.training import run_training

    which = ", ".join(tiers) if tiers else "every trainable tier"
    print(f"No trained head yet ({missing.what}).\nTraining {which} now from the 'train' split of "
          f"{args.images} (a quick head: {args.train_augment_copies} augmented copies; the full "
          f"one: natix-miner train --config {args.config} --images {args.images}).",
          file=sys.stderr, flush=True)
    try:
        run_training(config_path, args.images, tiers=tiers, max_images=args.train_max_images,
                     augment_copies=args.train_augment_copies)
    except (DatasetError, ValueError) as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    from cascade.config import without_store
    from cascade.errors import ConfigError
    from natix_miner.toolkit.dataset import DatasetError
    from natix_miner.neuron import find_missing_artifact, throwaway_wallet
    from natix_miner.settings import load_settings, resolve_config_path
    from natix_miner.toolkit.validator import ValidationError, run_validation

    configure_logging(args)
    config_path = resolve_config_path(args.config)
    try:
        settings, cascade = load_settings(config_path)
        cascade = without_store(cascade)  # labelled dev images must not enter the miner's store
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problem = check_challenge_folder(args.images, args.split)
    if problem:  # before minutes of model loading or training
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    port = getattr(args, "axon.port") or _free_port()
    with tempfile.TemporaryDirectory(prefix="natix-local-validator-") as tmp:
        validator = throwaway_wallet(Path(tmp), name="validator")
        runner = None
        trained: set[str] = set()
        while runner is None:
            try:
                runner = _start_local_miner(settings, cascade, port, validator.hotkey.ss58_address,
                                            quiet=not (getattr(args, "logging.debug", False)
                                                       or getattr(args, "logging.trace", False)))
            except Exception as exc:  # noqa: BLE001 - sorted below
                missing = find_missing_artifact(exc)
                # Train only the tier whose artefact is missing (tiers that work untrained stay so).
                names = [t.name for t in cascade.active_tiers if t.name in missing.what] \
                    if missing is not None else []
                retried = set(names) <= trained if names else bool(trained)
                if missing is None or args.no_train or retried:
                    code = report_start_failure(exc)
                    if code < 0:
                        raise
                    return code
                code = _train(args, config_path, missing, names or None)
                if code != EXIT_OK:
                    return code
                trained.update(names or [t.name for t in cascade.active_tiers])
        miner = runner.miner
        print(f"miner {miner.hotkey} serving on {miner.address} (local, no chain); "
              f"validator {validator.hotkey.ss58_address}", file=sys.stderr)
        try:
            report = asyncio.run(run_validation(
                miner.address, args.images, era=args.era, n=args.n, seed=args.seed,
                split=None if args.split == "all" else args.split, hotkey=miner.hotkey,
                wallet=validator, external_ip="127.0.0.1", json_path=args.json,
                png_path=args.png, progress=True, print_table=True))
        except (ValidationError, DatasetError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            logger.info("interrupted")
            return EXIT_FAILED
        finally:
            logger.info("miner counters: {}", miner.stats())
            runner.stop()
    print(how_to_read(report, args))
    # As `validate`: a miner that answered nothing valid is a failure, whatever the table says.
    return EXIT_FAILED if report["overall"]["invalid"] == report["n"] else EXIT_OK


def how_to_read(report: dict, args: argparse.Namespace) -> str:
    """The closing lines: what the reward means here, and the next command worth running."""
    o = report["overall"]
    reward, invalid = float(o.get("reward") or 0.0), int(o.get("invalid") or 0)
    read = (f"How to read it: reward is what one validator round pays, "
            f"(0.5 MCC over 100 + 0.5 accuracy over 10)^3, 1 at best; a miner that guesses earns "
            f"about {GUESS_REWARD:.2f}. This run: {reward:.3f}.")
    if invalid:
        nxt = (f"Next: {invalid} answer(s) were invalid and each scored 0; the miner's log above "
               "says why (docs/operator.md).")
    elif reward < 0.2:
        nxt = (f"Next: the model barely beats guessing on {args.images.name}: train on more "
               f"labelled frames (natix-miner train --images DIR, then natix-miner calibrate) and "
               f"see each tier alone with natix-miner eval --images {args.images} (docs/toolkit.md).")
    else:
        nxt = (f"Next: natix-miner eval --images {args.images} shows each tier alone; --era raw is "
               "what validators send now; to go live: docs/operator.md.")
    return f"{read}\n{nxt}"
