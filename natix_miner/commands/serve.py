"""`natix-miner serve`: run the miner neuron (live on a subnet, or `--local` without a chain).

Flags follow bittensor's own names (`--netuid`, `--subtensor.network`, `--wallet.name`,
`--wallet.hotkey`, `--axon.port`, `--axon.external_ip`, `--logging.debug`, ...), and the subnet's
reference-miner flags (`--neuron.image_detector ...`, `--blacklist.force_validator_permit True`,
`--logging.logging_dir ...`) are accepted too, each mapped or answered with one warning line,
so an operator's existing pm2 line starts this miner. `--netuid` defaults to `miner.netuid` of
the config (72), never to bittensor's silent 1.

`--local` answers as the wallet the `--wallet.*` flags name, or as a throwaway hotkey when none
does; the start-up log says which.

Exit codes: 0 after a clean SIGTERM/SIGINT shutdown; 1 when the chain cannot be reached, the
hotkey is not registered, a port is taken, or the tiers do not fit the devices or fail to load;
2 for bad input: a flag value, the config, a missing wallet or a missing trained artefact (the
message names the command that makes it).
"""

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Optional

from loguru import logger

from natix_miner.commands.flags import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_axon_args,
                                        add_chain_args, add_config_arg, add_logging_args,
                                        add_wallet_args, chain_from_args, wallet_from_args)
from natix_miner.commands.subnet_flags import add_subnet_flags, apply_subnet_flags, split_extra

EXIT_CONFIG = EXIT_USAGE  # the name the other commands import
__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "add_config_arg",
           "add_logging_args", "add_neuron_args", "add_wallet_args", "configure_logging",
           "report_start_failure"]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
DEFAULT_LOG_DIR = "~/.bittensor/miners"


def add_neuron_args(parser: argparse.ArgumentParser) -> None:
    """Every flag `serve` and `neurons/miner.py` take (bittensor's names and defaults)."""
    add_config_arg(parser)
    add_chain_args(parser)
    add_wallet_args(parser)
    add_axon_args(parser)
    add_logging_args(parser)
    g = parser.add_argument_group("this miner")
    g.add_argument("--local", action="store_true",
                   help="no chain: axon on 127.0.0.1, only --allow-hotkey callers admitted "
                        "(signatures still verified); answers as the --wallet.* wallet, or as a "
                        "throwaway hotkey when no wallet flag is given")
    g.add_argument("--allow-hotkey", action="append", default=[], metavar="SS58",
                   dest="allow_hotkey",
                   help="admit this caller hotkey (repeatable); with --local, the only callers")
    g.add_argument("--rate-limit", type=int, default=None, metavar="N",
                   help="override miner.guard.rate_limit_per_minute (0 = off; --local defaults to off)")
    add_subnet_flags(parser)


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="run the miner neuron (live, or --local without a chain)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_neuron_args(parser)
    # Unknown --neuron.* / --wandb.* flags reach `run`, which accepts them with a warning.
    parser.set_defaults(func=run, accepts_extra=True)
    return parser


