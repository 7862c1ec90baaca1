#!/usr/bin/env python
"""The miner under attack, on loopback: fuzz, signature games, a burst, slow clients, a soak.

Starts `natix-miner serve --local` from a checkout (`--repo`, default this one; point it at
another worktree to take a "before" table from an older commit) as a child process on
127.0.0.1, attacks it as an adversarial caller would, and prints one table: per phase the
requests, crashes, invalid answers (a 200 whose prediction is not a finite number in [0, 1]),
answers over 9 s, requests refused before the forward (4xx, 503), server errors (5xx),
connection errors, fallback answers, p50/p99 latency; then RSS and open file descriptors of the
miner at start and end, the soak's memory growth after warm-up, how many slow clients were still
connected after `--slow-wait` seconds, and each signature game's verdict.

Phases (each bounded by its count or duration; nothing leaves 127.0.0.1):
- fuzz: `--fuzz N` requests drawn from every category: valid images of several sizes and
  formats; hostile images (empty, not base64, garbage, truncated, a tiny JPEG declaring
  6000x6600, PNG bombs, 16-bit, CMYK, alpha, palette, huge base64); malformed signed bodies
  (JSON array, empty, wrong types, no content type, not JSON, deep nesting); header abuse
  (huge hotkey or uuid, garbage nonce, missing signature); off-route and wrong-method requests,
  fresh keypairs on the base /Synapse route with 30 KB uuids; forged, empty, re-targeted and
  replayed signatures, stale and future nonces. `--concurrency` requests in flight.
- games: the signature and replay games one by one, each with the answer a safe miner gives
  (replays of an old capture with `timeout: 1000000` or version 0, nonces from the future that
  must not lock the caller out, replays that must not use up the genuine validator's rate limit
  (on a second miner started with `--rate-limit 20`), a fresh keypair on /Synapse, forged and
  empty signatures, a body hash that is not the signed one).
- burst: `--burst N` valid queries at once; then 10 sequential ones, counted as full-cascade
  answers or fallbacks from the miner's own /metrics outcomes.
- slow: `--slow N` clients each of three kinds (headers dribbled a byte a second, a signed body
  that stalls, a connection that sends nothing), checked after `--slow-wait` s, while valid
  probes must still be answered.
- soak: `--soak-s` seconds at `--soak-rate` requests a second (90% valid images of several
  sizes, 10% hostile), RSS sampled every 5 s. RSS swings by the buffers in flight, so growth is
  that of its floor: the lowest sample of the last third against the first third, after a
  warm-up of the first fifth.

Presets (`--preset`): ci (the short run CI does, about a minute), short, medium, long (10,000
fuzz, 300 burst, 30 min soak: run it on a quiet machine). Flags given explicitly override the
preset. The engine is the weight-free hazard-cue tier unless `--config` names a root config
(its `miner.telemetry_port` is set to a free port in a copy beside it, so relative paths hold).

    .venv/bin/python scripts/attack.py --preset short
    .venv/bin/python scripts/attack.py --preset long --json runs/attack-after.json
    .venv/bin/python scripts/attack.py --preset long --repo /work/base --json runs/attack-before.json
"""

