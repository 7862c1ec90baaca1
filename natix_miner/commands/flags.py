"""The flags every command shares, spelled as bittensor spells them, and one exit-code convention.

Exit codes, for every command:
  0  done;
  1  a failure at run time: chain unreachable, hotkey not registered, a port taken, a tier that
     failed to load, btcli or the application server refusing, every answer invalid;
  2  bad input, caught before any model loads or anything is sent: a flag value, the config, the
     image folder, a missing wallet or trained artefact (the message names the command that makes it).

Flag names follow bittensor (`--wallet.name`, `--subtensor.network`, `--axon.port`, ...) so the
lines an operator already has carry over; the `BT_*` environment variables bittensor reads set
the same defaults. Declared here, not by bittensor's `add_args`, so `--help` stays fast.
"""

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
from natix_miner.cli import DEFAULT_CONFIG  # noqa: E402 - one constant
DEFAULT_WALLET_PATH = "~/.bittensor/wallets/"


# ----- argparse types: a bad value is a usage error (exit 2, one line, no traceback) -----------
def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port (1-65535)")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def existing_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return path


# ----- shared groups -------------------------------------------------------------------------
def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, metavar="PATH",
                        help=f"root YAML config (miner: section + cascade); default {DEFAULT_CONFIG}")


def add_count_arg(parser: argparse.ArgumentParser, default: int = 100) -> None:
    """`-n N`: how many challenges; the same flag wherever challenges are counted."""
    parser.add_argument("-n", "--n", type=positive_int, default=default, dest="n", metavar="N",
                        help=f"number of challenges (default {default})")


def add_wallet_args(parser: argparse.ArgumentParser, whose: str = "the miner's") -> None:
    """bittensor's wallet flags. Left unset they read as None, so a command can tell "the
    operator named a wallet" from "the default": `serve --local` and `validate` use a throwaway
    hotkey only when no wallet was named (see `wallet_from_args`)."""
    g = parser.add_argument_group(f"wallet ({whose} keys; BT_WALLET_NAME/_HOTKEY/_PATH set defaults)")
    g.add_argument("--wallet.name", default=None, metavar="NAME",
                   help="coldkey wallet name (default 'default')")
    g.add_argument("--wallet.hotkey", default=None, metavar="NAME",
                   help="hotkey name inside the wallet (default 'default')")
    g.add_argument("--wallet.path", default=None, metavar="DIR",
                   help=f"wallets directory (default {DEFAULT_WALLET_PATH})")


@dataclass(frozen=True)
class WalletFlags:
    name: str
    hotkey: str
    path: str
    # True when a flag or a BT_WALLET_* variable named the wallet.
    named: bool

    def describe(self) -> str:
        return f"wallet {self.name}/{self.hotkey} under {self.path}"

    def bittensor_args(self) -> list[str]:
        return ["--wallet.name", self.name, "--wallet.hotkey", self.hotkey, "--wallet.path", self.path]


def wallet_from_args(args: argparse.Namespace) -> WalletFlags:
    env = os.environ
    given = {k: getattr(args, f"wallet.{k}", None) or env.get(f"BT_WALLET_{k.upper()}")
             for k in ("name", "hotkey", "path")}
    return WalletFlags(name=given["name"] or "default", hotkey=given["hotkey"] or "default",
                       path=given["path"] or DEFAULT_WALLET_PATH,
                       named=any(v is not None for v in given.values()))


def add_chain_args(parser: argparse.ArgumentParser, *, netuid_help: Optional[str] = None) -> None:
    g = parser.add_argument_group("chain (bittensor flags)")
    g.add_argument("--netuid", type=int, default=None,
                   help=netuid_help or "subnet uid: 72 on mainnet (finney), 323 on testnet "
                                       "(default: miner.netuid of the config, 72)")
    g.add_argument("--subtensor.network", default=os.environ.get("BT_SUBTENSOR_NETWORK", "finney"),
                   metavar="NAME", help="finney (mainnet), test, local, or a ws(s):// endpoint "
                                        "(default finney)")
    g.add_argument("--subtensor.chain_endpoint", metavar="URL",
                   default=os.environ.get("BT_SUBTENSOR_CHAIN_ENDPOINT"),
                   help="explicit ws(s):// endpoint; overrides --subtensor.network")


def chain_from_args(args: argparse.Namespace) -> tuple[str, Optional[str]]:
    """(network, endpoint or None); an empty value (an unset variable in a pm2 line) is unset."""
    network = getattr(args, "subtensor.network") or "finney"
    endpoint = getattr(args, "subtensor.chain_endpoint") or None
    return network, endpoint


def add_axon_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    g = parser.add_argument_group("axon (bittensor flags; BT_AXON_* set defaults)")
    g.add_argument("--axon.port", type=port, default=port(env.get("BT_AXON_PORT", "8091")),
                   metavar="PORT", help="port the axon listens on (default 8091)")
    g.add_argument("--axon.ip", default=env.get("BT_AXON_IP"), metavar="IP",
                   help="address the axon binds (default: all interfaces; --local forces 127.0.0.1)")
    g.add_argument("--axon.external_ip", default=env.get("BT_AXON_EXTERNAL_IP"), metavar="IP",
                   help="public IP announced on chain (default: looked up over the network)")
    g.add_argument("--axon.external_port", type=port, default=None, metavar="PORT",
                   help="public port announced on chain (default: --axon.port)")
    g.add_argument("--axon.max_workers", type=positive_int, default=10, metavar="N",
                   help="axon request-handler threads (default 10)")


def add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging (bittensor flags)")
    g.add_argument("--logging.debug", action="store_true",
                   help="debug logs: the guard's and engine's details on top of the request lines")
    g.add_argument("--logging.trace", action="store_true",
                   help="trace logs, including bittensor's per-request axon lines")
    g.add_argument("--logging.info", action="store_true", help="info logs (the default)")
    g.add_argument("--logging.logging_dir", default=None, metavar="DIR",
                   help="also write the log to DIR/natix-miner.log (rotated at 50 MB, 5 kept)")
    g.add_argument("--logging.record_log", action="store_true",
                   help="also write the log to a file: --logging.logging_dir, default "
                        "~/.bittensor/miners")


def add_split_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", default="val", choices=["val", "train", "all"],
                        help="split of the folder the challenges are drawn from (default val: the "
                             "images a trained head never saw)")


def check_challenge_folder(images: Path, split: str, *, both_labels: bool = True) -> Optional[str]:
    """None when `images` has images in `split` (of both labels, as challenges need), else why not.

    Run before any tier loads or any request goes out, so a wrong folder costs nothing.
    """
    from natix_miner.toolkit.challenge import split_by_label  # offline commands only
    from natix_miner.toolkit.dataset import DatasetError, load_folder, select

    try:
        samples = select(load_folder(Path(images)), None if split == "all" else split)
    except DatasetError as exc:
        return str(exc)
    if not samples:
        return f"{images}: no images in split '{split}' (try --split all)"
    if both_labels:
        try:
            split_by_label(samples)
        except ValueError as exc:
            return f"{images} (split {split}): {exc}"
    return None
