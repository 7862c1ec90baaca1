#!/usr/bin/env python3
"""One-command check of the GPU path on a bare CUDA machine, with tiny models built from configs.

For a machine that has torch, transformers and accelerate but no internet, no vLLM, Ultralytics
or bittensor (the device machines this project is lent). It checks what a real GPU deployment
relies on and prints one table (and writes it as JSON):

1. every transformers backend (classifier, backbone + head, CLIP and SigLIP zero-shot, RT-DETR and
   D-FINE detectors, a LLaVA-layout VLM) loads on the device from a tiny checkpoint built from a
   config, warms up, and answers; per tier: peak memory measured with
   `torch.cuda.max_memory_allocated` (above what was allocated before it loaded) against what the
   placement planner books for it, and latency p50 / p99 at batch 1 and at its max batch;
2. the engine starts with every tier resident on cuda:0 and answers concurrent requests, each
   tier on its own worker thread with its own CUDA stream;
3. a two-device placement, simulated as two logical devices on the one card: the planner splits
   the tiers over `cuda:0` and `cuda:1` of half the card each, the engine loads them all on the
   physical card, and the measured memory per logical device is compared with its booking.

`--device cpu` runs the same steps on the CPU (memory columns blank): the dry mode that CI runs.
Exit status 0 when every tier answered and the engine served every request, 1 otherwise.

Examples:
  scripts/gpu_check.sh                              # cuda:0, table + runs/gpu_check.json
  scripts/gpu_check.sh --device cpu --repeats 3     # the CPU dry run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cascade.calibration import CalibrationSet  # noqa: E402
from cascade.config import TierSpec, parse_cascade_config  # noqa: E402
from cascade.placement import GIB, Placement, estimate_tier, plan_placement  # noqa: E402
from cascade.tier import TierOutput  # noqa: E402
from models.registry import build_tier  # noqa: E402

# (tier name, backend, tiny model, options, max batch)
TIERS = [
    ("vit.tiny", "hf_classifier", "classifier", {}, 16),
    ("dinov2.tiny_head", "hf_backbone_head", "dinov2", {}, 16),
    ("clip.tiny", "zero_shot", "clip", {}, 16),
    ("siglip.tiny", "zero_shot", "siglip", {"templates": ["a photo of {}."]}, 16),
    ("rtdetr.tiny", "hf_detector", "rtdetr", {"evidence": {"min_score": 0.0, "min_area_frac": 0.0}}, 8),
    ("dfine.tiny", "hf_detector", "dfine", {"evidence": {"min_score": 0.0, "min_area_frac": 0.0}}, 8),
    ("llava.tiny", "vlm_transformers", "vlm", {"max_image_side": 64}, 4),
]


@dataclass
class Row:
    name: str
    backend: str
    device: str
    ok: bool = False
    error: Optional[str] = None
    params: Optional[int] = None
    booked_mib: Optional[float] = None
    measured_mib: Optional[float] = None
    bs1_p50_ms: Optional[float] = None
    bs1_p99_ms: Optional[float] = None
    max_batch: int = 1
    max_p50_ms: Optional[float] = None
    max_p99_ms: Optional[float] = None
    logical_device: Optional[str] = None
    probs: list[float] = field(default_factory=list)


def frames(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        if i % 2 == 0:
            arr[200:320, 260:380] = (240, 110, 10)
        out.append(Image.fromarray(arr))
    return out


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def build_checkpoints(root: Path, models: Sequence[str]) -> dict[str, str]:
    import torch

    from tests.tiny_models import BUILDERS

    torch.manual_seed(0)
    return {name: BUILDERS[name](root / name) for name in models}


def tier_specs(ckpts: dict[str, str], device: str, artifacts: Path) -> list[TierSpec]:
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return [TierSpec(name=name, backend=backend, checkpoint=ckpts[model], device=device, dtype=dtype,
                     max_batch_size=batch, options=options, reserve_mib=64, expected_latency_ms=50,
                     artifacts_dir=str(artifacts), source="gpu_check")
            for name, backend, model, options, batch in TIERS if model in ckpts]


def train_heads(specs: Sequence[TierSpec], device: str) -> None:
    """What `natix-miner train` does for a backbone + head tier, on tiny random data."""
    for spec in specs:
        if spec.backend != "hf_backbone_head":
            continue
        tier = build_tier(spec)
        tier.load_backbone(device)
        ims = frames(8, seed=1)
        tier.fit_head(tier.embed(ims), [i % 2 for i in range(8)], seed=0)
        tier.save_head({"source": "gpu_check"})
        tier.close()


def check_tier(spec: TierSpec, repeats: int) -> tuple[Row, Any]:
    row = Row(spec.name, spec.backend, spec.device, max_batch=spec.max_batch_size)
    tier = None
    cuda = spec.device.startswith("cuda")
    try:
        tier = build_tier(spec)
        needs = tier.memory_needs()
        est = estimate_tier(spec, needs)
        row.params = needs.params
        row.booked_mib = est.booked_gib(None) * 1024
        if cuda:
            import torch

            _sync(spec.device)
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        tier.bind_worker(spec.device)
        tier.load(spec.device)
        tier.warmup()
        for label, n, runs in (("bs1", 1, repeats * 3), ("max", spec.max_batch_size, repeats)):
            ims = frames(n)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                outs = tier.predict(ims)
                _sync(spec.device)
                times.append((time.perf_counter() - t0) * 1000.0)
                bad = [o for o in outs if not isinstance(o, TierOutput) or not 0.0 <= o.prob <= 1.0]
                if len(outs) != n or bad:
                    raise RuntimeError(f"{len(bad)} of {n} outputs are not probabilities: {bad[:1]!r}")
            setattr(row, f"{label}_p50_ms", round(pct(times, 50), 2))
            setattr(row, f"{label}_p99_ms", round(pct(times, 99), 2))
            row.probs = [round(o.prob, 4) for o in outs]
        if cuda:
            import torch

            row.measured_mib = round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
        row.ok = True
    except Exception as exc:  # noqa: BLE001 - a check reports every tier, it does not stop
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return row, tier


async def check_engine(specs: Sequence[TierSpec], device: str, requests: int,
                       two_devices: bool, capacity_gib: float) -> dict[str, Any]:
    """Start the engine with every tier resident and serve `requests` concurrent requests."""
    from cascade.engine import CascadeEngine

    data = {"engine": {"deadline_ms": 30000}, "router": {"margin": 0.5, "min_tiers": len(specs)},
            "tiers": [{k: v for k, v in asdict(s).items()
                       if k not in ("source", "base_dir", "artifacts_dir")} for s in specs],
            "artifacts_dir": specs[0].artifacts_dir, "devices": {device: {"memory_gib": capacity_gib}}}
    cfg = parse_cascade_config(data, source="gpu_check", base_dir=".")
    placement = None
    logical: dict[str, str] = {}
    if two_devices:  # two logical devices on the one card: plan on them, load on the real device
        halves = {"cuda:0": {"memory_gib": capacity_gib}, "cuda:1": {"memory_gib": capacity_gib}}
        split = parse_cascade_config({**data, "tiers": [{**t, "device": "cuda"} for t in data["tiers"]],
                                      "devices": halves}, source="gpu_check", base_dir=".")
        needs = {s.name: build_tier(s).memory_needs() for s in split.active_tiers}
        plan = plan_placement(split.active_tiers, split.devices, needs=needs)
        logical = dict(plan.assignments)
        placement = Placement({n: device for n in logical}, plan.devices, plan.problems, plan.offenders,
                              plan.notes)
    engine = CascadeEngine(cfg, build_tier, placement=placement, calibration=CalibrationSet.identity())
    report: dict[str, Any] = {"ok": False, "two_devices": two_devices, "logical": logical}
    t0 = time.perf_counter()
    await engine.start()
    report["start_s"] = round(time.perf_counter() - t0, 2)
    try:
        streams = {}
        if device.startswith("cuda"):
            import torch

            for name, worker in engine._workers.items():
                streams[name] = await asyncio.wrap_future(
                    worker.submit(lambda: torch.cuda.current_stream().cuda_stream))
        report["streams_distinct"] = len(set(streams.values())) == len(streams) if streams else None
        ims = frames(8, seed=5)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(engine.predict(ims[i % 8]) for i in range(requests)))
        wall = time.perf_counter() - t0
        lat = [r.latency_ms for r in results]
        full = sum(1 for r in results if not r.fallback and len(r.tier_probs) == len(specs))
        report.update(requests=requests, full_cascade=full, p50_ms=round(pct(lat, 50), 1),
                      p99_ms=round(pct(lat, 99), 1), req_per_s=round(requests / wall, 1),
                      hung=engine.health()["hung_tiers"], ok=full == requests)
    finally:
        await engine.stop()
    return report


def table(rows: Sequence[Row], engines: Sequence[dict]) -> str:
    def f(x: Optional[float], w: int = 8, p: int = 1) -> str:
        return f"{x:>{w}.{p}f}" if x is not None else f"{'-':>{w}}"

    lines = [f"{'tier':18s} {'backend':17s} {'device':7s} {'params':>9s} {'booked MiB':>10s} "
             f"{'peak MiB':>9s} {'bs1 p50':>8s} {'bs1 p99':>8s} {'bs':>3s} {'max p50':>8s} "
             f"{'max p99':>8s}  result"]
    for r in rows:
        lines.append(f"{r.name:18s} {r.backend:17s} {r.device:7s} "
                     f"{(str(r.params) if r.params is not None else '-'):>9s} {f(r.booked_mib, 10)} "
                     f"{f(r.measured_mib, 9)} {f(r.bs1_p50_ms)} {f(r.bs1_p99_ms)} {r.max_batch:>3d} "
                     f"{f(r.max_p50_ms)} {f(r.max_p99_ms)}  {'ok' if r.ok else 'FAILED: ' + str(r.error)}")
    for e in engines:
        label = "engine, 2 logical devices" if e.get("two_devices") else "engine, all resident"
        if "error" in e:
            lines.append(f"{label}: FAILED: {e['error']}")
            continue
        lines.append(f"{label}: start {e['start_s']} s, {e['full_cascade']}/{e['requests']} answers "
                     f"from every tier, p50 {e['p50_ms']} ms, p99 {e['p99_ms']} ms, {e['req_per_s']} req/s, "
                     f"own CUDA stream per tier: {e.get('streams_distinct')}, hung: {e['hung']}")
        if e.get("logical"):
            lines.append(f"  placement: {e['logical']}")
        for dev, load in (e.get("per_logical") or {}).items():
            lines.append(f"  {dev}: booked {load['booked_mib']:.1f} MiB of {load['capacity_mib']:.1f} MiB, "
                         f"measured {load['measured_mib']:.1f} MiB")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Examples:")[1])
    p.add_argument("--device", default="cuda:0", help="cuda:0 (default) or cpu for the dry run")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed batches per tier at its max batch (3x as many at batch 1); default 10")
    p.add_argument("--requests", type=int, default=64, help="concurrent engine requests (default 64)")
    p.add_argument("--json", type=Path, default=ROOT / "runs" / "gpu_check.json",
                   help="where the table goes as JSON (default runs/gpu_check.json)")
    p.add_argument("--tiers", nargs="*", default=None, metavar="NAME",
                   help=f"only these tiny tiers (default: all of {[t[0] for t in TIERS]})")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the tiny checkpoints are built (default: a temporary directory)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1 or args.requests < 1:
        print("error: --repeats and --requests must be >= 1", file=sys.stderr)
        return 2
    device = args.device
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            print("error: torch sees no CUDA device (use --device cpu for the dry run)", file=sys.stderr)
            return 2
        capacity_gib = torch.cuda.get_device_properties(0).total_memory / GIB
        name = torch.cuda.get_device_name(0)
    else:
        capacity_gib, name = 16.0, "cpu"
    print(f"gpu check on {name} ({device}), torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        wanted = [t for t in TIERS if not args.tiers or t[0] in args.tiers]
        unknown = sorted(set(args.tiers or ()) - {t[0] for t in TIERS})
        if unknown:
            print(f"error: no tiny tier named {unknown}", file=sys.stderr)
            return 2
        ckpts = build_checkpoints(root / "ckpts", sorted({t[2] for t in wanted}))
        specs = [s for s in tier_specs(ckpts, device, root / "artifacts")
                 if s.name in {t[0] for t in wanted}]
        train_heads(specs, device)
        rows, loaded = [], []
        for spec in specs:
            row, tier = check_tier(spec, args.repeats)
            rows.append(row)
            if tier is not None:
                loaded.append(tier)
            print(f"  {spec.name}: {'ok' if row.ok else row.error}", flush=True)
        for tier in loaded:
            try:
                tier.close()
            except Exception:  # noqa: BLE001
                pass
        good = [s for s, r in zip(specs, rows) if r.ok]
        engines = []
        for two in (False, True):
            # the two logical devices are each sized to hold 60% of what the tiers book (plus
            # the runtime context), so the planner has to split the cascade over both
            booked_gib = sum(r.booked_mib or 0.0 for r in rows if r.ok) / 1024
            size = 0.5 + 0.6 * booked_gib if two else capacity_gib
            try:
                report = asyncio.run(check_engine(good, device, args.requests, two, size))
                if two:
                    report["per_logical"] = per_logical(report["logical"], rows, size)
                    for r in rows:
                        r.logical_device = report["logical"].get(r.name)
            except Exception as exc:  # noqa: BLE001
                report = {"ok": False, "two_devices": two, "error": f"{type(exc).__name__}: {exc}"}
            engines.append(report)
    text = table(rows, engines)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                     "tiers": [asdict(r) for r in rows], "engines": engines},
                                    indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    failed = [r.name for r in rows if not r.ok] + [("engine-2dev" if e["two_devices"] else "engine")
                                                   for e in engines if not e.get("ok")]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("gpu check passed")
    return 0


def per_logical(logical: dict[str, str], rows: Sequence[Row], capacity_gib: float) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in rows:
        dev = logical.get(r.name)
        if dev is None:
            continue
        load = out.setdefault(dev, {"booked_mib": 0.0, "measured_mib": 0.0, "capacity_mib": capacity_gib * 1024})
        load["booked_mib"] += r.booked_mib or 0.0
        load["measured_mib"] += r.measured_mib or 0.0
    return out


if __name__ == "__main__":
    sys.exit(main())
