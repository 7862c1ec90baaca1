"""`natix-miner register`: register the hotkey on the subnet, then with the NATIX application server.

Step 1 (chain) runs `btcli subnet register ...`, printed in full before it runs; btcli asks for
the coldkey password and confirms the burn cost itself. Step 2 (application server) signs a fresh
unix timestamp with the hotkey and posts `{uid, message, natix_public_key, natix_signature,
type: "miner", model_repo}` to `<app server>/participants/register`, then polls
`/participants/registration-status/<uid>` until it succeeded, failed or timed out.

`--skip-chain` / `--skip-app-server` run one step only; `--dry-run` prints both (the command and
the signed JSON) and sends nothing. The uid comes from `--uid`, else from the chain.

Every wallet and chain flag (`--wallet.name/.hotkey/.path`, `--subtensor.network`,
`--subtensor.chain_endpoint`, `--netuid`) is passed on to btcli and used for the uid look-up, so
both steps act on the same keys and the same chain. btcli comes from the `bittensor-cli` package
(`pip install -c constraints.txt -e .[btcli]`).

Exit codes: 0 registered; 1 btcli, the chain or the application server refused, failed or timed
out; 2 bad input (flags, config, a wallet that is not on disk).
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys

from natix_miner.commands.flags import (EXIT_FAILED, EXIT_OK, EXIT_USAGE, add_chain_args,
                                        add_config_arg, add_wallet_args, chain_from_args,
                                        wallet_from_args)

BTCLI_INSTALL = "pip install -c constraints.txt -e '.[btcli]'   (the bittensor-cli package)"


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    from natix_miner.registration import DEFAULT_APP_SERVER, REGISTER_PATH, STATUS_PATH

    parser = subparsers.add_parser(
        name, help="register the hotkey on the subnet (btcli) and with the NATIX app server",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arg(parser)
    add_chain_args(parser)
    add_wallet_args(parser)
    parser.add_argument("--uid", type=int, default=None,
                        help="the hotkey's uid on the subnet (default: looked up on the chain)")
    parser.add_argument("--model-repo", default=None, metavar="OWNER/NAME",
                        help="Hugging Face repo of the miner's model (required by the app server)")
    parser.add_argument("--app-server", default=DEFAULT_APP_SERVER, metavar="URL",
                        help=f"NATIX application server base URL (default {DEFAULT_APP_SERVER})")
    parser.add_argument("--register-path", default=REGISTER_PATH, metavar="PATH",
                        help=f"registration endpoint path (default {REGISTER_PATH})")
    parser.add_argument("--status-path", default=STATUS_PATH, metavar="PATH",
                        help=f"status endpoint path with {{uid}} (default {STATUS_PATH})")
    parser.add_argument("--poll-interval", type=float, default=3.0, metavar="S",
                        help="seconds between status polls (default 3)")
    parser.add_argument("--poll-timeout", type=float, default=180.0, metavar="S",
                        help="give up polling after this many seconds (default 180)")
    parser.add_argument("--skip-chain", action="store_true",
                        help="skip the btcli subnet registration (already registered)")
    parser.add_argument("--skip-app-server", action="store_true",
                        help="skip the NATIX application server registration")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the btcli command and the signed JSON; run and send nothing "
                             "(without --uid the uid is still read from the chain)")
    parser.set_defaults(func=run)
    return parser


def _lookup_uid(network: str, netuid: int, hotkey: str) -> int:
    import bittensor as bt

    try:
        subtensor = bt.Subtensor(network=network)
    except Exception as exc:  # noqa: BLE001 - DNS, refused, websockets: name the endpoint
        raise ConnectionError(f"cannot reach the chain at {network} ({exc})") from exc
    try:
        uid = subtensor.get_uid_for_hotkey_on_subnet(hotkey_ss58=hotkey, netuid=netuid)
    finally:
        subtensor.close()
    if uid is None:
        raise LookupError(f"hotkey {hotkey} has no uid on netuid {netuid} ({network})")
    return int(uid)


def run(args: argparse.Namespace) -> int:
    import bittensor as bt

    from cascade.errors import ConfigError
    from natix_miner.registration import (RegistrationError, btcli_register_command,
                                          register_with_app_server, registration_payload)
    from natix_miner.settings import load_settings, resolve_config_path

    try:
        settings, _ = load_settings(resolve_config_path(args.config))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    netuid = args.netuid if args.netuid is not None else settings.netuid
    network, endpoint = chain_from_args(args)
    chain = endpoint or network
    w = wallet_from_args(args)
    wname, whot, wpath = w.name, w.hotkey, w.path
    if not args.skip_app_server and not args.model_repo:
        print("error: --model-repo OWNER/NAME is required for the application server "
              "(or pass --skip-app-server)", file=sys.stderr)
        return EXIT_USAGE

    if not args.skip_chain:
        cmd = btcli_register_command(netuid, wname, whot, chain,
                                     wallet_path=os.path.expanduser(wpath))
        print("step 1/2, subnet registration:\n  " + " ".join(cmd), flush=True)
        if not args.dry_run:
            if shutil.which(cmd[0]) is None:
                print(f"error: btcli not found; install it with\n  {BTCLI_INSTALL}\nand rerun, or "
                      "run the command above yourself and rerun with --skip-chain", file=sys.stderr)
                return EXIT_FAILED
            code = subprocess.call(cmd)
            if code != 0:
                print(f"error: btcli exited with {code}", file=sys.stderr)
                return EXIT_FAILED
    if args.skip_app_server:
        return EXIT_OK

    wallet = bt.Wallet(name=wname, hotkey=whot, path=wpath)
    if not wallet.hotkey_file.exists_on_device():
        print(f"error: hotkey '{whot}' of wallet '{wname}' not found under {wpath}", file=sys.stderr)
        return EXIT_USAGE
    hotkey = wallet.hotkey  # may prompt for the hotkey password
    uid = args.uid
    if uid is None:
        try:
            uid = _lookup_uid(chain, netuid, hotkey.ss58_address)
        except Exception as exc:  # noqa: BLE001 - chain unreachable or not registered
            print(f"error: cannot find the uid ({exc}); pass --uid", file=sys.stderr)
            return EXIT_FAILED
    payload = registration_payload(hotkey, uid, args.model_repo)
    url = args.app_server.rstrip("/") + args.register_path
    print(f"step 2/2, application server: POST {url}\n{json.dumps(payload, indent=2)}", flush=True)
    if args.dry_run:
        return EXIT_OK

    def on_status(status: str, body: object) -> None:
        print(f"  status: {status} {json.dumps(body) if not isinstance(body, str) else body}",
              flush=True)

    import aiohttp

    try:
        result = asyncio.run(register_with_app_server(
            args.app_server, payload, poll_interval_s=args.poll_interval,
            timeout_s=args.poll_timeout, register_path=args.register_path,
            status_path=args.status_path, on_status=on_status))
    except (RegistrationError, OSError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
        print(f"error: application server: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result.status == "succeeded":
        print(f"registered: uid {uid}, hotkey {hotkey.ss58_address}")
        return EXIT_OK
    print(f"error: registration {result.status}: {result.detail}; check later with: curl "
          f"{args.app_server.rstrip('/')}{args.status_path.format(uid=uid)}", file=sys.stderr)
    return EXIT_FAILED
