"""`natix-miner`: one entry point, one module per subcommand (natix_miner/commands/).

Shared flags (bittensor's `--wallet.*`, `--subtensor.*`, `--axon.*`, `--logging.*`, `--config`,
`-n`) and the exit codes every command follows (0 done, 1 failed at run time, 2 bad input) are
in `natix_miner.commands.flags`.
"""

import argparse
import importlib
import sys
from typing import Optional, Sequence

# name -> module under natix_miner.commands; imported lazily so `--help` stays fast.
COMMANDS: dict[str, str] = {
    "serve": "serve",
    "local": "local",
    "validate": "validate",
    "train": "train",
    "eval": "evaluate",
    "calibrate": "calibrate",
    "quantize": "quantize",
    "store": "store",
    "plan": "plan",
    "models": "models_pull",
    "register": "register",
    "model-card": "model_card",
}

DEFAULT_CONFIG = "configs/cpu.yaml"  # every command's --config default (commands/flags.py)


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser for every command, or for `only` one: `natix-miner serve` then imports the
    serving path alone (the offline toolkit behind `local`, `eval`, ... stays unimported)."""
    parser = argparse.ArgumentParser(
        prog="natix-miner",
        description="NATIX StreetVision (subnet 72) roadwork miner: serve, test locally, train, "
                    "calibrate and evaluate a model cascade. Every command takes --config "
                    f"(default {DEFAULT_CONFIG}) and explains its flags in `COMMAND --help`.")
    from natix_miner import __version__

    parser.add_argument("--version", action="version", version=f"natix-miner {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            continue
        mod = importlib.import_module(f"natix_miner.commands.{module}")
        mod.add_parser(sub, name)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
