#!/usr/bin/env python
"""The CPU fast path, measured interleaved in one run: every figure is a ratio within this run.

1. The EfficientNet-Lite tier per runtime: torch eager, ONNX Runtime float32 and int8, each with
   the crops batched and one at a time, on validator-style raw frames (whole image + 2x3 tiles)
   and on 224x224 images: median ms of the network alone and of the whole tier call (crops,
   resizing, network, head), ratio to the old path (eager, batched), achieved GFLOP/s (FLOPs of
   one forward counted by torch's FlopCounterMode).
2. The whole cascade, "before" (the settings of the code before issue 13: runtime torch, crops
   batched, every uncertain frame through OCR) against "after" (the config as it is), two
   engines in one process asked in alternating order, frame by frame: p50/p99 on raw frames and
   on 224 images, how often each tier ran, and whether the binarised answers agree.

The int8 model is the one `natix-miner quantize` accepted when there is one; otherwise one is
made here in a temporary folder from a few train-split frames, for its speed only (whether
int8 is good enough is the quantize command's job).

Usage: .venv/bin/python scripts/bench_cpu.py --data ../shared/data/gtsdb-dashcam-dev \
           [--config configs/cpu.yaml] [--frames 40] [--json runs/bench_cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cascade.config import parse_cascade_config, read_yaml, without_store  # noqa: E402

EFFNET = "efficientnet_lite"


def before_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The config as the code before issue 13 ran it: torch eager, crops batched, no skip."""
    data = copy.deepcopy(data)
    for t in data["tiers"]:
        if t.get("backend") == EFFNET:
            t.setdefault("options", {}).update({"runtime": "torch", "crop_schedule": "batched"})
            t["options"].pop("quantize", None)
    data.setdefault("router", {})["skip_if_decided"] = False
    return data


def parse(data: dict[str, Any], config: Path):
    return without_store(parse_cascade_config(data, source=str(config), base_dir=str(config.resolve().parent)))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def load_views(data_dir: Path, split: str, n: int, seed: int) -> tuple[list, list, list]:
    from natix_miner.toolkit.dataset import load_folder
    from natix_miner.toolkit.evaluation import limit_samples, validator_image

    samples = [s for s in load_folder(data_dir) if split == "all" or s.split == split]
    picked = limit_samples(samples, n, seed)
    raw = [validator_image(s, "raw", seed)[0] for s in picked]
    small = [validator_image(s, "augmented", seed)[0] for s in picked]
    train = [s for s in load_folder(data_dir) if s.split == "train"][:12]
    return raw, small, [s.load() for s in train]


