"""`register` and `model-card` against a loopback application server that checks signatures."""

import argparse
import asyncio
import json
import socket
import threading
import time

import pytest
from aiohttp import web
from bittensor_wallet import Keypair

from natix_miner.commands import model_card, register
from natix_miner.model_card import build_model_card, validate_model_card
from natix_miner.registration import (btcli_register_command, registration_payload,
                                      verify_registration)


class AppServer:
    """A stand-in NATIX server: verifies the sr25519 signature itself, queues, then succeeds."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.received: list[dict] = []
        self.polls = 0
        self.port = 0
        self._ready = threading.Event()
        self._loop = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def register(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(body)
        problem = verify_registration(body, max_age_s=60)
        if problem is not None or body["type"] != "miner":
            return web.json_response({"detail": problem or "not a miner"}, status=401)
        return web.json_response({"detail": "Registration enqueued and will be processed shortly."})

    async def status(self, request: web.Request) -> web.Response:
        self.polls += 1
        if self.polls < 2:
            return web.json_response({"status": "pending", "uid": request.match_info["uid"]})
        if self.fail:
            return web.json_response({"status": "failed", "error_message": "model repo not found"})
        return web.json_response({"status": "succeeded", "uid": request.match_info["uid"]})

    def _run(self) -> None:
        async def main() -> None:
            app = web.Application()
            app.router.add_post("/participants/register", self.register)
            app.router.add_get("/participants/registration-status/{uid}", self.status)
            runner = web.AppRunner(app)
            await runner.setup()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            site = web.TCPSite(runner, "127.0.0.1", self.port)
            await site.start()
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        asyncio.run(main())

    def __enter__(self) -> "AppServer":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def cli(argv: list[str]) -> int:
    """Parse with the real subcommand parsers (only ours, so other commands' state is irrelevant)."""
    parser = argparse.ArgumentParser(prog="natix-miner")
    sub = parser.add_subparsers(dest="command", required=True)
    register.add_parser(sub, "register")
    model_card.add_parser(sub, "model-card")
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


@pytest.fixture
def wallet(make_wallet):
    return make_wallet("miner")


def wallet_flags(wallet) -> list[str]:
    return ["--wallet.name", wallet.name, "--wallet.hotkey", wallet.hotkey_str,
            "--wallet.path", wallet.path]


def test_register_against_loopback_server(wallet, capsys):
    with AppServer() as server:
        code = cli(["register", "--skip-chain", "--uid", "17", "--model-repo", "me/roadwork",
                    "--app-server", server.url, "--poll-interval", "0.05", *wallet_flags(wallet)])
    assert code == 0, capsys.readouterr()
    body = server.received[0]
    assert set(body) == {"uid", "message", "natix_public_key", "natix_signature", "type",
                         "model_repo"}
    assert body["uid"] == "17" and body["type"] == "miner" and body["model_repo"] == "me/roadwork"
    assert body["natix_public_key"] == wallet.hotkey.ss58_address
    assert server.polls >= 2
    assert "registered: uid 17" in capsys.readouterr().out


def test_register_reports_failure(wallet, capsys):
    with AppServer(fail=True) as server:
        code = cli(["register", "--skip-chain", "--uid", "3", "--model-repo", "me/x",
                    "--app-server", server.url, "--poll-interval", "0.05", *wallet_flags(wallet)])
    assert code == 1
    assert "model repo not found" in capsys.readouterr().err


def test_server_refuses_a_forged_signature(wallet, make_wallet):
    other = make_wallet("other")
    payload = registration_payload(other.hotkey, 5, "me/x")
    payload["natix_public_key"] = wallet.hotkey.ss58_address  # claims someone else's hotkey
    import aiohttp

    async def post(url: str) -> int:
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/participants/register", json=payload) as r:
                return r.status

    with AppServer() as server:
        assert asyncio.run(post(server.url)) == 401


def test_dry_run_prints_btcli_command_and_sends_nothing(wallet, capsys):
    code = cli(["register", "--dry-run", "--uid", "9", "--netuid", "323",
                "--subtensor.network", "test", "--model-repo", "me/x",
                "--app-server", "http://127.0.0.1:9", *wallet_flags(wallet)])
    out = capsys.readouterr().out
    assert code == 0
    expected = " ".join(btcli_register_command(323, wallet.name, wallet.hotkey_str, "test",
                                               wallet_path=wallet.path))
    assert expected in out
    assert expected.startswith("btcli subnet register --netuid 323 --wallet.name")
    payload = json.loads(out[out.index("{"):])
    assert payload["uid"] == "9" and payload["natix_public_key"] == wallet.hotkey.ss58_address


def test_btcli_gets_the_wallet_path_and_the_chain_endpoint(wallet, capsys):
    """btcli must act on the operator's wallet directory and chain, not its own defaults."""
    code = cli(["register", "--dry-run", "--skip-app-server", "--netuid", "323",
                "--subtensor.chain_endpoint", "ws://127.0.0.1:9944", *wallet_flags(wallet)])
    line = capsys.readouterr().out.splitlines()[1].split()
    assert code == 0
    assert line[line.index("--wallet.path") + 1] == wallet.path
    assert line[line.index("--network") + 1] == "ws://127.0.0.1:9944"


def test_missing_btcli_names_the_package(wallet, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    code = cli(["register", "--skip-app-server", "--netuid", "323", *wallet_flags(wallet)])
    assert code == 1 and "bittensor-cli" in capsys.readouterr().err


def test_register_requires_model_repo(wallet, capsys):
    assert cli(["register", "--skip-chain", "--uid", "1", *wallet_flags(wallet)]) == 2


def test_model_card_command_writes_a_valid_card(wallet, tmp_path, capsys):
    out = tmp_path / "card" / "model_card.json"
    code = cli(["model-card", "--out", str(out), "--version", "1.2.3", *wallet_flags(wallet)])
    assert code == 0, capsys.readouterr()
    card = json.loads(out.read_text())
    assert validate_model_card(card) == []
    assert card["submitted_by"] == wallet.hotkey.ss58_address
    assert card["version"] == "1.2.3"
    assert isinstance(card["submission_time"], int) and abs(card["submission_time"] - time.time()) < 60
    # The default description names the default config's enabled tiers.
    from cascade.config import load_cascade_config
    from natix_miner.cli import DEFAULT_CONFIG
    from natix_miner.settings import resolve_config_path

    tiers = load_cascade_config(resolve_config_path(DEFAULT_CONFIG)).active_tiers
    assert tiers and all(f"{t.name} ({t.backend})" in card["description"] for t in tiers)


def test_model_card_validation():
    hk = Keypair.create_from_uri("//Alice").ss58_address
    card = build_model_card(model_name="m", description="d", version="0.1.0", hotkey_ss58=hk,
                            submission_time=1700000000)
    assert validate_model_card(card) == []
    with pytest.raises(ValueError, match="X.Y.Z"):
        build_model_card(model_name="m", description="d", version="1.0", hotkey_ss58=hk)
    with pytest.raises(ValueError, match="ss58"):
        build_model_card(model_name="m", description="d", version="1.0.0", hotkey_ss58="nope")
    assert validate_model_card({**card, "submission_time": "now"})


def test_verify_registration_answers_every_malformed_body():
    kp = Keypair.create_from_uri("//Alice")
    good = registration_payload(kp, 0, "me/x", timestamp=1_700_000_000)
    assert verify_registration(good, now=1_700_000_010) is None          # uid 0 is a real uid
    assert "away from now" in verify_registration(good, now=1_700_001_000)
    cases = {"message": 1_700_000_000, "natix_signature": 5, "natix_public_key": 7,
             "model_repo": "", "uid": None}
    for key, value in cases.items():
        problem = verify_registration({**good, key: value}, now=1_700_000_010)
        assert isinstance(problem, str) and problem, key
    other = Keypair.create_from_uri("//Bob").ss58_address
    assert "does not match" in verify_registration({**good, "natix_public_key": other},
                                                   now=1_700_000_010)


def test_unusable_app_server_url_is_an_error_not_a_traceback(wallet, capsys):
    code = cli(["register", "--skip-chain", "--uid", "1", "--model-repo", "me/x",
                "--app-server", "notaurl", *wallet_flags(wallet)])
    assert code == 1
    assert "error: application server" in capsys.readouterr().err