import argparse
import asyncio
import base64
import io
import json
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
FALLBACK = 0.5
PRESETS = {
    "ci": dict(fuzz=600, burst=40, slow=5, slow_wait=12.0, soak_s=15.0, concurrency=12),
    "short": dict(fuzz=1000, burst=50, slow=10, slow_wait=15.0, soak_s=60.0, concurrency=16),
    "medium": dict(fuzz=3000, burst=150, slow=20, slow_wait=20.0, soak_s=300.0, concurrency=16),
    "long": dict(fuzz=10_000, burst=300, slow=35, slow_wait=60.0, soak_s=1800.0, concurrency=16),
}
HAZARD_CONFIG = """
miner:
  netuid: 72
  telemetry_port: {tport}
artifacts_dir: {artifacts}
engine: {{deadline_ms: 6000, fallback_probability: {fallback}}}
tiers:
  - {{name: hazard_cues.handset, backend: hazard_cues, max_batch_size: 8}}
devices: {{cpu: {{memory_gib: 4}}}}
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="short",
                   help="counts and durations (default short); explicit flags override it")
    p.add_argument("--repo", type=Path, default=ROOT,
                   help="checkout whose miner is attacked (default: this one); its code runs with "
                        "this interpreter")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter that runs the miner (default: this one)")
    p.add_argument("--config", type=Path, default=None,
                   help="root config of the attacked miner (default: the hazard-cue tier alone)")
    p.add_argument("--fuzz", type=int, default=None, help="fuzz requests")
    p.add_argument("--burst", type=int, default=None, help="concurrent queries in the burst")
    p.add_argument("--slow", type=int, default=None, help="slow clients of each kind")
    p.add_argument("--slow-wait", type=float, default=None, help="seconds before slow clients are checked")
    p.add_argument("--soak-s", type=float, default=None, help="soak duration in seconds (0 = no soak)")
    p.add_argument("--soak-rate", type=float, default=4.0, help="soak requests per second (default 4)")
    p.add_argument("--concurrency", type=int, default=None, help="fuzz requests in flight")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of real images for the valid queries (default: synthetic street-like)")
    p.add_argument("--phases", default="fuzz,games,burst,slow,soak",
                   help="comma-separated phases to run, in this order (default all)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--log", type=Path, default=None, help="miner log file (default: a temp file)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    limits = dict(fuzz=(0, 100_000), burst=(0, 2000), slow=(0, 200), slow_wait=(0, 600),
                  soak_s=(0, 4 * 3600), concurrency=(1, 256), soak_rate=(0.1, 50))
    for key, (lo, hi) in limits.items():
        if not lo <= getattr(args, key) <= hi:
            p.error(f"--{key.replace('_', '-')} must be within {lo}..{hi}")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# ----- the miner under attack, a child process ---------------------------------------------------

class MinerProcess:
    """`natix-miner serve --local` from `repo`, on 127.0.0.1; its RSS and fds from /proc."""

    def __init__(self, args, config: Path, allow: list[str], rate_limit: int, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.cmd = [args.python, "-m", "natix_miner", "serve", "--local", "--config", str(config),
                    "--axon.port", str(self.port), "--rate-limit", str(rate_limit)]
        for hk in allow:
            self.cmd += ["--allow-hotkey", hk]
        env = dict(os.environ, PYTHONPATH=str(args.repo), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        self._out = open(str(log) + ".stdout", "w+")
        self._err = open(log, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=str(args.repo), env=env, stdout=self._out,
                                     stderr=self._err, start_new_session=True)
        self.hotkey = ""

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"miner exited with {self.proc.returncode} during start-up; see {self.log}")
            self._out.seek(0)
            for line in self._out.read().splitlines():
                if line.startswith("miner ready:"):
                    # "miner ready: axon ADDR hotkey SS58 [(where the keys came from)]"
                    self.hotkey = line.split("hotkey", 1)[1].split()[0]
                    return
            time.sleep(0.2)
        raise TimeoutError(f"miner not ready after {timeout_s} s; see {self.log}")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mib(self) -> float:
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return float("nan")

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return -1

    def stop(self) -> Optional[int]:
        if self.alive:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        self._err.close()
        return self.proc.returncode


# ----- payloads ------------------------------------------------------------------------------------

def _jpeg(arr_or_im, quality=75, **kw) -> bytes:
    from PIL import Image

    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, **kw)
    return buf.getvalue()


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def street_like(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    arr = np.clip(rng.normal(110, 35, (h, w, 3)), 0, 255).astype(np.uint8)
    arr[h // 2:, :] = (arr[h // 2:, :] * 0.6).astype(np.uint8)  # darker road
    if rng.random() < 0.5:  # an orange cone-like blob
        x, y = int(rng.integers(0, max(1, w - w // 12))), int(rng.integers(h // 2, max(h // 2 + 1, h - h // 8)))
        arr[y:y + h // 8, x:x + w // 14] = (255, 110, 0)
    return arr


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def build_payloads(args, rng: np.random.Generator) -> dict:
    """Valid image payloads (base64) and hostile image payloads by name."""
    from PIL import Image

    valid = []
    if args.images is not None:
        files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for p in [files[int(i)] for i in rng.choice(len(files), size=min(40, len(files)), replace=False)]:
            valid.append(b64(_jpeg(Image.open(p).convert("RGB"))))
    sizes = [(224, 224), (640, 480), (1360, 800), (1920, 1080), (4032, 3024)]
    for i in range(12):
        w, h = sizes[i % len(sizes)]
        valid.append(b64(_jpeg(street_like(rng, w, h))))
    good = base64.b64decode(valid[1])
    big_declared = _jpeg(Image.new("RGB", (6000, 6600), (90, 90, 90)), quality=10)
    arr16 = (np.arange(1500 * 2000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(1500, 2000)
    hostile = {
        "empty": "",
        "not_base64": "@@@@####!!!!" * 10,
        "garbage": b64(b"\x00\x01 not a picture" * 200),
        "truncated_jpeg": b64(good[: len(good) // 3]),
        "declared_6000x6600_1kb": b64(big_declared[:1024]),
        "declared_6000x6600_full": b64(big_declared),
        "png_bomb_9000": b64(_png_bomb(9000, 9000)),
        "png_bomb_60000": b64(_png_bomb(60000, 60000)),
        "png_16bit": b64(_png(Image.fromarray(arr16))),
        "cmyk_jpeg": b64(_jpeg(Image.new("CMYK", (640, 480), (0, 200, 200, 0)))),
        "rgba_png": b64(_png(Image.new("RGBA", (800, 600), (10, 200, 10, 90)))),
        "gif": b64(_gif()),
        "data_url": "data:image/jpeg;base64," + valid[0],
        "tiny_1x1": b64(_jpeg(Image.new("RGB", (1, 1)))),
        "extreme_aspect": b64(_jpeg(Image.new("RGB", (12000, 8), (200, 100, 0)))),
        "progressive": b64(_jpeg(street_like(rng, 1360, 800), progressive=True)),
        "huge_base64": "A" * 2_000_000,
    }
    return {"valid": valid, "hostile": hostile}


def _gif() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("P", (32, 32)).save(buf, format="GIF")
    return buf.getvalue()


# ----- the client ------------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: int  # HTTP status; 0 = connection error; -1 = client timeout (12 s)
    latency_s: float
    prediction: Optional[float] = None
    synapse_route: bool = True  # a prediction was asked for (the ImageSynapse route)


@dataclass
class PhaseStats:
    name: str
    outcomes: list = field(default_factory=list)
    crashed: bool = False
    notes: dict = field(default_factory=dict)

    def row(self) -> dict:
        lat = [o.latency_s for o in self.outcomes if o.status > 0]
        answered = [o for o in self.outcomes if o.status == 200 and o.synapse_route]
        invalid = sum(1 for o in answered if o.prediction is None or not math.isfinite(o.prediction)
                      or not 0.0 <= o.prediction <= 1.0)
        return {
            "phase": self.name, "requests": len(self.outcomes), "crashes": int(self.crashed),
            "invalid": invalid,
            "over_9s": sum(1 for o in self.outcomes if o.latency_s > 9.0 or o.status == -1),
            "refused": sum(1 for o in self.outcomes if 400 <= o.status < 500 or o.status == 503),
            "server_errors": sum(1 for o in self.outcomes if o.status >= 500 and o.status != 503),
            "conn_errors": sum(1 for o in self.outcomes if o.status == 0),
            "fallbacks": sum(1 for o in answered if o.prediction == FALLBACK),
            "p50_ms": float(np.percentile(lat, 50) * 1e3) if lat else float("nan"),
            "p99_ms": float(np.percentile(lat, 99) * 1e3) if lat else float("nan"),
        }


class Client:
    """Signs and posts requests the way bittensor's dendrite does, and anything else on demand."""

    def __init__(self, port: int, miner_hotkey: str, wallets: dict) -> None:
        import aiohttp
        import bittensor as bt

        self.bt = bt
        self.port = port
        self.miner_hotkey = miner_hotkey
        self.wallets = wallets
        self.dendrites = {name: bt.Dendrite(wallet=w) for name, w in wallets.items()}
        # One connection per request, as validators effectively have (they query a miner about
        # once a minute, far past its keep-alive): no keep-alive reuse races in the figures.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True))
        self.timeout = aiohttp.ClientTimeout(total=12)
        self.errors: dict[str, int] = {}  # connection errors by type

    def info(self, hotkey: Optional[str] = None):
        return self.bt.AxonInfo(version=1, ip=LOOPBACK, port=self.port, ip_type=4,
                                hotkey=hotkey or self.miner_hotkey, coldkey=hotkey or self.miner_hotkey)

    def signed(self, image: str = "", wallet: str = "validator", synapse=None,
               receiver: Optional[str] = None):
        from natix_miner.protocol import ImageSynapse

        syn = synapse if synapse is not None else ImageSynapse(image=image)
        return self.dendrites[wallet].preprocess_synapse_for_request(self.info(receiver), syn, 9)

    def signed_at(self, nonce: int, image: str, wallet: str = "validator", uuid: Optional[str] = None):
        """A request signed with a chosen nonce (a capture from the past, a clock in the future)."""
        from natix_miner.protocol import ImageSynapse

        w = self.wallets[wallet]
        syn = ImageSynapse(image=image, timeout=9.0)
        syn.dendrite = self.bt.TerminalInfo(ip=LOOPBACK, version=1005000, nonce=nonce,
                                            uuid=uuid or self.dendrites[wallet].uuid,
                                            hotkey=w.hotkey.ss58_address)
        syn.axon = self.bt.TerminalInfo(ip=LOOPBACK, port=self.port, hotkey=self.miner_hotkey)
        msg = f"{nonce}.{w.hotkey.ss58_address}.{self.miner_hotkey}.{syn.dendrite.uuid}.{syn.body_hash}"
        syn.dendrite.signature = f"0x{w.hotkey.sign(msg).hex()}"
        return syn

    @staticmethod
    def wire(syn) -> tuple[dict, bytes]:
        headers = syn.to_headers()
        headers["content-type"] = "application/json"
        return headers, json.dumps(syn.model_dump()).encode()

    async def send(self, path: str, headers: dict, body: bytes, method: str = "POST") -> Outcome:
        import aiohttp

        route = path in ("/ImageSynapse", "/ExtendedImageSynapse")
        t0 = time.monotonic()
        try:
            async with self.session.request(method, f"http://{LOOPBACK}:{self.port}{path}",
                                            headers=headers, data=body, timeout=self.timeout) as resp:
                text = await resp.read()
                pred = None
                if resp.status == 200:
                    try:
                        pred = float(json.loads(text).get("prediction"))
                    except (ValueError, TypeError, AttributeError):
                        pred = None
                return Outcome(resp.status, time.monotonic() - t0, pred, route)
        except asyncio.TimeoutError:
            return Outcome(-1, time.monotonic() - t0, None, route)
        except (aiohttp.ClientError, OSError) as exc:
            key = f"{type(exc).__name__}: {str(exc)[:60]}"
            self.errors[key] = self.errors.get(key, 0) + 1
            return Outcome(0, time.monotonic() - t0, None, route)

    async def query(self, image: str, wallet: str = "validator") -> Outcome:
        headers, body = self.wire(self.signed(image, wallet))
        return await self.send("/ImageSynapse", headers, body)

    async def metrics(self, tport: Optional[int]) -> dict:
        """The miner's answered-request outcomes from its /metrics (empty without telemetry)."""
        if tport is None:
            return {}
        try:
            async with self.session.get(f"http://{LOOPBACK}:{tport}/metrics", timeout=self.timeout) as r:
                text = await r.text()
        except Exception:  # noqa: BLE001
            return {}
        out = {}
        for line in text.splitlines():
            if line.startswith("natix_miner_requests_total{"):
                label = line.split('outcome="', 1)[1].split('"', 1)[0]
                out[label] = float(line.rsplit(" ", 1)[1])
        return out

    async def close(self) -> None:
        await self.session.close()
        for d in self.dendrites.values():
            await d.aclose_session()


