"""`natix-miner validate`: score a running miner the way SN72 validators do, over the real wire."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from loguru import logger

from natix_miner.toolkit.challenge import ERA_CHOICES


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name, help="query a running miner like a validator and score it",
        description="Send ImageSynapse challenges to a running miner (local or remote) through a "
                    "real bittensor dendrite: labels 50/50, the validator's image pipeline of the "
                    "chosen era, JPEG q75, 9 s timeout; score with the subnet's MCC/accuracy "
                    "windows, reward and EMA. Prints a per-era table; writes JSON and PNG on request.")
    p.add_argument("--axon", required=True, metavar="HOST:PORT",
                   help="address of the miner's axon, e.g. 127.0.0.1:8091")
    p.add_argument("--images", required=True, type=Path, metavar="DIR",
                   help="labelled image folder (manifest.csv with path,label[,source,split] or "
                        "roadwork/ + no_roadwork/ subfolders)")
    p.add_argument("--era", default="mixed", choices=ERA_CHOICES,
                   help="validator image era: augmented (224 px, levels 0-3), letterbox (224 px, "
                        "padded), raw (full resolution) or mixed (one of the three per challenge; "
                        "default)")
    p.add_argument("--n", type=int, default=100, help="number of challenges (default 100)")
    p.add_argument("--seed", type=int, default=0, help="random seed of labels, images and "
                                                       "augmentations (default 0)")
    p.add_argument("--split", default=None, choices=["train", "val", "all"],
                   help="use only this split of the folder (default: all images)")
    p.add_argument("--hotkey", default=None, metavar="SS58",
                   help="the miner's hotkey (the dendrite signs for it; `serve --local` prints it)")
    p.add_argument("--miner-wallet", default=None, metavar="NAME",
                   help="read the miner's hotkey from this wallet instead of --hotkey")
    p.add_argument("--miner-wallet-hotkey", default="default", metavar="NAME",
                   help="hotkey name inside --miner-wallet (default: default)")
    p.add_argument("--miner-wallet-path", default=None, metavar="DIR",
                   help="wallets directory of --miner-wallet (default: bittensor's ~/.bittensor/wallets)")
    p.add_argument("--network", default=None,
                   help="look the miner's hotkey up on this chain's metagraph by ip:port "
                        "(finney, test, or a ws:// endpoint; needs --netuid)")
    p.add_argument("--netuid", type=int, default=None, help="subnet uid for --network (72 mainnet, 323 testnet)")
    p.add_argument("--wallet-name", default=None, metavar="NAME",
                   help="validator wallet to sign with (default: a throwaway hotkey; a guarded "
                        "miner must list it in miner.guard.allow_hotkeys)")
    p.add_argument("--wallet-hotkey", default="default", metavar="NAME",
                   help="hotkey name inside --wallet-name (default: default)")
    p.add_argument("--wallet-path", default=None, metavar="DIR",
                   help="wallets directory of --wallet-name")
    p.add_argument("--external-ip", default="0.0.0.0",
                   help="ip the dendrite reports as its own (avoids bittensor's web lookup; the "
                        "axon records the socket's address anyway)")
    p.add_argument("--interval", type=float, default=0.0, metavar="S",
                   help="seconds between challenges (default 0; real validators send about one a minute)")
    p.add_argument("--timeout", type=float, default=9.0, metavar="S",
                   help="per-request timeout in seconds (validators use 9)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the full report as JSON")
    p.add_argument("--png", type=Path, default=None, metavar="PATH",
                   help="write a plot of round rewards and the EMA score")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import bittensor as bt

    from natix_miner.toolkit.dataset import DatasetError
    from natix_miner.toolkit.validator import ValidationError, parse_axon, resolve_miner_hotkey, run_validation

    try:
        host, port = parse_axon(args.axon)
        hotkey = resolve_miner_hotkey(host, port, hotkey=args.hotkey, wallet_name=args.miner_wallet,
                                      wallet_hotkey=args.miner_wallet_hotkey,
                                      wallet_path=args.miner_wallet_path, network=args.network,
                                      netuid=args.netuid)
        wallet = None
        if args.wallet_name:
            wallet = bt.Wallet(name=args.wallet_name, hotkey=args.wallet_hotkey, path=args.wallet_path)
        report = asyncio.run(run_validation(
            args.axon, args.images, args.era, args.n, args.seed, split=args.split, hotkey=hotkey,
            timeout=args.timeout, json_path=args.json, png_path=args.png, wallet=wallet,
            external_ip=args.external_ip, interval_s=args.interval,
            progress=not args.no_progress, print_table=True))
    except (ValidationError, DatasetError) as exc:
        logger.error("{}", exc)
        return 2
    return 0 if report["overall"]["invalid"] < report["n"] else 1
