#!/usr/bin/env python
"""Measure the cue tiers (OCR signs, hazard colours) on labelled image folders.

For each tier and folder: ROC AUC, MCC and accuracy at 0.5 (the validator's rounding), per-source
figures, and per-image latency (predict of one image, decoding excluded) as wall time and as
process CPU time (all threads; the honest figure on a shared, busy machine). With `--fit`, the tier's
head is also fitted on the training split's feature vectors (the same `fit_head` that
`natix-miner train` uses, without augmentation) and scored on the evaluation split; for the hazard
tier the fitted coefficients are printed on the cue scale, ready for `options.coefficients`.

Feature vectors and probabilities are cached per tier, folder, split, options and backend source
under `--cache`, so a second run (e.g. with `--fit`) does not re-run OCR.

Example:
  .venv/bin/python scripts/eval_cues.py --data /path/to/gtsdb-dashcam-dev --split all \\
      --tier hazard_cues.handset --tier ocr_ppocrv4.sign_phrases --fit --out runs/cues.json
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CUE_BACKENDS = ("hazard_cues", "ocr_signs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, action="append", required=True, metavar="DIR",
                   help="labelled image folder (manifest.csv with path,label[,source,split], or "
                        "roadwork/ + no_roadwork/); repeat for several folders, each reported apart")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "cpu.yaml",
                   help="root YAML config that defines the tiers (default: configs/cpu.yaml)")
    p.add_argument("--tier", action="append", metavar="NAME",
                   help="tier name from the config to measure; repeat for several (default: every "
                        "tier whose backend is hazard_cues or ocr_signs)")
    p.add_argument("--split", default="val",
                   help="split to evaluate: train, val or all (default: val)")
    p.add_argument("--fit", action="store_true",
                   help="also fit the tier's head on the 'train' split and score it on --split "
                        "(with --split all the figures are in-sample and say so)")
    p.add_argument("--save-head", action="store_true",
                   help="with --fit: write the fitted head to the tier's head.pt (artifacts_dir)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="at most N images per folder and split (label-stratified, seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of --limit sampling and fitting (default: 0)")
    p.add_argument("--cache", type=Path, default=ROOT / "runs" / "eval_cues_cache", metavar="DIR",
                   help="where features/probabilities are cached (default: runs/eval_cues_cache); "
                        "'none' disables the cache")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="write the report as JSON")
    return p.parse_args(argv)


def _limit(samples: list, n: int | None, seed: int) -> list:
    if n is None or len(samples) <= n:
        return samples
    rng = np.random.default_rng(seed)
    pos = [s for s in samples if s.label == 1]
    neg = [s for s in samples if s.label == 0]
    k_pos = max(1, round(n * len(pos) / len(samples))) if pos else 0
    pick = [pos[i] for i in rng.permutation(len(pos))[:k_pos]] + \
           [neg[i] for i in rng.permutation(len(neg))[:n - k_pos]]
    return sorted(pick, key=lambda s: str(s.path))


def _run_tier(tier: Any, samples: list, cache_file: Path | None) -> dict[str, np.ndarray]:
    """Probabilities, features and latencies of `tier` on `samples` (cached by path list)."""
    from tqdm import tqdm

    paths = [str(s.path) for s in samples]
    if cache_file is not None and cache_file.exists():
        data = np.load(cache_file, allow_pickle=False)
        if list(data["paths"]) == paths:
            return {k: data[k] for k in data.files}
    probs, feats, lat, cpu, failed = [], [], [], [], []
    for s in tqdm(samples, desc=f"{tier.name}", unit="img", leave=False):
        image = s.load()
        t0, c0 = time.perf_counter(), time.process_time()
        out = tier.predict([image])[0]
        lat.append((time.perf_counter() - t0) * 1000.0)
        cpu.append((time.process_time() - c0) * 1000.0)
        if isinstance(out, Exception):
            failed.append(f"{s.path}: {out!r}")
            probs.append(np.nan)
            feats.append(None)
            continue
        probs.append(out.prob)
        feats.append(out.evidence.get("features"))
    dim = max((len(f) for f in feats if f is not None), default=0)
    fmat = np.array([f if f is not None else [np.nan] * dim for f in feats], dtype=np.float32)
    result = {"paths": np.array(paths), "probs": np.array(probs, dtype=np.float64),
              "features": fmat.reshape(len(samples), dim), "latency_ms": np.array(lat),
              "cpu_ms": np.array(cpu),
              "labels": np.array([s.label for s in samples]),
              "sources": np.array([s.source for s in samples]),
              "failed": np.array(failed if failed else [""])}
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache_file, **result)
    return result


def _metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    from natix_miner.toolkit.metrics import accuracy, binarize, mcc, roc_auc

    ok = np.isfinite(probs)
    y, p = labels[ok], probs[ok]
    return {"n": int(len(y)), "positives": int(y.sum()),
            "auc": round(roc_auc(y, p), 4) if len(y) else None,
            "mcc_at_0.5": round(mcc(y, binarize(p)), 4) if len(y) else None,
            "accuracy_at_0.5": round(accuracy(y, p), 4) if len(y) else None,
            "mean_prob_pos": round(float(p[y == 1].mean()), 4) if (y == 1).any() else None,
            "mean_prob_neg": round(float(p[y == 0].mean()), 4) if (y == 0).any() else None}


def _cue_scale(head: Any, names: list[str]) -> dict[str, Any]:
    """A standardised logistic head rewritten as bias + weights on the raw cue vector."""
    w = np.asarray(head.params["w"], dtype=np.float64).reshape(-1) / head.std
    b = float(np.asarray(head.params["b"]).reshape(-1)[0]) - float((w * head.mean).sum())
    return {"bias": round(b, 3), "coefficients": {n: round(float(v), 3) for n, v in zip(names, w)}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from loguru import logger

    from cascade.config import load_cascade_config
    from models.registry import build_tier
    from natix_miner.toolkit.dataset import load_folder, select

    cfg = load_cascade_config(args.config)
    specs = {t.name: t for t in cfg.tiers}
    names = args.tier or [t.name for t in cfg.tiers if t.backend in CUE_BACKENDS]
    unknown = [n for n in names if n not in specs]
    if unknown:
        logger.error("unknown tier(s) {} in {}; known: {}", unknown, args.config, sorted(specs))
        return 2
    if args.save_head and not args.fit:
        logger.error("--save-head needs --fit")
        return 2
    cache_dir = None if str(args.cache) == "none" else args.cache
    report: dict[str, Any] = {"config": str(args.config), "split": args.split, "tiers": {}}
    for name in names:
        tier = build_tier(specs[name])
        tier.load("cpu")
        tier.warmup()
        # The cache key covers the options and the backend's source, so any change recomputes.
        source = Path(inspect.getsourcefile(type(tier)) or "").read_bytes()
        sig = hashlib.sha1(source + json.dumps(tier.describe(), sort_keys=True, default=str).encode()
                           ).hexdigest()[:12]
        tier_report: dict[str, Any] = {}
        for folder in args.data:
            samples = load_folder(folder)
            key = hashlib.sha1(f"{name}|{sig}|{folder.resolve()}".encode()).hexdigest()[:12]

            def run(split: str) -> dict[str, np.ndarray]:
                chosen = _limit(select(samples, split), args.limit, args.seed)
                cache = None if cache_dir is None else cache_dir / f"{key}-{split}-{args.limit}.npz"
                return _run_tier(tier, chosen, cache)

            ev = run(args.split)
            lat = ev["latency_ms"]
            entry: dict[str, Any] = {
                "model": tier.describe().get("model", "n/a"),  # hand-set, or the head.pt in use
                "overall": _metrics(ev["labels"], ev["probs"]),
                "latency_ms": {"mean": round(float(lat.mean()), 1), "p50": round(float(np.median(lat)), 1),
                               "p95": round(float(np.percentile(lat, 95)), 1),
                               "cpu_mean": round(float(ev["cpu_ms"].mean()), 1) if "cpu_ms" in ev else None},
                "failed": [f for f in ev["failed"].tolist() if f],
                "by_source": {src: _metrics(ev["labels"][ev["sources"] == src],
                                            ev["probs"][ev["sources"] == src])
                              for src in sorted(set(ev["sources"].tolist()))},
            }
            if args.fit and hasattr(tier, "fit_head"):
                tr = ev if args.split == "train" else run("train")
                ok = np.isfinite(tr["features"]).all(1)
                # Restored below: the next folder's predict must not use this folder's fit.
                loaded_head = getattr(tier, "head", None)
                info = tier.fit_head(tr["features"][ok], tr["labels"][ok], seed=args.seed)
                okv = np.isfinite(ev["features"]).all(1)
                fitted = np.full(len(ev["probs"]), np.nan)
                fitted[okv] = tier.head_probs(ev["features"][okv])
                entry["fitted_head"] = {
                    "trained_on": "train split" + (" (in-sample: --split includes it)"
                                                   if args.split in ("train", "all") else ""),
                    "l2": info.get("l2"), "overall": _metrics(ev["labels"], fitted),
                    "by_source": {src: _metrics(ev["labels"][ev["sources"] == src],
                                                fitted[ev["sources"] == src])
                                  for src in sorted(set(ev["sources"].tolist()))}}
                if getattr(tier.head, "kind", None) == "logistic" and hasattr(tier, "feature_names"):
                    entry["fitted_head"]["cue_scale"] = _cue_scale(tier.head, tier.feature_names())
                if args.save_head:
                    path = tier.save_head({"trained_by": "scripts/eval_cues.py", "data": str(folder)})
                    entry["fitted_head"]["saved"] = str(path)
                tier.head = loaded_head
            tier_report[str(folder)] = entry
            logger.info("{} on {} ({}): {}", name, folder.name, args.split, json.dumps(entry, indent=1))
        report["tiers"][name] = tier_report
        tier.close()
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
