"""`natix-miner model-card`: write the `model_card.json` the subnet asked miners to publish.

Fields: model_name, description, version ("X.Y.Z"), submitted_by (the hotkey's ss58) and
submission_time (unix seconds, now). The hotkey comes from `--hotkey SS58` or from the wallet
(`--wallet.name/--wallet.hotkey`; only the public key is read when a hotkeypub file exists).
The description defaults to the cascade's tiers from `--config`.
"""

import argparse
import json
import sys
from pathlib import Path

from natix_miner.commands.flags import (EXIT_OK, EXIT_USAGE, add_config_arg, add_wallet_args,
                                        wallet_from_args)


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    from natix_miner import __version__

    parser = subparsers.add_parser(name, help="write model_card.json for the subnet",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(parser)
    add_wallet_args(parser)
    parser.add_argument("--hotkey", default=None, metavar="SS58",
                        help="submitted_by hotkey (default: the wallet's hotkey)")
    parser.add_argument("--model-name", default="natix-roadwork-cascade", metavar="NAME",
                        help="model_name (default natix-roadwork-cascade)")
    parser.add_argument("--description", default=None, metavar="TEXT",
                        help="description (default: the config's tiers)")
    parser.add_argument("--version", default=__version__, metavar="X.Y.Z",
                        help=f"version, X.Y.Z (default {__version__})")
    parser.add_argument("--out", type=Path, default=Path("model_card.json"), metavar="PATH",
                        help="where to write the card (default ./model_card.json)")
    parser.set_defaults(func=run)
    return parser


def _wallet_hotkey(args: argparse.Namespace) -> str:
    import bittensor as bt

    w = wallet_from_args(args)
    wallet = bt.Wallet(name=w.name, hotkey=w.hotkey, path=w.path)
    try:
        return wallet.hotkeypub.ss58_address
    except Exception:  # noqa: BLE001 - older wallets have no hotkeypub file
        return wallet.hotkey.ss58_address


def run(args: argparse.Namespace) -> int:
    from cascade.config import load_cascade_config
    from cascade.errors import ConfigError
    from natix_miner.model_card import build_model_card, write_model_card
    from natix_miner.settings import resolve_config_path

    description = args.description
    if description is None:
        try:
            cfg = load_cascade_config(resolve_config_path(args.config))
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        tiers = ", ".join(f"{t.name} ({t.backend})" for t in cfg.active_tiers)
        description = f"Roadwork detector for SN72: calibrated cascade of {tiers}."
    try:
        hotkey = args.hotkey or _wallet_hotkey(args)
    except Exception as exc:  # noqa: BLE001 - missing wallet files
        print(f"error: no hotkey: {exc}; pass --hotkey SS58", file=sys.stderr)
        return EXIT_USAGE
    try:
        card = build_model_card(model_name=args.model_name, description=description,
                                version=args.version, hotkey_ss58=hotkey)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    path = write_model_card(args.out, card)
    print(json.dumps(card, indent=2))
    print(f"wrote {path}", file=sys.stderr)
    return EXIT_OK