class _PlainFormatter(logging.Formatter):
    """bittensor's console formatter without its colour codes (pm2 writes them into log files)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return ANSI.sub("", self._inner.format(record))


def _plain_bittensor_console() -> None:
    import bittensor as bt

    for handler in getattr(bt.logging, "_handlers", []):
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                and not isinstance(handler.formatter, _PlainFormatter) and handler.formatter is not None:
            handler.setFormatter(_PlainFormatter(handler.formatter))


def configure_logging(args: argparse.Namespace) -> None:
    """loguru level from bittensor's logging flags; bittensor's own logger follows. Colour only on
    a terminal (pm2 pipes both streams into files), and a log file when asked for one."""
    level = "INFO"
    if getattr(args, "logging.trace", False):
        level = "TRACE"
    elif getattr(args, "logging.debug", False):
        level = "DEBUG"
    colour = sys.stderr.isatty() and "NO_COLOR" not in os.environ
    logger.remove()
    logger.add(sys.stderr, level=level, colorize=colour)
    log_dir = getattr(args, "logging.logging_dir", None)
    if log_dir or getattr(args, "logging.record_log", False):
        path = Path(log_dir or DEFAULT_LOG_DIR).expanduser() / "natix-miner.log"
        logger.add(path, level=level, colorize=False, rotation="50 MB", retention=5)
        logger.info("also logging to {}", path)
    import bittensor as bt

    if not (sys.stdout.isatty() and "NO_COLOR" not in os.environ):
        _plain_bittensor_console()
    if level == "TRACE":
        bt.logging.set_trace(True)
    elif level == "DEBUG":
        bt.logging.set_debug(True)


def options_from_args(args: argparse.Namespace, netuid_default: int):
    from natix_miner.neuron import NeuronOptions

    g = lambda key: getattr(args, key)  # noqa: E731 - dotted dests need getattr
    wallet = wallet_from_args(args)
    network, endpoint = chain_from_args(args)
    return NeuronOptions(
        netuid=args.netuid if args.netuid is not None else netuid_default,
        network=network, chain_endpoint=endpoint,
        wallet_name=wallet.name, wallet_hotkey=wallet.hotkey, wallet_path=wallet.path,
        wallet_named=wallet.named, axon_port=g("axon.port"), axon_ip=g("axon.ip"),
        axon_external_ip=g("axon.external_ip"), axon_external_port=g("axon.external_port"),
        axon_max_workers=g("axon.max_workers"), local=bool(args.local),
        allow_hotkeys=tuple(args.allow_hotkey), rate_limit_per_minute=args.rate_limit)


def report_start_failure(exc: BaseException) -> int:
    """One clear line for the errors an operator can fix; the exit code that goes with it."""
    from cascade.engine import TierStartError
    from cascade.errors import ConfigError
    from cascade.placement import PlacementError
    from natix_miner.neuron import (ChainUnreachableError, NotRegisteredError, WalletError,
                                    find_missing_artifact)

    missing = find_missing_artifact(exc)
    if missing is not None:
        print(f"error: {missing.what} is missing. Create it with:\n  {missing.fix}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, (ConfigError, WalletError)):
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, (ChainUnreachableError, NotRegisteredError, OSError, TierStartError,
                        PlacementError)):
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return -1


def run(args: argparse.Namespace) -> int:
    from cascade.errors import ConfigError
    from natix_miner.settings import load_settings, resolve_config_path

    extra = list(getattr(args, "extra", None) or [])
    _, rejected = split_extra(extra)
    if rejected:
        print(f"error: unrecognized arguments: {' '.join(rejected)} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(args)
    config_path = resolve_config_path(args.config)
    try:
        settings, cascade = load_settings(config_path)
        settings, warnings = apply_subnet_flags(args, settings, config_path=str(config_path),
                                                extra=extra)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except argparse.ArgumentTypeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for line in warnings:
        logger.warning(line)
    options = options_from_args(args, settings.netuid)
    return serve(settings, cascade, options)


def serve(settings, cascade, options) -> int:
    """Run one neuron in this process until SIGTERM/SIGINT; the port is free when this returns."""
    from natix_miner.neuron import Miner, serve_until

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _on_signal, sig, stop)
        miner = Miner(settings, cascade, options)

        def ready() -> None:
            # stdout, one line: what a client needs to sign requests for this miner.
            print(f"miner ready: axon {miner.address} hotkey {miner.hotkey} ({miner.wallet_source})",
                  flush=True)

        await serve_until(miner, stop, on_ready=ready)

    try:
        asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - sorted into operator-fixable errors below
        code = report_start_failure(exc)
        if code < 0:
            raise
        return code
    return EXIT_OK


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    logger.info("{} received: stopping the miner", signal.Signals(sig).name)
    stop.set()


def main(argv: Optional[list[str]] = None) -> int:
    """`python neurons/miner.py ...`: the same flags, and the same unknown-flag rule, as `serve`."""
    parser = argparse.ArgumentParser(prog="neurons/miner.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_neuron_args(parser)
    args, extra = parser.parse_known_args(argv)
    args.extra = extra
    return run(args)
