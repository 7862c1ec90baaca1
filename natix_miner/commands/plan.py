"""`natix-miner plan`: would this cascade fit these GPUs? Prints the per-device memory plan.

The figures are the ones the engine books at start: each backend's own (exact parameter counts
from a checkpoint config on disk, vLLM's gpu_memory_utilization x the card) where it has them,
the YAML's `params_m` / `reserve_mib` elsewhere; the table says which is which.
"""

import argparse
import sys
from pathlib import Path
from typing import Sequence

from loguru import logger

from cascade.config import TierSpec, load_cascade_config
from cascade.errors import ConfigError
from cascade.placement import format_plan, parse_devices, plan_placement
from natix_miner.commands.flags import add_config_arg
from cascade.tier import MemoryNeeds
from models.registry import build_tier


def memory_needs(tiers: Sequence[TierSpec]) -> dict[str, MemoryNeeds]:
    """Each tier's backend figures, built (not loaded) through the registry; options are
    validated on the way, so a malformed tier raises ConfigError."""
    needs: dict[str, MemoryNeeds] = {}
    for spec in tiers:
        tier = build_tier(spec)
        try:
            needs[spec.name] = tier.memory_needs()
        except Exception as exc:  # noqa: BLE001 - a count is a refinement, never a blocker
            logger.warning("tier {}: memory count failed ({!r}); planning from params_m", spec.name, exc)
    return needs


def add_parser(subparsers: "argparse._SubParsersAction", name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name, help="print the per-device memory plan of a cascade config; exit 1 if it does not fit",
        description="Estimate each enabled tier's memory (parameters x dtype bytes + declared "
                    "reserve; parameters counted exactly from the checkpoint's config where it is "
                    "on disk, vLLM tiers booked at gpu_memory_utilization x the card), add a "
                    "runtime context overhead per CUDA device, place tiers on the configured "
                    "devices (plain 'cuda' tiers first-fit-decreasing) and print a per-device "
                    "table: where each figure came from, each card's total, free after booking "
                    "and largest tier. Exit status 0: fits; 1: does not fit (offending tiers "
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
        tiers = cfg.tiers if getattr(args, "all_tiers", False) else cfg.active_tiers
        needs = memory_needs(tiers)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    placement = plan_placement(tiers, devices, float_missing_cuda=bool(args.devices), needs=needs)
    print(f"plan for {args.config}" + (f" on {args.devices}" if args.devices else ""))
    print(format_plan(placement))
    if not placement.fits:
        print(f"error: does not fit; offending tiers: {', '.join(placement.offenders)}", file=sys.stderr)
        return 1
    print("fits")
    return 0
