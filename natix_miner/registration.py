"""Registering a miner: the btcli subnet registration, and the NATIX application server.

The application server whitelists a hotkey after it proves ownership: the miner signs a fresh
unix timestamp (as text) with its hotkey, exactly as `btcli wallet sign --use-hotkey` does
(sr25519 over the UTF-8 bytes, hex without 0x), and posts
`{uid, message, natix_public_key, natix_signature, type: "miner", model_repo}` to
`/participants/register`; the server queues it and `/participants/registration-status/<uid>`
reports `pending` until it `succeeded` or `failed`. Base URL and paths are flags, because the
subnet has moved them before (its own script has used `/participant/...` and a dev host).
"""

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import aiohttp
from bittensor_wallet import Keypair

DEFAULT_APP_SERVER = "https://hydra.natix.network"
REGISTER_PATH = "/participants/register"
STATUS_PATH = "/participants/registration-status/{uid}"
SUCCEEDED = {"succeeded", "success", "registered", "approved"}
FAILED = {"failed", "error", "rejected"}
# A signed timestamp older than this is refused by `verify_registration` (the server's view).
MAX_MESSAGE_AGE_S = 300


def btcli_register_command(netuid: int, wallet_name: str, wallet_hotkey: str, network: str,
                           wallet_path: Optional[str] = None) -> list[str]:
    """The subnet registration (burns TAO; btcli asks for the coldkey password and confirmation).

    `network` is a name (finney, test) or a ws(s):// endpoint: btcli's `--network` takes both.
    """
    cmd = ["btcli", "subnet", "register", "--netuid", str(netuid), "--wallet.name", wallet_name,
           "--wallet.hotkey", wallet_hotkey]
    if wallet_path:
        cmd += ["--wallet.path", wallet_path]
    return cmd + ["--network", network]


def sign_message(keypair: Keypair, message: str) -> str:
    """What `btcli wallet sign --use-hotkey --message M` prints: hex, no 0x."""
    return keypair.sign(message.encode("utf-8")).hex()


def registration_payload(keypair: Keypair, uid: int, model_repo: str, *,
                         timestamp: Optional[int] = None, kind: str = "miner") -> dict[str, Any]:
    """The JSON body for `/participants/register`, signed over a fresh unix timestamp."""
    message = str(int(time.time()) if timestamp is None else int(timestamp))
    payload: dict[str, Any] = {
        "uid": str(uid),
        "message": message,
        "natix_public_key": keypair.ss58_address,
        "natix_signature": sign_message(keypair, message),
        "type": kind,
    }
    if kind == "miner":
        payload["model_repo"] = model_repo
    return payload


def verify_registration(payload: dict[str, Any], *, now: Optional[float] = None,
                        max_age_s: float = MAX_MESSAGE_AGE_S) -> Optional[str]:
    """None if a registration body is well-formed, fresh and signed by its public key; else why.

    This is the server's side of the exchange (the tests' loopback server uses it). Never raises
    on a malformed body: the answer says what is wrong.
    """
    required = ("uid", "message", "natix_public_key", "natix_signature", "type")
    missing = [k for k in required if payload.get(k) in (None, "")]   # uid 0 is a real uid
    if missing:
        return f"missing fields {missing}"
    if payload["type"] == "miner" and not payload.get("model_repo"):
        return "a miner registration needs model_repo"
    if not isinstance(payload["message"], str):   # the signature is over the text's bytes
        return "message must be the signed timestamp as text"
    try:
        ts = int(payload["message"])
    except (TypeError, ValueError):
        return "message is not a unix timestamp"
    now = time.time() if now is None else now
    if abs(now - ts) > max_age_s:
        return f"timestamp is {abs(now - ts):.0f} s away from now (max {max_age_s:.0f})"
    try:
        ok = Keypair(ss58_address=payload["natix_public_key"]).verify(
            payload["message"].encode("utf-8"), bytes.fromhex(payload["natix_signature"]))
    except (ValueError, TypeError) as exc:
        return f"malformed key or signature ({exc})"
    return None if ok else "signature does not match natix_public_key"


@dataclass
class RegistrationResult:
    status: str  # succeeded | failed | timeout
    detail: str
    last_response: Any


class RegistrationError(RuntimeError):
    """The application server refused the request or answered something unusable."""


async def register_with_app_server(
        base_url: str, payload: dict[str, Any], *, poll_interval_s: float = 3.0,
        timeout_s: float = 180.0, register_path: str = REGISTER_PATH,
        status_path: str = STATUS_PATH, on_status: Optional[Callable[[str, Any], None]] = None,
) -> RegistrationResult:
    """POST the registration, then poll its status until it succeeds, fails or times out."""
    base = base_url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(base + register_path, json=payload) as resp:
            body = await _json_or_text(resp)
            if resp.status >= 400:
                raise RegistrationError(f"POST {register_path} -> HTTP {resp.status}: {body}")
        if on_status is not None:
            on_status("enqueued", body)
        status_url = base + status_path.format(uid=payload["uid"])
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while True:
            async with session.get(status_url) as resp:
                last = await _json_or_text(resp)
            status = str(last.get("status", "")).lower() if isinstance(last, dict) else ""
            if on_status is not None:
                on_status(status or "unknown", last)
            if status in SUCCEEDED:
                return RegistrationResult("succeeded", "registered", last)
            if status in FAILED:
                detail = last.get("error_message") or last.get("detail") or status
                return RegistrationResult("failed", str(detail), last)
            if time.monotonic() + poll_interval_s > deadline:
                return RegistrationResult("timeout", f"still '{status or 'unknown'}' after "
                                                     f"{timeout_s:.0f} s", last)
            await asyncio.sleep(poll_interval_s)


async def _json_or_text(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text()
    try:
        return json.loads(text)
    except ValueError:
        return text
