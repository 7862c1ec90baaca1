"""`natix-miner serve`: run the miner neuron (live on a subnet, or `--local` without a chain).

Flags follow bittensor's own names (`--netuid`, `--subtensor.network`, `--wallet.name`,
`--wallet.hotkey`, `--axon.port`, `--axon.external_ip`, `--logging.debug`, ...), so an operator's
existing pm2 lines carry over; they are declared here, with bittensor's defaults, so `--help` does
not pay for importing bittensor. `--netuid` defaults to `miner.netuid` of the config (72), never
to bittensor's silent 1.

Exit codes: 0 after a clean SIGTERM/SIGINT shutdown; 1 when the hotkey is not registered, the
wallet is missing, the port is taken, the tiers do not fit the devices or one fails to load; 2 for
a config error or a missing trained artefact (the message names the command that makes it).
"""

import argparse
import asyncio
import os
import signal
import sys
from typing import Optional

from loguru import logger

from natix_miner.cli import DEFAULT_CONFIG

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                        help=f"root YAML config (miner: section + cascade); default {DEFAULT_CONFIG}")


def add_wallet_args(parser: argparse.ArgumentParser) -> None:
    """bittensor's wallet flags (and BT_WALLET_* environment defaults); `register` and
    `model-card` take the same ones."""
    env = os.environ
    parser.add_argument("--wallet.name", default=env.get("BT_WALLET_NAME", "default"),
                        metavar="NAME", help="coldkey wallet name (default 'default')")
    parser.add_argument("--wallet.hotkey", default=env.get("BT_WALLET_HOTKEY", "default"),
                        metavar="NAME", help="hotkey name inside the wallet (default 'default')")
    parser.add_argument("--wallet.path", default=env.get("BT_WALLET_PATH", "~/.bittensor/wallets/"),
                        metavar="DIR", help="wallets directory (default ~/.bittensor/wallets/)")


def add_axon_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument("--axon.port", type=int, default=int(env.get("BT_AXON_PORT", 8091)),
                        metavar="PORT", help="port the axon listens on (default 8091)")
    parser.add_argument("--axon.ip", default=env.get("BT_AXON_IP"), metavar="IP",
                        help="address the axon binds (default: all interfaces; --local forces 127.0.0.1)")
    parser.add_argument("--axon.external_ip", default=env.get("BT_AXON_EXTERNAL_IP"), metavar="IP",
                        help="public IP announced on chain (default: looked up over the network)")
    parser.add_argument("--axon.external_port", type=int, default=None, metavar="PORT",
                        help="public port announced on chain (default: --axon.port)")
    parser.add_argument("--axon.max_workers", type=int, default=10, metavar="N",
                        help="axon request-handler threads (default 10)")


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--logging.debug", action="store_true",
                        help="debug logs: every answer with its latency, every refusal with its reason")
    parser.add_argument("--logging.trace", action="store_true",
                        help="trace logs, including bittensor's per-request axon lines")
    parser.add_argument("--logging.info", action="store_true", help="info logs (the default)")


def add_neuron_args(parser: argparse.ArgumentParser) -> None:
    """Every flag `serve` and `neurons/miner.py` take (bittensor's names and defaults)."""
    env = os.environ
    add_config_arg(parser)
    parser.add_argument("--netuid", type=int, default=None,
                        help="subnet uid: 72 on mainnet (finney), 323 on testnet "
                             "(default: miner.netuid of the config, 72)")
    parser.add_argument("--subtensor.network", default=env.get("BT_SUBTENSOR_NETWORK", "finney"),
                        metavar="NAME", help="finney (mainnet), test, local, or a ws:// endpoint "
                                             "(default finney)")
    parser.add_argument("--subtensor.chain_endpoint", default=None, metavar="URL",
                        help="explicit ws(s):// endpoint; overrides --subtensor.network")
    add_wallet_args(parser)
    add_axon_args(parser)
    add_logging_args(parser)
    parser.add_argument("--local", action="store_true",
                        help="no chain: throwaway wallet, axon on 127.0.0.1, only --allow-hotkey "
                             "callers admitted (signatures still verified)")
    parser.add_argument("--allow-hotkey", action="append", default=[], metavar="SS58",
                        dest="allow_hotkey",
                        help="admit this caller hotkey (repeatable); with --local, the only callers")
    parser.add_argument("--rate-limit", type=int, default=None, metavar="N",
                        help="override miner.guard.rate_limit_per_minute (0 = off; --local defaults to off)")


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help="run the miner neuron (live, or --local without a chain)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_neuron_args(parser)
    parser.set_defaults(func=run)
    return parser


def configure_logging(args: argparse.Namespace) -> None:
    """loguru level from bittensor's logging flags; bittensor's own logger follows."""
    level = "INFO"
    if getattr(args, "logging.trace", False):
        level = "TRACE"
    elif getattr(args, "logging.debug", False):
        level = "DEBUG"
    logger.remove()
    logger.add(sys.stderr, level=level)
    import bittensor as bt

    if level == "TRACE":
        bt.logging.set_trace(True)
    elif level == "DEBUG":
        bt.logging.set_debug(True)


def options_from_args(args: argparse.Namespace, netuid_default: int):
    from natix_miner.neuron import NeuronOptions

    g = lambda key: getattr(args, key)  # noqa: E731 - dotted dests need getattr
    return NeuronOptions(
        netuid=args.netuid if args.netuid is not None else netuid_default,
        network=g("subtensor.network"), chain_endpoint=g("subtensor.chain_endpoint"),
        wallet_name=g("wallet.name"), wallet_hotkey=g("wallet.hotkey"),
        wallet_path=g("wallet.path"), axon_port=g("axon.port"), axon_ip=g("axon.ip"),
        axon_external_ip=g("axon.external_ip"), axon_external_port=g("axon.external_port"),
        axon_max_workers=g("axon.max_workers"), local=bool(args.local),
        allow_hotkeys=tuple(args.allow_hotkey), rate_limit_per_minute=args.rate_limit)


def report_start_failure(exc: BaseException) -> int:
    """One clear line for the errors an operator can fix; the exit code that goes with it."""
    from cascade.engine import TierStartError
    from cascade.errors import ConfigError
    from cascade.placement import PlacementError
    from natix_miner.neuron import NotRegisteredError, WalletError, find_missing_artifact

    missing = find_missing_artifact(exc)
    if missing is not None:
        print(f"error: {missing.what} is missing. Create it with:\n  {missing.fix}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(exc, ConfigError):
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(exc, (NotRegisteredError, WalletError, OSError, TierStartError, PlacementError)):
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return -1


def run(args: argparse.Namespace) -> int:
    from cascade.errors import ConfigError
    from natix_miner.settings import load_settings, resolve_config_path

    configure_logging(args)
    try:
        settings, cascade = load_settings(resolve_config_path(args.config))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
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
            print(f"miner ready: axon {miner.address} hotkey {miner.hotkey}", flush=True)

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
    """`python neurons/miner.py ...`: the same flags as `natix-miner serve`."""
    parser = argparse.ArgumentParser(prog="neurons/miner.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_neuron_args(parser)
    return run(parser.parse_args(argv))