# ----- phases ------------------------------------------------------------------------------------------

def fuzz_cases(client: Client, payloads: dict, rng: random.Random) -> list[tuple[str, Callable]]:
    """(category, coroutine factory) for every kind of hostile or valid request."""
    valid, hostile = payloads["valid"], payloads["hostile"]
    bt = client.bt
    cases: list[tuple[str, Callable]] = []

    def add(category: str, weight: int, factory: Callable) -> None:
        cases.extend([(category, factory)] * weight)

    add("valid_image", 30, lambda: client.query(rng.choice(valid)))
    for name, data in hostile.items():
        add(f"image:{name}", 1 if name == "huge_base64" else 2, lambda d=data: client.query(d))

    def body(raw: bytes, content_type: Optional[str] = "application/json"):
        def make():
            headers, _ = client.wire(client.signed(rng.choice(valid)))
            headers.pop("content-type", None)
            if content_type:
                headers["content-type"] = content_type
            return client.send("/ImageSynapse", headers, raw)
        return make

    add("body:json_array", 2, body(b"[1, 2, 3]"))
    add("body:empty", 2, body(b""))
    add("body:wrong_types", 2, body(b'{"image": 12345, "prediction": "high", "timeout": "x"}'))
    add("body:no_content_type", 2, body(json.dumps({"image": valid[0]}).encode(), None))
    add("body:not_json", 2, body(b"{not json at all"))
    add("body:deep_nesting", 1, body(b"[" * 50_000 + b"]" * 50_000))
    add("body:null", 1, body(b"null"))

    def header(mutate: Callable[[dict], None]):
        def make():
            headers, raw = client.wire(client.signed(rng.choice(valid)))
            mutate(headers)
            return client.send("/ImageSynapse", headers, raw)
        return make

    add("header:huge_hotkey", 2, header(lambda h: h.update(bt_header_dendrite_hotkey="5" * 12_000)))
    add("header:huge_uuid", 2, header(lambda h: h.update(bt_header_dendrite_uuid="u" * 12_000)))
    add("header:over_16kb", 1, header(lambda h: h.update({"x-pad": "p" * 20_000})))
    add("header:garbage_nonce", 2, header(lambda h: h.update(bt_header_dendrite_nonce="abc")))
    add("header:no_signature", 2, header(lambda h: h.pop("bt_header_dendrite_signature", None)))
    add("header:no_hotkey", 2, header(lambda h: h.pop("bt_header_dendrite_hotkey", None)))
    add("header:huge_timeout", 1, header(lambda h: h.update(timeout="1000000")))
    add("header:declared_1gb", 1, header(lambda h: h.update({"content-length": str(10**9)})))

    def route(path: str, method: str = "POST"):
        def make():
            headers, raw = client.wire(client.signed(valid[0]))
            return client.send(path, headers, raw if method == "POST" else b"", method)
        return make

    add("route:get", 2, route("/ImageSynapse", "GET"))
    add("route:unknown", 2, route("/NotASynapse"))
    add("route:docs", 1, route("/docs", "GET"))
    add("route:openapi", 1, route("/openapi.json", "GET"))

    def base_route():
        dendrite = bt.Dendrite(wallet=client.wallets["stranger"])
        dendrite.uuid = "u" * 30_000
        headers, raw = client.wire(dendrite.preprocess_synapse_for_request(client.info(), bt.Synapse(), 9))
        return client.send("/Synapse", headers, raw)

    add("route:base_synapse_fresh_key", 3, base_route)

    def forged():
        syn = client.signed(rng.choice(valid), wallet="stranger")
        syn.dendrite.hotkey = client.wallets["validator"].hotkey.ss58_address
        return client.send("/ImageSynapse", *client.wire(syn))

    def empty_sig():
        syn = client.signed(rng.choice(valid))
        syn.dendrite.signature = ""
        return client.send("/ImageSynapse", *client.wire(syn))

    def other_miner():
        syn = client.signed(rng.choice(valid), receiver=client.wallets["stranger"].hotkey.ss58_address)
        return client.send("/ImageSynapse", *client.wire(syn))

    def stranger():
        return client.query(rng.choice(valid), wallet="stranger")

    def replay():
        headers, raw = client.wire(client.signed(rng.choice(valid)))

        async def twice():
            await client.send("/ImageSynapse", headers, raw)
            return await client.send("/ImageSynapse", headers, raw)
        return twice()

    def old_nonce():
        syn = client.signed_at(time.time_ns() - 3600 * 10**9, rng.choice(valid),
                               uuid=f"{rng.getrandbits(64):x}")
        headers, raw = client.wire(syn)
        headers["timeout"] = "1000000"
        return client.send("/ImageSynapse", headers, raw)

    def future_nonce():
        nonce = rng.choice([time.time_ns() + 3600 * 10**9, 2**63 - 1])
        syn = client.signed_at(nonce, rng.choice(valid), uuid=f"{rng.getrandbits(64):x}")
        return client.send("/ImageSynapse", *client.wire(syn))

    add("sig:forged", 2, forged)
    add("sig:empty", 2, empty_sig)
    add("sig:other_miner", 2, other_miner)
    add("sig:unregistered", 2, stranger)
    add("sig:replay", 2, replay)
    add("sig:old_nonce_huge_timeout", 2, old_nonce)
    add("sig:future_nonce", 2, future_nonce)
    return cases


