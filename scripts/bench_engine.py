#!/usr/bin/env python
"""Benchmark the cascade engine's scheduling, measured side by side in one run on this machine.

Three figures:
1. throughput at N concurrent clients with micro-batching versus batch size 1 (ratio), on a tier
   modelled as a GPU call: a fixed per-call overhead plus a small per-image cost. `--workload
   sleep` models it with time.sleep (releases the GIL, as a CUDA sync does); `--workload matmul`
   burns real CPU with numpy matmuls of the same shape of cost;
2. p50/p99 latency of a cascade whose second tier is deliberately slower than the deadline
   (its breaker disabled so every request is cut by the deadline), against that deadline;
3. the engine's overhead over calling the fast tier's `predict` directly (ratio and ms).

Usage: .venv/bin/python scripts/bench_engine.py [--requests 320] [--concurrency 16] ...
"""

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascade.calibration import CalibrationSet  # noqa: E402
from cascade.config import parse_cascade_config  # noqa: E402
from cascade.engine import CascadeEngine  # noqa: E402
from cascade.tier import Tier, TierOutput  # noqa: E402


class ModelledTier(Tier):
    """Cost per call = overhead_ms + per_image_ms x batch; prob fixed by the bench."""

    def load(self, device: str) -> None:
        o = self.spec.options
        self.prob = float(o.get("prob", 0.5))
        self.overhead_s = float(o.get("overhead_ms", 20.0)) / 1000.0
        self.per_image_s = float(o.get("per_image_ms", 1.0)) / 1000.0
        self.workload = o.get("workload", "sleep")
        self.stall_every = int(o.get("stall_every", 0))  # every Nth call stalls for stall_ms
        self.stall_s = float(o.get("stall_ms", 0.0)) / 1000.0
        self.calls = 0
        if self.workload == "matmul":
            self._a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
            t0 = time.perf_counter()
            for _ in range(5):
                self._a @ self._a
            self._mm_s = (time.perf_counter() - t0) / 5

    def _burn(self, seconds: float) -> None:
        if self.workload == "sleep":
            time.sleep(seconds)
        else:
            for _ in range(max(1, round(seconds / self._mm_s))):
                self._a @ self._a

    def warmup(self) -> None:
        pass

    def predict(self, images):
        self.calls += 1
        if self.stall_every and self.calls % self.stall_every == 0:
            time.sleep(self.stall_s)
        self._burn(self.overhead_s + self.per_image_s * len(images))
        return [TierOutput(self.prob) for _ in images]

    # options are free-form for this bench tier
    Options = dict  # type: ignore[assignment]

    def __init__(self, spec) -> None:  # skip Options validation of the base class
        self.spec = spec
        self.options = spec.options
        self.device = spec.device


def config(tiers: list[dict], deadline_ms: float, failures_to_open: int = 3):
    data = {"engine": {"deadline_ms": deadline_ms,
                       "breaker": {"failures_to_open": failures_to_open, "cooldown_s": 30},
                       "store": {"enabled": False}},
            "router": {"threshold": 0.5, "margin": 0.3},
            "tiers": [{"backend": "bench", "device": "cpu", **t} for t in tiers],
            "devices": {"cpu": {"memory_gib": 8}}}
    return parse_cascade_config(data, source="<bench>", base_dir=".")


def engine_for(cfg) -> CascadeEngine:
    return CascadeEngine(cfg, ModelledTier, calibration=CalibrationSet.identity())


async def closed_loop(engine: CascadeEngine, image: Image.Image, requests: int, concurrency: int,
                      deadline_s: float | None = None) -> tuple[float, list[float], list]:
    """`concurrency` clients issue requests back to back until `requests` answered."""
    latencies: list[float] = []
    results: list = []
    left = [requests]

    async def client() -> None:
        while left[0] > 0:
            left[0] -= 1
            t0 = time.perf_counter()
            res = await engine.predict(image, deadline_s)
            latencies.append((time.perf_counter() - t0) * 1000)
            results.append(res)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies, results


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


async def bench_batching(args, image) -> None:
    tier = {"name": "modelled.gpu", "expected_latency_ms": 50,
            "options": {"prob": 0.95, "overhead_ms": args.overhead_ms, "per_image_ms": args.per_image_ms,
                        "workload": args.workload}}
    rates = {}
    for label, batch, wait in (("micro-batched", args.concurrency, args.max_wait_ms), ("batch size 1", 1, 0.0)):
        eng = engine_for(config([{**tier, "max_batch_size": batch, "max_wait_ms": wait}], 8000))
        async with eng:
            await closed_loop(eng, image, args.concurrency, args.concurrency)  # warm the path
            elapsed, lat, _ = await closed_loop(eng, image, args.requests, args.concurrency)
            calls = eng.tiers["modelled.gpu"].calls
        rates[label] = args.requests / elapsed
        print(f"  {label:<14} max_batch={batch:<3} {rates[label]:8.1f} req/s   p50 {pct(lat, 50):7.1f} ms"
              f"   p99 {pct(lat, 99):7.1f} ms   tier calls {calls}")
    print(f"  throughput ratio (micro-batched / batch size 1): {rates['micro-batched'] / rates['batch size 1']:.2f}x")


