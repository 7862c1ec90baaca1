#!/usr/bin/env python3
"""Load every enabled tier of a config on its device, run a batch, print latency and memory.

The check to run once on a new GPU machine (after `natix-miner models pull` and training): does
each tier load, warm up and answer a full batch, how long does a batch take, and does the memory
it really takes match what the config declares to the placement planner (params x dtype bytes +
reserve_mib)? Tiers are loaded one after another and stay loaded, as in serving, so the last
line also shows whether the whole cascade fits together.

Memory per tier: `torch peak` is the peak torch allocation during load + batch minus what was
allocated before (this process only); `device delta` is the drop of free device memory
(cudaMemGetInfo), which also sees allocations of other processes such as vLLM's engine core.
On cpu both are blank. Exit status 0 when every tier answered, 1 otherwise.

Examples:
  scripts/gpu_smoke.sh configs/gpu-1x.yaml
  .venv/bin/python scripts/gpu_smoke.py --config configs/h100x2.yaml --batch 16 --repeats 5
  .venv/bin/python scripts/gpu_smoke.py --config configs/gpu-1x.yaml --tiers vit_b16.natix_roadwork --device cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cascade.config import TierSpec, load_cascade_config  # noqa: E402
from cascade.placement import estimate_tier, plan_placement  # noqa: E402
from cascade.tier import TierOutput  # noqa: E402
from models.registry import build_tier  # noqa: E402

GIB = 1024 ** 3


@dataclass
class TierReport:
    name: str
    backend: str
    device: str
    declared_gib: float
    ok: bool = False
    error: Optional[str] = None
    load_s: float = float("nan")
    warmup_s: float = float("nan")
    batch: int = 0
    batch_ms: list[float] = field(default_factory=list)
    torch_peak_gib: Optional[float] = None
    device_delta_gib: Optional[float] = None
    probs: list[float] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.batch_ms) if self.batch_ms else float("nan")

    def row(self) -> str:
        def gib(x: Optional[float]) -> str:
            return f"{x:7.2f}G" if x is not None else "       -"

        if not self.ok:
            return f"{self.name:38s} {self.backend:17s} {self.device:7s} FAILED: {self.error}"
        per_img = self.p50_ms / max(1, self.batch)
        prob = f"{min(self.probs):.3f}-{max(self.probs):.3f}" if self.probs else "-"
        return (f"{self.name:38s} {self.backend:17s} {self.device:7s} {self.load_s:6.1f}s "
                f"{self.warmup_s:6.2f}s {self.batch:3d} {self.p50_ms:8.1f} {per_img:7.1f} "
                f"{gib(self.declared_gib)} {gib(self.torch_peak_gib)} {gib(self.device_delta_gib)}  {prob}")


HEADER = (f"{'tier':38s} {'backend':17s} {'device':7s} {'load':>7s} {'warmup':>7s} {'bs':>3s} "
          f"{'p50 ms':>8s} {'ms/img':>7s} {'declared':>8s} {'torch pk':>8s} {'dev delta':>8s}  probs")


def synthetic_images(n: int, seed: int = 0) -> list[Image.Image]:
    """Dashcam-sized noise frames with an orange block (the shape of a real request)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(0, 255, (800, 1360, 3), dtype=np.uint8)
        if i % 2 == 0:
            arr[500:640, 600:700] = (240, 110, 10)
        out.append(Image.fromarray(arr))
    return out


def folder_images(folder: Path, n: int) -> list[Image.Image]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"error: no .jpg/.png images under {folder}")
    return [Image.open(files[i % len(files)]).convert("RGB") for i in range(n)]


def _cuda_state(device: str) -> tuple[Optional[int], Optional[int]]:
    """(torch allocated bytes, free device bytes) on a cuda device, (None, None) elsewhere."""
    if not device.startswith("cuda"):
        return None, None
    import torch

    idx = torch.device(device).index or 0
    torch.cuda.synchronize(idx)
    free, _ = torch.cuda.mem_get_info(idx)
    return torch.cuda.memory_allocated(idx), free