async def phase_fuzz(args, client: Client, payloads: dict, miner: MinerProcess) -> PhaseStats:
    from tqdm import tqdm

    stats = PhaseStats("fuzz")
    rng = random.Random(args.seed)
    cases = fuzz_cases(client, payloads, rng)
    per_category: dict[str, list] = {}
    sem = asyncio.Semaphore(args.concurrency)
    bar = tqdm(total=args.fuzz, desc="fuzz", unit="req", leave=False, disable=not sys.stderr.isatty())

    async def one(i: int) -> None:
        category, factory = cases[rng.randrange(len(cases))]
        async with sem:
            if not miner.alive:
                return
            outcome = await factory()
        stats.outcomes.append(outcome)
        per_category.setdefault(category, []).append(outcome.status)
        bar.update(1)

    await asyncio.gather(*(one(i) for i in range(args.fuzz)))
    bar.close()
    stats.crashed = not miner.alive
    stats.notes["status_by_category"] = {c: dict(sorted(_count(v).items())) for c, v in sorted(per_category.items())}
    return stats


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


async def phase_games(args, client: Client, payloads: dict, miner: MinerProcess,
                      rate_client: Optional[Client]) -> PhaseStats:
    """Each game: what an attacker tries, and whether the miner held (the safe answer)."""
    stats = PhaseStats("games")
    image = payloads["valid"][0]
    verdicts: dict[str, str] = {}

    async def record(outcome: Outcome) -> Outcome:
        stats.outcomes.append(outcome)
        return outcome

    def refused(o: Outcome) -> bool:
        return 400 <= o.status < 500

    # 1. A capture from an hour ago, never seen by this process, replayed with unsigned headers
    #    claiming a huge timeout or an ancient dendrite version.
    for label, header in (("timeout", ("timeout", "1000000")),
                          ("version0", ("bt_header_dendrite_version", "0"))):
        syn = client.signed_at(time.time_ns() - 3600 * 10**9, image, uuid=f"capture-{label}")
        headers, raw = client.wire(syn)
        headers[header[0]] = header[1]
        o = await record(await client.send("/ImageSynapse", headers, raw))
        verdicts[f"old_capture_replayed_{label}"] = "held" if refused(o) else f"BROKEN ({o.status}: answered)"
    # 2. Nonces from the future must be refused and must not lock the caller's dendrite out
    #    (each on a dendrite of its own: a miner that is locked out stays locked out).
    for label, nonce in (("plus_1h", time.time_ns() + 3600 * 10**9), ("2^63-1", 2**63 - 1)):
        name = f"game-{label}"
        client.dendrites[name] = client.bt.Dendrite(wallet=client.wallets["validator"])
        client.wallets[name] = client.wallets["validator"]
        first = await record(await client.send("/ImageSynapse", *client.wire(
            client.signed_at(nonce, image, wallet=name, uuid=client.dendrites[name].uuid))))
        later = await record(await client.query(image, wallet=name))
        ok = refused(first) and later.status == 200
        verdicts[f"future_nonce_{label}"] = "held" if ok else (
            f"BROKEN (future nonce -> {first.status}, later genuine request -> {later.status})")
    # 3. An immediate replay of a genuine request.
    headers, raw = client.wire(client.signed(image))
    await record(await client.send("/ImageSynapse", headers, raw))
    o = await record(await client.send("/ImageSynapse", headers, raw))
    verdicts["immediate_replay"] = "held" if refused(o) else f"BROKEN ({o.status})"
    # 4. Replays must not use up the genuine validator's rate limit (miner with --rate-limit 20).
    if rate_client is not None:
        headers, raw = rate_client.wire(rate_client.signed(image))
        await record(await rate_client.send("/ImageSynapse", headers, raw))
        for _ in range(30):
            await record(await rate_client.send("/ImageSynapse", headers, raw))
        o = await record(await rate_client.query(image))
        verdicts["replays_lock_out_validator"] = "held" if o.status == 200 else f"BROKEN (genuine -> {o.status})"
    # 5. A fresh keypair on the base /Synapse route.
    bt = client.bt
    dendrite = bt.Dendrite(wallet=client.wallets["stranger"])
    o = await record(await client.send("/Synapse", *client.wire(
        dendrite.preprocess_synapse_for_request(client.info(), bt.Synapse(), 9))))
    await dendrite.aclose_session()
    verdicts["fresh_key_on_base_route"] = "held" if o.status != 200 else "BROKEN (200)"
    # 6. Forged and empty signatures.
    syn = client.signed(image, wallet="stranger")
    syn.dendrite.hotkey = client.wallets["validator"].hotkey.ss58_address
    o = await record(await client.send("/ImageSynapse", *client.wire(syn)))
    verdicts["forged_signature"] = "held" if refused(o) else f"BROKEN ({o.status})"
    syn = client.signed(image)
    syn.dendrite.signature = ""
    o = await record(await client.send("/ImageSynapse", *client.wire(syn)))
    verdicts["empty_signature"] = "held" if refused(o) else f"BROKEN ({o.status})"
    # 7. A signed request whose body is not a synapse object.
    syn = client.signed(image)
    headers, _ = client.wire(syn)
    bad = json.loads(client.wire(syn)[1])
    bad["computed_body_hash"] = "0" * 64
    o = await record(await client.send("/ImageSynapse", headers, b"[" + json.dumps(bad).encode() + b"]"))
    verdicts["malformed_signed_body"] = "held" if o.status in (400, 422) else f"BROKEN ({o.status})"
    stats.notes["verdicts"] = verdicts
    stats.crashed = not miner.alive
    return stats