async def bench_deadline(args, image) -> None:
    deadline_s = args.deadline_ms / 1000.0
    fast = {"name": "fast.uncertain", "expected_latency_ms": 5, "max_batch_size": 8,
            "options": {"prob": 0.5, "overhead_ms": 5, "per_image_ms": 0.5, "workload": "sleep"}}
    scenarios = {
        "always slow (router learns its model time and stops asking it)":
            {"overhead_ms": args.deadline_ms * 2, "per_image_ms": 0},
        "stalls every 3rd call (only the deadline can cut it)":
            {"overhead_ms": 20, "per_image_ms": 1, "stall_every": 3, "stall_ms": args.deadline_ms * 2},
    }
    print(f"  deadline {args.deadline_ms:.0f} ms; the fast tier is uncertain so every request escalates; "
          f"slow calls take {args.deadline_ms * 2:.0f} ms; {args.deadline_requests} requests at concurrency 4; "
          f"breaker disabled")
    for label, opts in scenarios.items():
        slow = {"name": "slow.overrun", "expected_latency_ms": 30, "max_batch_size": 8,
                "options": {"prob": 0.9, "workload": "sleep", **opts}}
        eng = engine_for(config([fast, slow], args.deadline_ms, failures_to_open=10 ** 9))
        async with eng:
            _, lat, results = await closed_loop(eng, image, args.deadline_requests, 4, deadline_s)
        cut = sum(r.deadline_hit for r in results)
        valid = all(0.0 <= r.prob <= 1.0 and not r.fallback for r in results)
        print(f"  {label}:")
        print(f"    p50 {pct(lat, 50):7.1f} ms   p99 {pct(lat, 99):7.1f} ms   max {max(lat):7.1f} ms   "
              f"p99/deadline {pct(lat, 99) / args.deadline_ms:.3f}   cut by deadline {cut}/{len(results)}   "
              f"all answers fused & valid: {valid}")


async def bench_overhead(args, image) -> None:
    tier = {"name": "fast.direct", "expected_latency_ms": 5, "max_batch_size": 8,
            "options": {"prob": 0.95, "overhead_ms": args.fast_ms, "per_image_ms": 0, "workload": args.workload}}
    eng = engine_for(config([tier], 8000))
    async with eng:
        t = eng.tiers["fast.direct"]
        for _ in range(5):
            t.predict([image])
            await eng.predict(image)
        direct, engine = [], []
        for _ in range(args.overhead_requests):
            t0 = time.perf_counter()
            t.predict([image])
            direct.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            await eng.predict(image)
            engine.append((time.perf_counter() - t0) * 1000)
    d, e = statistics.median(direct), statistics.median(engine)
    print(f"  fast tier {args.fast_ms:.1f} ms ({args.workload}), image {image.size[0]}x{image.size[1]}, "
          f"{args.overhead_requests} sequential requests")
    print(f"  direct tier.predict median {d:7.2f} ms   engine.predict median {e:7.2f} ms   "
          f"overhead {e - d:6.2f} ms   ratio {e / d:.2f}x")


async def main(args) -> None:
    image = Image.new("RGB", (args.image_side, args.image_side * 3 // 4), (120, 110, 100))
    print(f"workload: {args.workload} ("
          + ("time.sleep models a GPU call: fixed overhead + per-image cost, GIL released"
             if args.workload == "sleep" else "numpy matmuls burn real CPU for the modelled cost") + ")")
    print(f"1) throughput at {args.concurrency} concurrent clients, per-call overhead "
          f"{args.overhead_ms} ms + {args.per_image_ms} ms/image")
    await bench_batching(args, image)
    print("2) latency against the deadline with a deliberately slow tier")
    await bench_deadline(args, image)
    print("3) engine overhead over the fast tier called directly")
    await bench_overhead(args, image)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("sleep", "matmul"), default="sleep",
                   help="how the modelled tier spends its time: sleep (a GPU call: GIL released) or "
                        "matmul (real numpy CPU work); default sleep")
    p.add_argument("--requests", type=int, default=320, help="requests per throughput run (default 320)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent clients in the throughput runs (default 16)")
    p.add_argument("--overhead-ms", type=float, default=20.0, help="modelled fixed cost per tier call in ms (default 20)")
    p.add_argument("--per-image-ms", type=float, default=1.0, help="modelled cost per image in a batch in ms (default 1)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="micro-batcher max_wait_ms in the batched run (default 2)")
    p.add_argument("--deadline-ms", type=float, default=500.0, help="request deadline in the slow-tier run (default 500)")
    p.add_argument("--deadline-requests", type=int, default=60, help="requests in the slow-tier run (default 60)")
    p.add_argument("--fast-ms", type=float, default=2.0, help="cost of the fast tier in the overhead run in ms (default 2)")
    p.add_argument("--overhead-requests", type=int, default=200, help="sequential requests in the overhead run (default 200)")
    p.add_argument("--image-side", type=int, default=640, help="width of the synthetic test image in px (default 640)")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