def smoke_tier(spec: TierSpec, images: Sequence[Image.Image], repeats: int) -> tuple[TierReport, Any]:
    est = estimate_tier(spec)
    report = TierReport(spec.name, spec.backend, spec.device, est.total_gib, batch=len(images))
    tier = None
    try:
        alloc0, free0 = _cuda_state(spec.device)
        if alloc0 is not None:
            import torch

            torch.cuda.reset_peak_memory_stats(torch.device(spec.device).index or 0)
        tier = build_tier(spec)
        t0 = time.perf_counter()
        tier.load(spec.device)
        report.load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        tier.warmup()
        report.warmup_s = time.perf_counter() - t0
        for _ in range(repeats):
            t0 = time.perf_counter()
            outs = tier.predict(list(images))
            if spec.device.startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            report.batch_ms.append((time.perf_counter() - t0) * 1000.0)
            errors = [o for o in outs if not isinstance(o, TierOutput)]
            if len(outs) != len(images) or errors:
                raise RuntimeError(f"{len(errors)} of {len(images)} items failed: {errors[:1]!r}")
            report.probs = [o.prob for o in outs]
        if not all(0.0 <= p <= 1.0 for p in report.probs):
            raise RuntimeError(f"probability outside [0, 1]: {report.probs}")
        alloc1, free1 = _cuda_state(spec.device)
        if alloc0 is not None:
            import torch

            peak = torch.cuda.max_memory_allocated(torch.device(spec.device).index or 0)
            report.torch_peak_gib = (peak - alloc0) / GIB
            report.device_delta_gib = (free0 - free1) / GIB
        report.ok = True
    except Exception as exc:  # noqa: BLE001 - a smoke test reports, it does not stop at the first
        report.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    return report, tier


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu_smoke.py",
        description="Load every enabled tier of a cascade config on its device (as placed by the "
                    "planner), warm it up, time a batch and compare real memory with the declared "
                    "params x dtype + reserve. Exit 1 if any tier fails.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Examples:")[1])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "gpu-1x.yaml",
                   help="cascade YAML (default: configs/gpu-1x.yaml)")
    p.add_argument("--tiers", nargs="*", default=None, metavar="NAME",
                   help="only these tier names (default: every enabled tier; disabled tiers may be named)")
    p.add_argument("--device", default=None,
                   help="load every tier on this device instead of the planned one (e.g. cpu to check a "
                        "config's CPU-capable tiers on a machine without a GPU)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per batch (default: each tier's max_batch_size)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed batches per tier after warm-up; the median is printed (default: 3)")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of real .jpg/.png images to use (default: synthetic 1360x800 frames)")
    p.add_argument("--json", type=Path, default=None, help="also write the reports to this JSON file")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or (args.batch is not None and args.batch < 1):
        print("error: --repeats and --batch must be >= 1", file=sys.stderr)
        return 2
    cfg = load_cascade_config(args.config)
    by_name = {t.name: t for t in cfg.tiers}
    if args.tiers:
        unknown = sorted(set(args.tiers) - set(by_name))
        if unknown:
            print(f"error: no tier named {unknown}; tiers are {sorted(by_name)}", file=sys.stderr)
            return 2
        specs = [by_name[n] for n in args.tiers]
    else:
        specs = cfg.active_tiers
    if args.device:
        specs = [replace(s, device=args.device) for s in specs]
    else:
        placement = plan_placement(specs, cfg.devices)
        if not placement.fits:
            print("warning: the planner says these tiers do not fit: " + "; ".join(placement.problems),
                  file=sys.stderr)
        specs = [replace(s, device=placement.assignments.get(s.name, s.device)) for s in specs]
    print(f"gpu smoke of {args.config} ({len(specs)} tiers)")
    print(HEADER)
    reports, loaded = [], []
    for spec in specs:
        n = args.batch or spec.max_batch_size
        ims = folder_images(args.images, n) if args.images else synthetic_images(n)
        report, tier = smoke_tier(spec, ims, args.repeats)
        reports.append(report)
        if tier is not None:
            loaded.append(tier)
        print(report.row(), flush=True)
    _print_totals(specs)
    for tier in loaded:
        try:
            tier.close()
        except Exception:  # noqa: BLE001
            pass
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in reports], indent=2, default=str) + "\n",
                             encoding="utf-8")
    failed = [r.name for r in reports if not r.ok]
    if failed:
        print(f"FAILED tiers: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("all tiers answered")
    return 0


def _print_totals(specs: Sequence[TierSpec]) -> None:
    devices = sorted({s.device for s in specs if s.device.startswith("cuda")})
    if not devices:
        return
    import torch

    for dev in devices:
        idx = torch.device(dev).index or 0
        free, total = torch.cuda.mem_get_info(idx)
        print(f"{dev}: {(total - free) / GIB:.2f} GiB of {total / GIB:.2f} GiB in use with all tiers loaded")


if __name__ == "__main__":
    sys.exit(main())