async def phase_burst(args, client: Client, payloads: dict, miner: MinerProcess,
                      tport: Optional[int]) -> list[PhaseStats]:
    valid = payloads["valid"]
    burst = PhaseStats("burst")
    wires = [client.wire(client.signed(valid[i % len(valid)])) for i in range(args.burst)]
    burst.outcomes = list(await asyncio.gather(*(client.send("/ImageSynapse", h, b) for h, b in wires)))
    burst.crashed = not miner.alive
    after = PhaseStats("after_burst")
    before = await client.metrics(tport)
    for i in range(10):
        after.outcomes.append(await client.query(valid[i % len(valid)]))
    delta = {k: v - before.get(k, 0.0) for k, v in (await client.metrics(tport)).items()}
    after.notes["outcomes"] = {k: int(v) for k, v in delta.items() if v}
    after.notes["full_cascade"] = int(delta.get("ok", 0)) if tport is not None else None
    after.crashed = not miner.alive
    return [burst, after]


async def phase_slow(args, client: Client, payloads: dict, miner: MinerProcess) -> PhaseStats:
    stats = PhaseStats("slow")
    port = miner.port
    conns: list[tuple[str, asyncio.StreamReader, asyncio.StreamWriter]] = []
    headers, raw = client.wire(client.signed(payloads["valid"][0]))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k != "content-length")
    request_head = (f"POST /ImageSynapse HTTP/1.1\r\nhost: {LOOPBACK}\r\n{head}"
                    f"content-length: {len(raw)}\r\n\r\n").encode()
    for kind in ("dribble", "stall_body", "idle"):
        for _ in range(args.slow):
            try:
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
            except OSError:
                continue
            if kind == "stall_body":
                writer.write(request_head + raw[:100])
            conns.append((kind, reader, writer))

    async def dribble(writer: asyncio.StreamWriter) -> None:
        data = request_head
        for i in range(len(data)):
            try:
                writer.write(data[i:i + 1])
                await writer.drain()
            except (ConnectionError, OSError):
                return
            await asyncio.sleep(1.0)

    dribblers = [asyncio.create_task(dribble(w)) for k, _, w in conns if k == "dribble"]
    t0 = time.monotonic()
    probes = []
    while time.monotonic() - t0 < args.slow_wait:
        probes.append(await client.query(payloads["valid"][len(probes) % len(payloads["valid"])]))
        await asyncio.sleep(max(0.5, args.slow_wait / 6))
    still_open: dict[str, int] = {}
    for kind, reader, writer in conns:
        try:
            data = await asyncio.wait_for(reader.read(65536), 0.05)
            closed = data == b"" or reader.at_eof() or b" 408 " in data
            if data and not closed:  # an answer arrived but the connection may stay: look again
                closed = (await asyncio.wait_for(reader.read(65536), 0.05)) == b""
        except asyncio.TimeoutError:
            closed = False
        except (ConnectionError, OSError):
            closed = True
        if not closed:
            still_open[kind] = still_open.get(kind, 0) + 1
    for task in dribblers:
        task.cancel()
    for _, _, writer in conns:
        writer.close()
    stats.outcomes = probes
    stats.notes.update(slow_clients=len(conns), still_open_after_s=args.slow_wait,
                       still_open=sum(still_open.values()), still_open_by_kind=still_open)
    stats.crashed = not miner.alive
    return stats


