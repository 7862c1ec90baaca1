"""`natix-miner plan`: would this cascade fit these GPUs? Prints the per-device memory plan."""

import argparse
import sys
from pathlib import Path

from cascade.config import load_cascade_config
from cascade.errors import ConfigError
from cascade.placement import format_plan, parse_devices, plan_placement
from natix_miner.commands.flags import add_config_arg


def add_parser(subparsers: "argparse._SubParsersAction", name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name, help="print the per-device memory plan of a cascade config; exit 1 if it does not fit",
        description="Estimate each enabled tier's memory (parameters x dtype bytes + declared "
                    "reserve), add a runtime context overhead per CUDA device, place tiers on the "
                    "configured devices (plain 'cuda' tiers first-fit-decreasing) and print a "
                    "per-device table. Exit status 0: fits; 1: does not fit (offending tiers "
                    "named); 2: the config or --devices is malformed.")
    add_config_arg(p)
    p.add_argument("--devices", default=None,
                   help='override the config\'s devices to ask "would this fit on my machine?", '
                        'e.g. "cuda:0=80GiB,cuda:1=80GiB" (sizes in GiB, GB or MiB); tiers pinned '
                        'to a cuda device not listed here are placed on any listed cuda device')
    p.add_argument("--all-tiers", action="store_true",
                   help="plan disabled tiers too (default: only tiers with enabled: true)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_cascade_config(args.config)
        devices = parse_devices(args.devices) if args.devices else cfg.devices
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tiers = cfg.tiers if getattr(args, "all_tiers", False) else cfg.active_tiers
    placement = plan_placement(tiers, devices, float_missing_cuda=bool(args.devices))
    print(f"plan for {args.config}" + (f" on {args.devices}" if args.devices else ""))
    print(format_plan(placement))
    if not placement.fits:
        print(f"error: does not fit; offending tiers: {', '.join(placement.offenders)}", file=sys.stderr)
        return 1
    print("fits")
    return 0
