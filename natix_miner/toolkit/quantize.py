"""int8 static quantisation of the EfficientNet-Lite tier, accepted only when it costs nothing.

Why a gate: int8 halves the tier's network time on a CPU, but it moves every feature a little
(cosine ~0.99 to the float32 features, single crops down to ~0.9), and the head was fitted on the
float32 ones. Whether that costs decisions depends on the data, so it is measured, not assumed:

1. activation ranges are calibrated on the crops the tier would see for train-split images
   (validator views of them, the same era mix as `eval`);
2. the val split is evaluated twice through the engine, as `natix-miner eval` does: float32 and
   the int8 candidate, everything else equal;
3. the candidate is accepted only when the tier's ROC AUC and the cascade's expected reward do
   not drop by more than the tolerances. Accepted: it becomes `onnx/features.int8.onnx` with a
   sidecar recording what was measured, which backbone export it came from and which head it was
   judged with (the tier serves it only while all of those still hold). Refused: nothing is
   kept, the previous model (if any) stays as it was, and the figures say why.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from loguru import logger

from natix_miner.toolkit.evaluation import (TierCache, _engine_outputs, default_cache_path,
                                            load_samples, validator_image)


@dataclass(frozen=True)
class Tolerance:
    """Largest drop (float32 minus int8) that still accepts the int8 model."""

    tier_auc: float = 0.01
    reward: float = 0.01


def _tier_spec(cfg: Any, name: Optional[str]) -> Any:
    specs = [s for s in cfg.active_tiers if s.backend == "efficientnet_lite"]
    if name is not None:
        specs = [s for s in specs if s.name == name]
    if not specs:
        raise ValueError(f"no enabled efficientnet_lite tier{' named ' + name if name else ''} in "
                         f"{cfg.source}")
    return specs[0]


def _with_options(cfg: Any, tier: str, **options: Any) -> Any:
    tiers = [dataclasses.replace(s, options={**s.options, **options}) if s.name == tier else s
             for s in cfg.tiers]
    return dataclasses.replace(cfg, tiers=tiers)


def calibration_batches(tier: Any, samples: Sequence[Any], era: str, seed: int) -> list[np.ndarray]:
    """One [1, 3, S, S] batch per crop (whole + tiles) of each sample's validator view."""
    batches: list[np.ndarray] = []
    for s in samples:
        im = validator_image(s, era, seed)[0]
        im = im if im.mode == "RGB" else im.convert("RGB")
        crops = [tier._to_array(im)] + [tier._to_array(im.crop(b)) for b in tier.tiles_for(im)]
        x = np.stack(crops).transpose(0, 3, 1, 2)
        batches.extend(np.ascontiguousarray(x[i:i + 1]) for i in range(len(x)))
    return batches


# Monte Carlo windows per expected-reward figure (`scoring.expected_reward`'s default).
REWARD_DRAWS = 2000


def _figures(out: Any, tier: str, seed: int) -> dict[str, Any]:
    """The figures the verdict needs (and per source, when the val set pools several)."""
    from natix_miner.toolkit.metrics import mcc, binarize, roc_auc
    from natix_miner.toolkit.scoring import expected_reward

    y = np.asarray(out.labels)
    casc = out.array("cascade")
    tier_p = np.asarray(out.calibrated[tier], dtype=np.float64)

    def auc(p: np.ndarray, yy: np.ndarray) -> Optional[float]:
        ok = np.isfinite(p)
        return float(roc_auc(yy[ok], p[ok])) if len(set(yy[ok].tolist())) == 2 else None

    def reward(p: np.ndarray, yy: np.ndarray) -> Optional[float]:
        return float(expected_reward(p, yy, seed=seed, draws=REWARD_DRAWS)) if len(set(yy.tolist())) == 2 else None

    sources = np.asarray(out.sources)
    by_source = {}
    if len(set(out.sources)) > 1:
        by_source = {s: {"auc": auc(casc[sources == s], y[sources == s]),
                         "reward": reward(casc[sources == s], y[sources == s]), "n": int(np.sum(sources == s))}
                     for s in sorted(set(out.sources))}
    return {"tier_auc": auc(tier_p, y), "cascade_auc": auc(casc, y), "reward": reward(casc, y),
            "cascade_mcc": float(mcc(y, binarize(casc))), "n": int(y.size), "by_source": by_source}


def verdict(fp32: dict[str, Any], int8: dict[str, Any], tol: Tolerance) -> tuple[bool, str]:
    """(accepted, why) from the two evaluations; an undefined figure refuses."""
    problems = []
    for key, limit in (("tier_auc", tol.tier_auc), ("reward", tol.reward)):
        a, b = fp32.get(key), int8.get(key)
        if a is None or b is None:
            problems.append(f"{key} undefined (one label only in the val split?)")
        elif a - b > limit:
            problems.append(f"{key} dropped {a:.4f} -> {b:.4f} (by {a - b:.4f} > {limit})")
    if problems:
        return False, "; ".join(problems)
    return True, (f"tier_auc {fp32['tier_auc']:.4f} -> {int8['tier_auc']:.4f}, reward "
                  f"{fp32['reward']:.4f} -> {int8['reward']:.4f} (tolerances {tol.tier_auc} / {tol.reward})")