async def phase_soak(args, client: Client, payloads: dict, miner: MinerProcess) -> PhaseStats:
    from tqdm import tqdm

    stats = PhaseStats("soak")
    rng = random.Random(args.seed + 1)
    valid, hostile = payloads["valid"], [v for k, v in payloads["hostile"].items() if k != "huge_base64"]
    samples: list[tuple[float, float, int]] = []
    tasks: set = set()
    t0 = time.monotonic()
    next_sample = t0
    interval = 1.0 / args.soak_rate
    sent = 0
    bar = tqdm(total=int(args.soak_s), desc="soak", unit="s", leave=False, disable=not sys.stderr.isatty())

    async def one(image: str) -> None:
        stats.outcomes.append(await client.query(image))

    while (now := time.monotonic()) - t0 < args.soak_s and miner.alive:
        if now >= next_sample:
            samples.append((now - t0, miner.rss_mib(), miner.fds()))
            next_sample += 5.0
            bar.n = int(now - t0)
            bar.refresh()
        if len(tasks) < 64:
            image = rng.choice(hostile) if rng.random() < 0.1 else rng.choice(valid)
            task = asyncio.create_task(one(image))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(max(0.0, t0 + sent * interval - time.monotonic()))
    if tasks:
        await asyncio.gather(*tasks)
    samples.append((time.monotonic() - t0, miner.rss_mib(), miner.fds()))
    bar.close()
    # RSS swings by the size of the buffers in flight; a leak shows as a rising floor. Compare the
    # lowest RSS of the first and the last third after warm-up (the first fifth of the soak).
    warm = [r for t, r, _ in samples if t >= args.soak_s / 5] or [samples[-1][1]]
    third = max(1, len(warm) // 3)
    floor_warm, floor_end = min(warm[:third]), min(warm[-third:])
    stats.notes.update(rss_samples=[(round(t, 1), round(r, 1), f) for t, r, f in samples],
                       rss_floor_warm_mib=round(floor_warm, 1), rss_floor_end_mib=round(floor_end, 1),
                       rss_median_mib=round(float(np.median(warm)), 1),
                       rss_max_mib=round(max(r for _, r, _ in samples), 1),
                       growth_after_warmup_pct=round((floor_end - floor_warm) / floor_warm * 100, 2)
                       if floor_warm else None)
    stats.crashed = not miner.alive
    return stats


# ----- the run ---------------------------------------------------------------------------------------

def make_config(args, tmp: Path) -> tuple[Path, int, Optional[Path]]:
    """(config path, telemetry port, a file to delete afterwards)."""
    tport = free_port()
    if args.config is None:
        cfg = tmp / "attack.yaml"
        cfg.write_text(HAZARD_CONFIG.format(tport=tport, artifacts=tmp / "artifacts", fallback=FALLBACK))
        return cfg, tport, None
    import yaml

    src = args.config.resolve()
    data = yaml.safe_load(src.read_text()) or {}
    data.setdefault("miner", {})["telemetry_port"] = tport
    copy = src.parent / f".attack-{os.getpid()}-{src.name}"
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    return copy, tport, copy


def print_table(rows: list[dict], summary: dict) -> None:
    cols = ["phase", "requests", "crashes", "invalid", "over_9s", "refused", "server_errors",
            "conn_errors", "fallbacks", "p50_ms", "p99_ms"]
    widths = {c: max(len(c), 8) for c in cols}
    widths["phase"] = 12
    print("  ".join(c.rjust(widths[c]) if c != "phase" else c.ljust(widths[c]) for c in cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            text = f"{v:.1f}" if isinstance(v, float) else str(v)
            cells.append(text.ljust(widths[c]) if c == "phase" else text.rjust(widths[c]))
        print("  ".join(cells))
    for line in summary["lines"]:
        print(line)


async def run(args) -> dict:
    from bittensor.utils import networking

    networking.get_external_ip = lambda: LOOPBACK  # loopback only: no public-IP lookup
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from natix_miner.neuron import throwaway_wallet

    tmp = Path(tempfile.mkdtemp(prefix="natix-attack-"))
    wallets = {n: throwaway_wallet(tmp / "wallets", name=n) for n in ("validator", "stranger")}
    rng = np.random.default_rng(args.seed)
    print(f"attacking the miner of {args.repo} on {LOOPBACK} (preset {args.preset}; "
          f"fuzz {args.fuzz}, burst {args.burst}, slow {args.slow}x3 for {args.slow_wait:g} s, "
          f"soak {args.soak_s:g} s at {args.soak_rate:g}/s)", flush=True)
    payloads = build_payloads(args, rng)
    config, tport, cleanup = make_config(args, tmp)
    log = args.log or (tmp / "miner.log")
    allow = [wallets["validator"].hotkey.ss58_address]
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    miner = MinerProcess(args, config, allow, 0, log)
    rate_miner = None
    results: list[PhaseStats] = []
    client = rate_client = None
    try:
        miner.wait_ready()
        if "games" in phases:
            rate_miner = MinerProcess(args, _rate_config(config, tmp), allow, 20, Path(str(log) + ".rate"))
            rate_miner.wait_ready()
        client = Client(miner.port, miner.hotkey, wallets)
        rate_client = Client(rate_miner.port, rate_miner.hotkey, wallets) if rate_miner else None
        for i in range(5):  # warm-up
            await client.query(payloads["valid"][i % len(payloads["valid"])])
        start = {"rss_mib": miner.rss_mib(), "fds": miner.fds()}
        t_start = time.monotonic()
        for phase in phases:
            if not miner.alive:
                break
            if phase == "fuzz" and args.fuzz:
                results.append(await phase_fuzz(args, client, payloads, miner))
            elif phase == "games":
                results.append(await phase_games(args, client, payloads, miner, rate_client))
            elif phase == "burst" and args.burst:
                results.extend(await phase_burst(args, client, payloads, miner, tport))
            elif phase == "slow" and args.slow:
                results.append(await phase_slow(args, client, payloads, miner))
            elif phase == "soak" and args.soak_s:
                results.append(await phase_soak(args, client, payloads, miner))
            print(f"  {phase} done ({time.monotonic() - t_start:.0f} s; miner RSS "
                  f"{miner.rss_mib():.0f} MiB, {miner.fds()} fds)", flush=True)
        await asyncio.sleep(1.0)
        end = {"rss_mib": miner.rss_mib(), "fds": miner.fds()}
        outcomes = await client.metrics(tport)
        alive = miner.alive
    finally:
        if client is not None:
            await client.close()
        if rate_client is not None:
            await rate_client.close()
        exit_code = miner.stop()
        if rate_miner is not None:
            rate_miner.stop()
        if cleanup is not None:
            cleanup.unlink(missing_ok=True)
    rows = [r.row() for r in results]
    total = {"phase": "total"}
    for c in ("requests", "crashes", "invalid", "over_9s", "refused", "server_errors", "conn_errors", "fallbacks"):
        total[c] = sum(r[c] for r in rows)
    total["crashes"] = int(not alive)
    lat = [o.latency_s for r in results for o in r.outcomes if o.status > 0]
    total["p50_ms"] = float(np.percentile(lat, 50) * 1e3) if lat else float("nan")
    total["p99_ms"] = float(np.percentile(lat, 99) * 1e3) if lat else float("nan")
    rows.append(total)
    notes = {r.name: r.notes for r in results if r.notes}
    lines = [f"miner RSS: start {start['rss_mib']:.1f} MiB -> end {end['rss_mib']:.1f} MiB "
             f"({(end['rss_mib'] - start['rss_mib']) / start['rss_mib'] * 100:+.1f}%); open fds: start "
             f"{start['fds']} -> end {end['fds']}; miner alive at the end: {alive}; exit code {exit_code}"]
    if "soak" in notes:
        s = notes["soak"]
        lines.append(f"soak: RSS floor after warm-up {s['rss_floor_warm_mib']} MiB -> at the end "
                     f"{s['rss_floor_end_mib']} MiB ({s['growth_after_warmup_pct']:+.2f}%); median "
                     f"{s['rss_median_mib']} MiB, max {s['rss_max_mib']} MiB")
    if "slow" in notes:
        s = notes["slow"]
        lines.append(f"slow clients still open after {s['still_open_after_s']:g} s: {s['still_open']} of "
                     f"{s['slow_clients']} {s['still_open_by_kind'] or ''}")
    if "after_burst" in notes:
        s = notes["after_burst"]
        lines.append(f"after the burst, 10 sequential: {s.get('full_cascade')} full-cascade answers; "
                     f"outcomes {s.get('outcomes')}")
    if "games" in notes:
        lines.append("games: " + ", ".join(f"{k} {v}" for k, v in notes["games"]["verdicts"].items()))
    lines.append(f"miner outcomes (/metrics): {dict(sorted((k, int(v)) for k, v in outcomes.items()))}")
    summary = {"lines": lines}
    print_table(rows, summary)
    return {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "notes": notes,
            "start": start, "end": end, "alive": alive, "exit_code": exit_code,
            "outcomes": outcomes, "summary": lines}


def _rate_config(config: Path, tmp: Path) -> Path:
    """The same config for the rate-limit game's second miner, on its own telemetry port."""
    import yaml

    data = yaml.safe_load(config.read_text()) or {}
    data.setdefault("miner", {})["telemetry_port"] = free_port()
    out = config.parent / f".attack-rate-{os.getpid()}-{config.name}"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    import atexit

    atexit.register(lambda: out.unlink(missing_ok=True))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
    total = result["rows"][-1]
    return 0 if result["alive"] and total["invalid"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