def forward_flops(tier: Any) -> float:
    """FLOPs of one crop's forward (conv and matmul FLOPs, as torch counts them)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.efficientnet_lite import PooledFeatures

    s = tier.defaults.input_size
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        PooledFeatures(tier.model).eval()(torch.zeros(1, 3, s, s))
    return float(counter.get_total_flops())


def int8_session(tier: Any, train_frames: list, threads: int, tmp: Path) -> tuple[Any, str]:
    from models.efficientnet_lite import ONNX_INT8
    from models.onnx_runtime import OnnxFeatures, quantize_int8

    ok, why = tier.int8_status()
    if ok:
        return OnnxFeatures(tier.spec.artifact(ONNX_INT8), threads), "accepted model"
    fp32 = tier.export_onnx()[0]
    batches = []
    for im in train_frames:
        crops = [tier._to_array(im)] + [tier._to_array(im.crop(b)) for b in tier.tiles_for(im)]
        x = np.stack(crops).transpose(0, 3, 1, 2)
        batches.extend(x[i:i + 1] for i in range(len(x)))
    quantize_int8(fp32, tmp / "int8.onnx", batches)
    return OnnxFeatures(tmp / "int8.onnx", threads), f"made here from {len(train_frames)} train frames ({why})"


def bench_tier(tier: Any, variants: dict[str, tuple[Any, str]], images: list, rounds: int) -> dict[str, Any]:
    """Interleaved medians per variant: network alone and whole tier call, per image."""
    crops_of = []
    for im in images:
        crops = [tier._to_array(im)] + [tier._to_array(im.crop(b)) for b in tier.tiles_for(im)]
        crops_of.append(np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2)))
    net: dict[str, list[float]] = {k: [] for k in variants}
    call: dict[str, list[float]] = {k: [] for k in variants}
    prep: list[float] = []
    names = list(variants)
    saved = (tier._onnx, tier._schedule)
    try:
        for r in range(rounds):
            for i, (im, x) in enumerate(zip(images, crops_of)):
                order = names[(i + r) % len(names):] + names[:(i + r) % len(names)]
                t0 = time.perf_counter()
                [tier._to_array(im)] + [tier._to_array(im.crop(b)) for b in tier.tiles_for(im)]
                prep.append((time.perf_counter() - t0) * 1000.0)
                for name in order:
                    session, schedule = variants[name]
                    tier._onnx, tier._schedule = session, schedule
                    step = 1 if schedule == "sequential" else tier.options.batch_size
                    t0 = time.perf_counter()
                    tier._run_schedule(x, step)
                    t1 = time.perf_counter()
                    tier.predict([im])
                    t2 = time.perf_counter()
                    net[name].append((t1 - t0) * 1000.0)
                    call[name].append((t2 - t1) * 1000.0)
    finally:
        tier._onnx, tier._schedule = saved
    whole: list[float] = []  # the same images without tiles: resize + one forward (fp32 / the tier's session)
    if saved[0] is not None:
        for im in images:
            t0 = time.perf_counter()
            saved[0](tier._to_array(im).transpose(2, 0, 1)[None])
            whole.append((time.perf_counter() - t0) * 1000.0)
    crops = float(np.mean([len(x) for x in crops_of]))
    return {"crops_per_image": crops, "preprocess_ms": float(np.median(prep)),
            "whole_image_only_ms": float(np.median(whole)) if whole else None,
            "network_ms": {k: float(np.median(v)) for k, v in net.items()},
            "tier_ms": {k: float(np.median(v)) for k, v in call.items()}}


async def bench_cascade(configs: dict[str, Any], images: list, label: str) -> dict[str, Any]:
    from cascade.engine import CascadeEngine
    from models.registry import build_tier

    engines = {name: CascadeEngine(cfg, build_tier) for name, cfg in configs.items()}
    for eng in engines.values():  # one at a time: each measures its crop schedule at warm-up
        await eng.start()
    lat: dict[str, list[float]] = {k: [] for k in engines}
    ran: dict[str, dict[str, int]] = {k: {} for k in engines}
    answers: dict[str, list[float]] = {k: [] for k in engines}
    names = list(engines)
    try:
        for name in names:  # one untimed request each
            await engines[name].predict(images[0])
        for i, im in enumerate(images):
            for name in (names if i % 2 == 0 else names[::-1]):
                res = await engines[name].predict(im)
                lat[name].append(res.latency_ms)
                answers[name].append(res.prob)
                for tier in res.raw_probs:
                    ran[name][tier] = ran[name].get(tier, 0) + 1
        described = {name: {n: r.tier.describe().get("runtime") for n, r in
                            ((r.name, r) for r in eng._runners) if r.spec.backend == EFFNET}
                     for name, eng in engines.items()}
    finally:
        for eng in engines.values():
            await eng.stop()
    out: dict[str, Any] = {"images": label, "n": len(images)}
    for name in names:
        out[name] = {"p50_ms": pct(lat[name], 50), "p99_ms": pct(lat[name], 99),
                     "mean_ms": float(np.mean(lat[name])),
                     "tier_ran": {t: c / len(images) for t, c in sorted(ran[name].items())},
                     "effnet_runtime": described[name]}
    a, b = (np.asarray(answers[n]) for n in names[:2])
    out["same_binarised_answer"] = float(np.mean(np.round(a) == np.round(b)))
    out["max_abs_prob_diff"] = float(np.max(np.abs(a - b)))
    return out


def fmt_table(title: str, rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title] + ["  " + "  ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                        for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True,
                    help="labelled image folder (manifest.csv); its frames are the benchmark's input")
    ap.add_argument("--config", type=Path, default=Path("configs/cpu.yaml"),
                    help="the 'after' config (default configs/cpu.yaml); 'before' is derived from it")
    ap.add_argument("--split", default="val", help="split the frames come from (default val)")
    ap.add_argument("--frames", type=int, default=40, help="frames (and 224 images) per measurement (default 40)")
    ap.add_argument("--tier-rounds", type=int, default=1,
                    help="passes over the frames for the tier figures (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="frame subset and validator views (default 0)")
    ap.add_argument("--skip-cascade", action="store_true", help="tier figures only")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = ap.parse_args(argv)

    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from models.registry import build_tier

    data = read_yaml(args.config)
    after_cfg = parse(data, args.config)
    before_cfg = parse(before_settings(data), args.config)
    raw, small, train = load_views(args.data, args.split, args.frames, args.seed)
    report: dict[str, Any] = {"config": str(args.config), "data": str(args.data), "frames": len(raw)}

    spec = next(s for s in after_cfg.active_tiers if s.backend == EFFNET)
    tier = build_tier(spec)
    tier.load("cpu")
    if tier.options.threads > 0:  # eager as the torch runtime serves it (what the old path set)
        import torch

        torch.set_num_threads(tier.options.threads)
    if tier._onnx is None:
        print(f"onnxruntime unavailable: {tier.describe()['runtime']}")
        return 1
    flops = forward_flops(tier)
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        int8, int8_from = int8_session(tier, train, tier.options.threads, Path(tmp))
        fp32 = tier._onnx
        variants = {"eager batched": (None, "batched"), "eager sequential": (None, "sequential"),
                    "onnx fp32 batched": (fp32, "batched"), "onnx fp32 sequential": (fp32, "sequential"),
                    "onnx int8 batched": (int8, "batched"), "onnx int8 sequential": (int8, "sequential")}
        tiers = {"raw frames": bench_tier(tier, variants, raw, args.tier_rounds),
                 "224 images": bench_tier(tier, {k: v for k, v in variants.items() if "sequential" in k},
                                          small, args.tier_rounds)}
    report.update({"gflop_per_crop": flops / 1e9, "int8_model": int8_from, "threads": tier.options.threads,
                   "tier": tiers})
    print(f"EfficientNet-Lite tier ({spec.name}), {tier.options.threads} thread(s), "
          f"{flops / 1e9:.2f} GFLOP per {tier.defaults.input_size} px crop; int8: {int8_from}")
    for label, t in tiers.items():
        base_net = t["network_ms"].get("eager batched", t["network_ms"]["eager sequential"])
        base_call = t["tier_ms"].get("eager batched", t["tier_ms"]["eager sequential"])
        rows = [("variant", "network ms", "speed-up", "GFLOP/s", "tier call ms", "speed-up")]
        for k in t["network_ms"]:
            n, c = t["network_ms"][k], t["tier_ms"][k]
            rows.append((k, f"{n:.1f}", f"{base_net / n:.2f}x", f"{flops * t['crops_per_image'] / n / 1e6:.1f}",
                         f"{c:.1f}", f"{base_call / c:.2f}x"))
        print(fmt_table(f"\n{label}: {t['crops_per_image']:.0f} crops per image, preprocessing "
                        f"{t['preprocess_ms']:.1f} ms (in the tier call)", rows))
        if t["whole_image_only_ms"] is not None:
            print(f"  whole image only (tiles off), onnx fp32: {t['whole_image_only_ms']:.1f} ms (resize + network)")

    if not args.skip_cascade:
        casc = {}
        for label, images in (("raw frames", raw), ("224 images", small)):
            casc[label] = asyncio.run(bench_cascade({"before": before_cfg, "after": after_cfg}, images, label))
        report["cascade"] = casc
        print("\nCascade, before (torch eager, crops batched, no decided-skip) vs after (the config), "
              "interleaved per image")
        rows = [("images", "before p50", "p99", "after p50", "p99", "p50 speed-up", "p99 speed-up",
                 "same answer")]
        for label, c in casc.items():
            b, a = c["before"], c["after"]
            rows.append((label, f"{b['p50_ms']:.0f}", f"{b['p99_ms']:.0f}", f"{a['p50_ms']:.0f}",
                         f"{a['p99_ms']:.0f}", f"{b['p50_ms'] / a['p50_ms']:.2f}x",
                         f"{b['p99_ms'] / a['p99_ms']:.2f}x", f"{c['same_binarised_answer']:.3f}"))
        print(fmt_table("", rows))
        for label, c in casc.items():
            for name in ("before", "after"):
                ran = ", ".join(f"{t} {f:.0%}" for t, f in c[name]["tier_ran"].items())
                print(f"  {label} {name}: tiers ran: {ran}")
            print(f"  {label}: max |prob before - after| {c['max_abs_prob_diff']:.4f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
