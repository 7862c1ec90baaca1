"""`natix-miner validate`: score a running miner the way SN72 validators do, over the real wire.

Labels 50/50, the validator's image pipeline of the chosen era, JPEG q75, 9 s timeout; scored
with the subnet's MCC/accuracy windows, reward and EMA. Prints a per-era table; writes JSON and
PNG on request.

Whose keys: the requests are signed with `--wallet.*` (a validator wallet the miner admits), or
with a throwaway hotkey when no wallet flag is given (a guarded miner must then allow the hotkey
printed at the start). The miner's own hotkey, which the dendrite signs for, is `--hotkey`, or
read from `--miner-wallet.*`, or looked up on the chain (`--subtensor.*`, `--netuid`) by the
axon's ip:port.

Exit codes: 0 report printed; 1 every answer invalid, or the chain could not be read;
2 bad input (flags, the image folder, the miner's hotkey not given or not found).
"""

import argparse
import asyncio
import ipaddress
import sys
from pathlib import Path

from natix_miner.commands.flags import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_chain_args,
                                        add_config_arg, add_count_arg, add_split_arg,
                                        add_wallet_args, chain_from_args, check_challenge_folder,
                                        existing_dir, wallet_from_args)
from natix_miner.toolkit.challenge import ERA_CHOICES


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help="query a running miner like a validator and score it",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(p)
    p.add_argument("--axon", required=True, metavar="HOST:PORT",
                   help="address of the miner's axon, e.g. 127.0.0.1:8091")
    p.add_argument("--images", required=True, type=existing_dir, metavar="DIR",
                   help="labelled image folder (manifest.csv with path,label[,source,split] or "
                        "roadwork/ + no_roadwork/ subfolders)")
    p.add_argument("--era", default="mixed", choices=ERA_CHOICES,
                   help="validator image era: augmented (224 px, levels 0-3), letterbox (224 px, "
                        "padded), raw (full resolution) or mixed (one of the three per challenge; "
                        "default)")
    add_count_arg(p)
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of labels, images and augmentations (default 0)")
    add_split_arg(p)
    p.add_argument("--hotkey", default=None, metavar="SS58",
                   help="the miner's hotkey (the dendrite signs for it; `serve --local` prints it)")
    m = p.add_argument_group("the miner's wallet (instead of --hotkey)")
    m.add_argument("--miner-wallet.name", default=None, metavar="NAME",
                   help="read the miner's hotkey from this wallet")
    m.add_argument("--miner-wallet.hotkey", default="default", metavar="NAME",
                   help="hotkey name inside it (default 'default')")
    m.add_argument("--miner-wallet.path", default=None, metavar="DIR",
                   help="its wallets directory (default ~/.bittensor/wallets/)")
    add_chain_args(p, netuid_help="subnet uid to look the miner's hotkey up in, by ip:port, when "
                                  "neither --hotkey nor --miner-wallet.name is given (default: "
                                  "miner.netuid of the config, 72)")
    add_wallet_args(p, whose="the validator's, signs the requests; default: a throwaway hotkey")
    p.add_argument("--external-ip", default="0.0.0.0",
                   help="ip the dendrite reports as its own (avoids bittensor's web lookup; the "
                        "axon records the socket's address anyway)")
    p.add_argument("--interval", type=float, default=0.0, metavar="S",
                   help="seconds between challenges (default 0; real validators send about one a minute)")
    p.add_argument("--timeout", type=float, default=9.0, metavar="S",
                   help="per-request timeout in seconds (validators use 9)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the full report as JSON")
    p.add_argument("--png", type=Path, default=None, metavar="PATH",
                   help="write a plot of round rewards and the EMA score")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)
    return p


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    import bittensor as bt

    from cascade.errors import ConfigError
    from natix_miner.settings import load_settings, resolve_config_path
    from natix_miner.toolkit.dataset import DatasetError
    from natix_miner.toolkit.validator import (ValidationError, parse_axon, resolve_miner_hotkey,
                                               run_validation)

    def fail(message: str, code: int = EXIT_USAGE) -> int:
        print(f"error: {message}", file=sys.stderr)
        return code

    try:
        settings, _ = load_settings(resolve_config_path(args.config))
        host, port = parse_axon(args.axon)
    except (ConfigError, ValidationError) as exc:
        return fail(str(exc))
    problem = check_challenge_folder(args.images, args.split)
    if problem:
        return fail(problem)
    miner_wallet = getattr(args, "miner_wallet.name")
    if not args.hotkey and not miner_wallet and _is_loopback(host):
        return fail(f"the miner at {args.axon} is on this machine, so its hotkey cannot be looked "
                    "up on the chain: pass --hotkey SS58 (`serve --local` prints it) or "
                    "--miner-wallet.name NAME")
    network, endpoint = chain_from_args(args)
    try:
        hotkey = resolve_miner_hotkey(
            host, port, hotkey=args.hotkey, wallet_name=miner_wallet,
            wallet_hotkey=getattr(args, "miner_wallet.hotkey"),
            wallet_path=getattr(args, "miner_wallet.path"), network=endpoint or network,
            netuid=args.netuid if args.netuid is not None else settings.netuid)
    except ValidationError as exc:
        # Raised `from` the chain's own error only when the metagraph could not be read.
        return fail(str(exc), EXIT_FAILED if exc.__cause__ is not None else EXIT_USAGE)
    signer = wallet_from_args(args)
    wallet = bt.Wallet(name=signer.name, hotkey=signer.hotkey, path=signer.path) if signer.named else None
    try:
        report = asyncio.run(run_validation(
            args.axon, args.images, args.era, args.n, args.seed,
            split=None if args.split == "all" else args.split, hotkey=hotkey,
            timeout=args.timeout, json_path=args.json, png_path=args.png, wallet=wallet,
            external_ip=args.external_ip, interval_s=args.interval,
            progress=not args.no_progress, print_table=True))
    except (ValidationError, DatasetError) as exc:
        return fail(str(exc))
    return EXIT_OK if report["overall"]["invalid"] < report["n"] else EXIT_FAILED