async def run_quantize(config: Path, folders: Sequence[Path], *, tier_name: Optional[str] = None,
                       calibration_images: int = 48, era: str = "mixed", seed: int = 0,
                       limit: Optional[int] = None, tolerance: Tolerance = Tolerance(),
                       progress: bool = True) -> dict[str, Any]:
    """Quantise, measure, accept or refuse (see the module docstring); returns the summary."""
    from cascade.config import load_cascade_config
    from models import backbone_weights
    from models.efficientnet_lite import ONNX_INT8
    from models.onnx_runtime import quantize_int8, read_record, sidecar, write_record
    from models.registry import build_tier

    cfg = load_cascade_config(Path(config))
    spec = _tier_spec(cfg, tier_name)
    if spec.options.get("runtime", "onnxruntime") != "onnxruntime":
        raise ValueError(f"tier {spec.name}: int8 is an onnxruntime model; set options.runtime: onnxruntime")
    fp32_cfg = _with_options(cfg, spec.name, quantize=None)
    tier = build_tier(dataclasses.replace(spec, options={**spec.options, "quantize": None}))
    tier.load("cpu")
    if tier.describe()["runtime"]["runtime"] != "onnxruntime":
        raise RuntimeError(f"tier {spec.name}: the onnxruntime path is unavailable "
                           f"({tier.describe()['runtime'].get('why')})")
    fp32_path = Path(tier.describe()["runtime"]["fp32_model"])
    train = load_samples(folders, "train", calibration_images, seed)
    t0 = time.monotonic()
    batches = calibration_batches(tier, train, era, seed)
    target = tier.spec.artifact(ONNX_INT8)
    candidate = target.with_name("features.int8.candidate.onnx")
    quantize_int8(fp32_path, candidate, batches)
    quant_s = time.monotonic() - t0
    logger.info("int8 candidate from {} crops of {} train images in {:.0f} s", len(batches), len(train), quant_s)

    samples = load_samples(folders, "val", limit, seed)
    cache = TierCache(default_cache_path(cfg))
    head_sha = backbone_weights.sha256_file(tier.head_path())
    record = {"source_key": tier.export_key().as_dict(), "head_sha256": head_sha,
              "calibration": {"images": len(train), "crops": len(batches), "split": "train", "era": era,
                              "seed": seed, "folders": [str(f) for f in folders], "seconds": round(quant_s, 1)},
              "method": "onnxruntime quantize_static QDQ: weights int8 per channel, activations uint8 MinMax"}
    write_record(candidate, {**record, "accepted": False, "verdict": "candidate, being measured"})
    try:
        out32 = await _engine_outputs(fp32_cfg, samples, era, seed, with_cascade=True, cache=cache,
                                      batch_size=8, progress=progress)

        def int8_factory(s: Any) -> Any:
            t = build_tier(s)
            if s.name == spec.name:
                t.int8_candidate = candidate
            return t

        out8 = await _engine_outputs(_with_options(cfg, spec.name, quantize="int8"), samples, era, seed,
                                     with_cascade=True, cache=cache, batch_size=8, progress=progress,
                                     tier_factory=int8_factory)
        f32, f8 = _figures(out32, spec.name, seed), _figures(out8, spec.name, seed)
        p32, p8 = np.asarray(out32.raw[spec.name]), np.asarray(out8.raw[spec.name])
        ok, why = verdict(f32, f8, tolerance)
        summary = {**record, "accepted": ok, "verdict": why, "tolerance": dataclasses.asdict(tolerance),
                   "val": {"images": len(samples), "float32": f32, "int8": f8,
                           "tier_prob_max_abs_diff": float(np.nanmax(np.abs(p32 - p8))),
                           "tier_prob_mean_abs_diff": float(np.nanmean(np.abs(p32 - p8)))},
                   "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": str(target)}
        if ok:
            candidate.replace(target)
            write_record(target, summary)
        else:
            old = read_record(target)
            summary["kept"] = None if old is None else str(target)
    finally:
        for p in (candidate, sidecar(candidate)):
            if p.exists():
                p.unlink()
    return summary


def format_summary(s: dict[str, Any]) -> str:
    v = s["val"]
    f = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    lines = [f"int8 calibration: {s['calibration']['crops']} crops of {s['calibration']['images']} "
             f"train images ({s['calibration']['seconds']} s)",
             f"val: {v['images']} images           float32     int8",
             f"  tier ROC AUC             {f(v['float32']['tier_auc']):>8} {f(v['int8']['tier_auc']):>8}",
             f"  cascade ROC AUC          {f(v['float32']['cascade_auc']):>8} {f(v['int8']['cascade_auc']):>8}",
             f"  cascade expected reward  {f(v['float32']['reward']):>8} {f(v['int8']['reward']):>8}",
             f"  tier probability |float32 - int8|: max {v['tier_prob_max_abs_diff']:.4f}, "
             f"mean {v['tier_prob_mean_abs_diff']:.4f}"]
    for src in v["float32"]["by_source"]:
        a, b = v["float32"]["by_source"][src], v["int8"]["by_source"].get(src, {})
        lines.append(f"  {src}: cascade AUC {f(a['auc'])} -> {f(b.get('auc'))}, reward "
                     f"{f(a['reward'])} -> {f(b.get('reward'))} (n={a['n']})")
    if s["accepted"]:
        lines.append(f"ACCEPTED: {s['verdict']}\n  wrote {s['model']}; serve it with options.quantize: int8")
    else:
        lines.append(f"REFUSED: {s['verdict']}\n  nothing written" +
                     (f" ({s['kept']} left as it was)" if s.get("kept") else ""))
    return "\n".join(lines)
