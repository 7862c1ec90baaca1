#!/usr/bin/env python
"""Latency through the real axon on loopback, and what the axon path costs over the bare model.

Starts the miner exactly as `natix-miner serve --local` does, then for each image, alternately:
- the bare model call: `await engine.predict(image)` on the decoded image, timed on the engine's
  own loop;
- the full axon path: a validator-style `bt.Dendrite` query (sign, HTTP, guard, signature check,
  base64 + decode, the same engine call, reply), timed at the client.
It prints p50/p99 of both, and the median per-image difference (the cost of the axon path).

The engine is `--config` (default configs/cpu.yaml) when its trained heads exist; otherwise, and
with `--hazard-only`, a one-tier config with the weight-free hazard-cue tier, and it says so.

    .venv/bin/python scripts/bench_axon.py --images ../shared/data/gtsdb-dashcam-dev -n 200
"""

import argparse
import asyncio
import base64
import io
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HAZARD_ONLY = """
miner: {{netuid: 72}}
artifacts_dir: {artifacts}
tiers:
  - {{name: hazard_cues.handset, backend: hazard_cues, max_batch_size: 8}}
devices: {{cpu: {{memory_gib: 4}}}}
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cpu.yaml", help="root config (default configs/cpu.yaml)")
    p.add_argument("--hazard-only", action="store_true",
                   help="benchmark the weight-free hazard-cue tier alone, whatever the config")
    p.add_argument("--images", type=Path, default=None,
                   help="image folder to draw from (default: synthetic 640x480 street-like images)")
    p.add_argument("-n", type=int, default=200, help="number of queries (default 200)")
    p.add_argument("--warmup", type=int, default=5, help="untimed queries first (default 5)")
    p.add_argument("--quality", type=int, default=75, help="JPEG quality of the payload (default 75)")
    p.add_argument("--max-side", type=int, default=0,
                   help="downscale images so the long side is at most this (0 = as stored)")
    p.add_argument("--seed", type=int, default=0, help="image draw seed (default 0)")
    return p.parse_args(argv)


def load_images(args) -> list:
    from PIL import Image

    rng = np.random.default_rng(args.seed)
    images = []
    if args.images is not None:
        from natix_miner.toolkit.dataset import load_folder

        samples = load_folder(args.images)
        for i in rng.choice(len(samples), size=min(args.n, len(samples)), replace=False):
            images.append(samples[int(i)].load())
    else:
        for _ in range(min(args.n, 50)):
            arr = rng.integers(60, 200, (480, 640, 3), dtype=np.uint8)
            x, y = rng.integers(0, 560), rng.integers(240, 420)
            arr[y:y + 50, x:x + 30] = (255, 110, 0)
            images.append(Image.fromarray(arr))
    if args.max_side:
        for im in images:
            im.thumbnail((args.max_side, args.max_side))
    return images


def b64(im, quality: int) -> str:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode()


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values), q))


def main(argv=None) -> int:
    args = parse_args(argv)
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from bittensor.utils import networking

    networking.get_external_ip = lambda: "127.0.0.1"  # loopback benchmark: no public-IP lookup
    import bittensor as bt

    from natix_miner.decode import decode_image
    from natix_miner.neuron import (BackgroundMiner, Miner, NeuronOptions, find_missing_artifact,
                                    throwaway_wallet)
    from natix_miner.protocol import ImageSynapse
    from natix_miner.settings import load_settings, resolve_config_path

    tmp = tempfile.TemporaryDirectory(prefix="bench-axon-")
    validator = throwaway_wallet(Path(tmp.name), name="validator")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def start(config_path: Path):
        settings, cascade = load_settings(config_path)
        options = NeuronOptions(netuid=72, local=True, axon_port=port,
                                allow_hotkeys=(validator.hotkey.ss58_address,), rate_limit_per_minute=0)
        return BackgroundMiner(Miner(settings, cascade, options)).start(), settings

    label = str(args.config)
    runner = None
    if not args.hazard_only:
        try:
            runner, settings = start(resolve_config_path(args.config))
        except Exception as exc:  # noqa: BLE001
            missing = find_missing_artifact(exc)
            if missing is None:
                raise
            print(f"note: {missing.what} is missing; benchmarking the hazard-cue tier alone "
                  f"(train with: {missing.fix})")
    if runner is None:
        cfg = Path(tmp.name) / "hazard.yaml"
        cfg.write_text(HAZARD_ONLY.format(artifacts=Path(tmp.name) / "artifacts"))
        runner, settings = start(cfg)
        label = "hazard_cues only"
    miner = runner.miner
    images = load_images(args)
    payloads = [b64(im, args.quality) for im in images]
    decoded = [decode_image(p, settings.decode) for p in payloads]
    info = bt.AxonInfo(version=1, ip="127.0.0.1", port=port, ip_type=4, hotkey=miner.hotkey,
                       coldkey=miner.hotkey)

    async def timed_predict(image):
        t0 = time.perf_counter()
        res = await miner.engine.predict(image)
        return (time.perf_counter() - t0) * 1e3, res.prob

    def bare(i: int) -> float:
        fut = asyncio.run_coroutine_threadsafe(timed_predict(decoded[i % len(decoded)]), miner._loop)
        return fut.result()[0]

    async def drive():
        dendrite = bt.Dendrite(wallet=validator)
        axon_ms, bare_ms, decode_ms, bad = [], [], [], 0
        try:
            for i in range(args.warmup + args.n):
                j = i % len(payloads)
                b = await asyncio.to_thread(bare, j)
                t0 = time.perf_counter()
                resp = await dendrite(info, ImageSynapse(image=payloads[j]), timeout=9, deserialize=False)
                a = (time.perf_counter() - t0) * 1e3
                if i < args.warmup:
                    continue
                ok = resp.dendrite.status_code == 200 and 0.0 <= resp.prediction <= 1.0
                bad += not ok
                axon_ms.append(a)
                bare_ms.append(b)
                t1 = time.perf_counter()
                decode_image(payloads[j], settings.decode)
                decode_ms.append((time.perf_counter() - t1) * 1e3)
        finally:
            await dendrite.aclose_session()
        return axon_ms, bare_ms, decode_ms, bad

    try:
        axon_ms, bare_ms, decode_ms, bad = asyncio.run(drive())
    finally:
        runner.stop()
        tmp.cleanup()
    diff = np.asarray(axon_ms) - np.asarray(bare_ms)
    sizes = [len(p) for p in payloads]
    print(f"engine: {label}; {args.n} sequential queries over 127.0.0.1; "
          f"{len(images)} distinct images, median payload {np.median(sizes) / 1024:.0f} KiB base64")
    print(f"axon path (client round trip): p50 {pct(axon_ms, 50):.1f} ms  p99 {pct(axon_ms, 99):.1f} ms")
    print(f"bare engine.predict:           p50 {pct(bare_ms, 50):.1f} ms  p99 {pct(bare_ms, 99):.1f} ms")
    print(f"axon path cost over the bare call, per image: median {np.median(diff):.1f} ms "
          f"(of which decode median {np.median(decode_ms):.1f} ms); "
          f"ratio of medians {pct(axon_ms, 50) / max(pct(bare_ms, 50), 1e-9):.2f}x")
    print(f"invalid answers: {bad}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
