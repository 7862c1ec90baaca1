#!/usr/bin/env python
"""Does one slow or hung tier delay another tier on the same device? Bursts against two tiers.

Scenario "head-of-line" (issue 8.1): a fast tier (10 ms, uncertain, so every request escalates)
and a 4 s tier share one device; bursts of 6 concurrent requests, each with a 1.5 s budget, one
burst right after the other. Scenario "hung": the second tier never returns within the run;
50 concurrent requests with a 1.0 s budget, twice. For each burst the script prints how many
answers used the fast tier, the fallback share, the slowest answer against the budget and each
tier's breaker state after it. It uses only the engine's public API (config, `CascadeEngine`,
`Tier`), so the same file measures any revision of the engine.

Usage: .venv/bin/python scripts/bench_isolation.py [--bursts 3] [--slow-s 4] [--scenario all]
"""

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascade.calibration import CalibrationSet  # noqa: E402
from cascade.config import parse_cascade_config  # noqa: E402
from cascade.engine import CascadeEngine  # noqa: E402
from cascade.tier import Tier, TierOutput  # noqa: E402


class SleepTier(Tier):
    """Answers `prob` after `delay_s` (an interruptible wait: stop() ends it)."""

    Options = dict  # type: ignore[assignment]

    def __init__(self, spec) -> None:  # free-form options for this bench tier
        self.spec = spec
        self.options = spec.options
        self.device = spec.device
        self._stop = threading.Event()

    def load(self, device: str) -> None:
        self.prob = float(self.options["prob"])
        self.delay_s = float(self.options["delay_s"])

    def warmup(self) -> None:
        pass

    def predict(self, images):
        if self.delay_s:
            self._stop.wait(self.delay_s)
        return [TierOutput(self.prob) for _ in images]

    def close(self) -> None:
        self._stop.set()


def build(slow_s: float, deadline_ms: float) -> CascadeEngine:
    data = {"engine": {"deadline_ms": deadline_ms,
                       "breaker": {"failures_to_open": 3, "cooldown_s": 30}},
            "router": {"threshold": 0.5, "margin": 0.3},
            "tiers": [{"name": "fast.a", "backend": "bench", "device": "cpu", "max_batch_size": 8,
                       "expected_latency_ms": 10, "options": {"prob": 0.55, "delay_s": 0.01}},
                      {"name": "slow.b", "backend": "bench", "device": "cpu", "max_batch_size": 8,
                       "expected_latency_ms": 50, "options": {"prob": 0.9, "delay_s": slow_s}}],
            "devices": {"cpu": {"memory_gib": 8}}}
    cfg = parse_cascade_config(data, source="<bench>", base_dir=".")
    return CascadeEngine(cfg, SleepTier, calibration=CalibrationSet.identity())


async def burst(engine: CascadeEngine, n: int, budget_s: float) -> str:
    image = Image.new("RGB", (64, 48), (120, 110, 100))

    async def one():
        t0 = time.monotonic()
        res = await engine.predict(image, deadline_s=budget_s)
        return res, time.monotonic() - t0

    out = await asyncio.gather(*(one() for _ in range(n)))
    fast = sum("fast.a" in r.tier_probs for r, _ in out)
    fallback = sum(r.fallback for r, _ in out)
    slowest = max(s for _, s in out)
    health = engine.health()
    breakers = {name: t["breaker"] for name, t in health["tiers"].items()}
    hung = health.get("hung_tiers", "(not reported)")
    return (f"answers using fast.a {fast:>2}/{n}   fallback {100.0 * fallback / n:5.1f} %   "
            f"slowest {slowest:5.2f} s of {budget_s:.2f} s   breakers {breakers}   hung {hung}")


async def scenario(label: str, n: int, budget_s: float, slow_s: float, bursts: int) -> None:
    print(f"{label}: {bursts} bursts of {n} concurrent requests, budget {budget_s} s, "
          f"second tier takes {slow_s} s")
    engine = build(slow_s, budget_s * 1000.0)
    await engine.start()
    try:
        for i in range(bursts):
            print(f"  burst {i + 1}: {await burst(engine, n, budget_s)}", flush=True)
    finally:
        await engine.stop()


async def main(args: argparse.Namespace) -> None:
    if args.scenario in ("all", "head-of-line"):
        await scenario("head-of-line", 6, 1.5, args.slow_s, args.bursts)
    if args.scenario in ("all", "hung"):
        await scenario("hung", 50, 1.0, 60.0, 2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=("all", "head-of-line", "hung"), default="all",
                   help="which scenario to run (default: all)")
    p.add_argument("--bursts", type=int, default=3, help="bursts in the head-of-line scenario (default 3)")
    p.add_argument("--slow-s", type=float, default=4.0,
                   help="seconds the slow tier takes in the head-of-line scenario (default 4)")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
