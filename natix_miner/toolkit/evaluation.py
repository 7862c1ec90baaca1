"""Offline evaluation and calibration data: every tier and the cascade on validator-style images.

Why: the cascade's figures only mean something on what validators send, so every image goes
through the era's pipeline (`natix_miner.toolkit.challenge`) and a JPEG q75 round trip first. Each image
gets its own random stream, seeded from (seed, path, era), so `calibrate` and `eval` see the same
augmented pixels for the same image whatever the order or subset, and a rerun is identical.

Per image we record the cascade's answer (`engine.predict`, the full routed path) and every
enabled tier's own raw probability (each tier on every image, in batches, for per-tier figures and
for fitting calibration), plus that probability through the engine's current calibration, and the
image's conditions (`cascade.conditions`, as the engine computes them). Where the calibration
gave an image its condition's own maps, the cascade is asked again with the pooled maps, so the
report shows per condition what the condition-aware maps change.
Raw tier outputs are cached on disk per (tier fingerprint, image file, era, seed), so `calibrate`
then `eval` pay for the slow tiers once; the fingerprint includes the tier's spec and the
modification times of its artefacts, so a retrained head is never served from a stale cache.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from loguru import logger

from natix_miner.toolkit import challenge as ch
from natix_miner.toolkit.metrics import accuracy, binarize, confusion, ece, mcc, reliability_bins, roc_auc
from natix_miner.toolkit.scoring import expected_reward

METRIC_KEYS = ("mcc", "accuracy", "auc", "ece", "reward", "n")


def view_rng(seed: int, path: str, era: str) -> np.random.Generator:
    """The random stream of one image's validator view: fixed by (seed, path, era) alone."""
    h = int(hashlib.sha1(f"{path}|{era}".encode()).hexdigest()[:12], 16)
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, h])


def validator_image(sample: Any, era: str, seed: int) -> tuple[Any, dict[str, Any]]:
    """The pixels a miner would receive for `sample` in `era` (pipeline, then JPEG q75)."""
    return ch.validator_view(sample.load(), era, view_rng(seed, str(sample.path), era))


# --------------------------------------------------------------------------------------------
# cache of raw tier outputs
# --------------------------------------------------------------------------------------------

def tier_fingerprint(spec: Any) -> str:
    """What a tier's raw output depends on: its spec and its artefact files (by mtime and size)."""
    d = dataclasses.asdict(spec)
    for k in ("source", "base_dir", "max_batch_size", "max_wait_ms", "timeout_ms", "enabled",
              "weight", "expected_latency_ms", "calibration", "reserve_mib", "params_m"):
        d.pop(k, None)
    art = Path(spec.artifact(""))
    files = []
    if art.is_dir():
        for p in sorted(art.rglob("*")):
            if p.is_file():
                st = p.stat()
                files.append((str(p.relative_to(art)), st.st_size, st.st_mtime_ns))
    blob = json.dumps({"spec": d, "artefacts": files}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


class TierCache:
    """A JSON map key -> raw probability (null = the tier failed on that image)."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = None if path is None else Path(path)
        self.data: dict[str, Optional[float]] = {}
        self.dirty = False
        if self.path is not None and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                logger.warning("ignoring unreadable tier cache {}: {}", self.path, exc)

    @staticmethod
    def key(fingerprint: str, sample: Any, era: str, seed: int) -> str:
        try:
            st = os.stat(sample.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "?"
        return hashlib.sha1(f"{fingerprint}|{sample.path}|{stamp}|{era}|{seed}|"
                            f"pipeline{ch.PIPELINE_VERSION}".encode()).hexdigest()

    def get(self, key: str) -> Optional[float] | str:
        return self.data.get(key, "missing")

    def put(self, key: str, value: float) -> None:
        self.data[key] = None if not math.isfinite(value) else float(value)
        self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data), encoding="utf-8")
        tmp.replace(self.path)
        self.dirty = False


# --------------------------------------------------------------------------------------------
# collection
# --------------------------------------------------------------------------------------------

@dataclass
class Outputs:
    """Everything measured on one set of images (arrays aligned by image)."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    eras: list[str] = field(default_factory=list)
    levels: list[Optional[int]] = field(default_factory=list)
    cascade: list[float] = field(default_factory=list)
    stopped_after: list[str] = field(default_factory=list)
    raw: dict[str, list[float]] = field(default_factory=dict)
    calibrated: dict[str, list[float]] = field(default_factory=dict)
    conditions: list[dict[str, Any]] = field(default_factory=list)  # `estimate_conditions` per image
    decisions: list[str] = field(default_factory=list)  # which maps the cascade applied
    cascade_pooled: list[float] = field(default_factory=list)  # the cascade with pooled maps only
    cascade_tiers: list[list[str]] = field(default_factory=list)  # tiers that answered in the cascade

    def array(self, name: str) -> np.ndarray:
        return np.asarray(getattr(self, name), dtype=np.float64)

    def flags(self, name: str) -> np.ndarray:
        """[N] booleans: the images in condition `name`."""
        return np.array([c.get(name) is True for c in self.conditions], dtype=bool)

    def subset(self, idx: Sequence[int]) -> "Outputs":
        idx = list(idx)
        pick = lambda xs: [xs[i] for i in idx] if xs else []  # noqa: E731
        return Outputs(pick(self.paths), pick(self.labels), pick(self.sources), pick(self.eras),
                       pick(self.levels), pick(self.cascade), pick(self.stopped_after),
                       {k: pick(v) for k, v in self.raw.items()},
                       {k: pick(v) for k, v in self.calibrated.items()},
                       pick(self.conditions), pick(self.decisions), pick(self.cascade_pooled),
                       pick(self.cascade_tiers))


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _calibrate(engine: Any, tier: str, p: float) -> float:
    cal = getattr(engine, "calibration", None)
    if cal is None or not math.isfinite(p):
        return p
    return float(cal.calibrate(tier, p))


def _views(chunk: Sequence[Any], era: str, seed: int) -> list[tuple[Any, tuple[Any, dict]]]:
    """(sample, validator view) for each readable sample; unreadable files are logged and left out."""
    built = []
    for s in chunk:
        try:
            built.append((s, validator_image(s, era, seed)))
        except (OSError, ValueError) as exc:
            logger.warning("skipping unreadable image {}: {}", s.path, exc)
    return built


async def collect(engine: Any, samples: Sequence[Any], era: str, seed: int, *,
                  with_cascade: bool = True, cache: Optional[TierCache] = None,
                  batch_size: int = 8, progress: bool = True) -> Outputs:
    """Run every enabled tier (and, with `with_cascade`, the cascade) on each sample's view.

    Images are built and scored one chunk at a time so a folder of full-resolution frames never
    sits in memory at once.
    """
    from cascade.calibration import POOLED
    from cascade.conditions import estimate_conditions

    tiers = dict(engine.tiers)
    cond_cfg = engine.config.engine.conditions
    fps = {name: tier_fingerprint(tier.spec) for name, tier in tiers.items()}
    out = Outputs(raw={n: [] for n in tiers}, calibrated={n: [] for n in tiers})
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc=f"eval {era}", unit="img")
    try:
        for chunk in _chunks(list(samples), batch_size):
            built = await asyncio.to_thread(_views, chunk, era, seed)
            if bar is not None:
                bar.update(len(chunk) - len(built))
            if not built:
                continue
            chunk = [s for s, _ in built]
            views = [v for _, v in built]
            conds = await asyncio.to_thread(lambda: [estimate_conditions(v, cond_cfg) for v, _ in views])
            out.conditions.extend(conds)
            for s, (_, meta) in zip(chunk, views):
                out.paths.append(str(s.path))
                out.labels.append(int(s.label))
                out.sources.append(s.source)
                out.eras.append(meta["era"])
                out.levels.append(meta.get("level"))
            for name, tier in tiers.items():
                keys = [TierCache.key(fps[name], s, era, seed) for s in chunk]
                got = [cache.get(k) if cache is not None else "missing" for k in keys]
                todo = [i for i, g in enumerate(got) if g == "missing"]
                if todo:
                    results = await asyncio.to_thread(tier.predict, [views[i][0] for i in todo])
                    for i, r in zip(todo, results):
                        if isinstance(r, Exception):
                            logger.warning("tier {} failed on {}: {}", name, chunk[i].path, r)
                            got[i] = None
                        else:
                            got[i] = float(r.prob)
                        if cache is not None:
                            cache.put(keys[i], float("nan") if got[i] is None else got[i])
                for g in got:
                    p = float("nan") if g is None else float(g)
                    out.raw[name].append(p)
                    out.calibrated[name].append(_calibrate(engine, name, p))
            if with_cascade:
                for image, _ in views:
                    res = await engine.predict(image)
                    out.cascade.append(float(res.prob))
                    out.stopped_after.append(str(getattr(res, "stopped_after", "")))
                    out.cascade_tiers.append(sorted(getattr(res, "raw_probs", {}) or {}))
                    decision = str(getattr(res, "decision", POOLED))
                    out.decisions.append(decision)
                    pooled = res
                    if decision != POOLED:  # the same image with the pooled maps only
                        engine.condition_aware = False
                        try:
                            pooled = await engine.predict(image)
                        finally:
                            engine.condition_aware = True
                    out.cascade_pooled.append(float(pooled.prob))
            if bar is not None:
                bar.update(len(chunk))
            if cache is not None:
                cache.save()
    finally:
        if bar is not None:
            bar.close()
        if cache is not None:
            cache.save()
    return out


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------

def _clean(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def balanced_indices(labels: Sequence[int], idx: Optional[Sequence[int]] = None, seed: int = 0) -> np.ndarray:
    """Indices (within `idx`) with both labels equally often: the minority label is repeated.

    Validators draw labels 50/50, so calibration is fitted and judged at that mix, not at the
    folder's (dashcam frames are 7 % roadwork). Each minority index appears floor(M/m) times plus
    a seeded random remainder; with one label absent the indices are returned unchanged.
    """
    y = np.asarray(labels)
    idx = np.arange(y.size) if idx is None else np.asarray(idx, dtype=np.int64)
    groups = [idx[y[idx] == lab] for lab in (0, 1)]
    if min(g.size for g in groups) == 0:
        return idx
    big = max(g.size for g in groups)
    rng = np.random.default_rng(seed)
    out = []
    for g in groups:
        reps, rem = divmod(big, g.size)
        out.append(np.concatenate([np.tile(g, reps), rng.permutation(g)[:rem]]))
    return np.sort(np.concatenate(out))


def figures(probs: Sequence[float], labels: Sequence[int], *, seed: int = 0) -> dict[str, Any]:
    """MCC, accuracy, ROC AUC, ECE, expected subnet reward at 50/50, n (NaN answers left out).

    MCC, accuracy and AUC are at the data's own label mix; ECE and reward at the validators'
    50/50 mix (ECE on a class-balanced resample, see `balanced_indices`). Undefined figures (AUC
    or reward with one class present) are None.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    ok = np.isfinite(p)
    p, y = p[ok], y[ok]
    if p.size == 0:
        return {"mcc": None, "accuracy": None, "auc": None, "ece": None, "reward": None, "n": 0}
    return {"mcc": _clean(mcc(y, binarize(p))), "accuracy": _clean(accuracy(y, p)),
            "auc": _clean(roc_auc(y, p)), "ece": _clean(_balanced_ece(p, y, seed)),
            "reward": _clean(expected_reward(p, y, seed=seed)), "n": int(p.size)}


def report(out: Outputs, *, seed: int = 0) -> dict[str, Any]:
    """The evaluation report: cascade, each tier alone, cascade by source, by era and by condition.

    `by_condition[name]` has the cascade on that condition's images as the miner answers
    (`condition_aware`, the file's per-condition maps applied where it has them) and with the
    pooled maps only (`pooled`), plus how many of those images got a condition's own maps
    (`n_condition_maps`). Conditions with no image are left out.
    """
    from cascade.calibration import POOLED
    from cascade.conditions import CONDITIONS

    y = np.asarray(out.labels)
    casc = out.array("cascade")
    sources = np.asarray(out.sources)
    eras = np.asarray(out.eras)
    rep = {"cascade": figures(casc, y, seed=seed),
           "tiers": {n: figures(np.asarray(v), y, seed=seed) for n, v in out.calibrated.items()},
           "by_source": {s: figures(casc[sources == s], y[sources == s], seed=seed)
                         for s in sorted(set(out.sources))},
           "by_era": {e: figures(casc[eras == e], y[eras == e], seed=seed)
                      for e in ch.ERAS if e in set(out.eras)},
           "by_condition": {},
           # share of images each tier answered for in the routed cascade (the router stops early
           # and skips tiers that cannot change the decision)
           "tier_runs": {n: float(np.mean([n in t for t in out.cascade_tiers]))
                         for n in out.calibrated} if out.cascade_tiers else {}}
    if out.conditions and len(out.cascade_pooled) == len(casc):
        pooled = out.array("cascade_pooled")
        decisions = np.asarray(out.decisions, dtype=object)
        for c in CONDITIONS:
            m = out.flags(c)
            if m.any():
                rep["by_condition"][c] = {
                    "condition_aware": figures(casc[m], y[m], seed=seed),
                    "pooled": figures(pooled[m], y[m], seed=seed),
                    "n_condition_maps": int(np.sum(decisions[m] != POOLED))}
    return rep


def format_report(rep: dict[str, Any]) -> str:
    """A fixed-width table of the report for the terminal."""
    def f(v: Any, w: int = 7) -> str:
        return f"{'-':>{w}}" if v is None else (f"{v:>{w}d}" if isinstance(v, int) else f"{v:>{w}.3f}")

    head = f"{'':<40} {'n':>7} {'MCC':>7} {'acc':>7} {'AUC':>7} {'ECE':>7} {'reward':>7}"
    lines = [head, "-" * len(head)]

    def row(name: str, m: dict[str, Any]) -> None:
        lines.append(f"{name[:40]:<40} {f(m['n'])} {f(m['mcc'])} {f(m['accuracy'])} {f(m['auc'])} "
                     f"{f(m['ece'])} {f(m['reward'])}")

    row("cascade", rep["cascade"])
    for n, m in rep["tiers"].items():
        row(f"  tier {n}", m)
    for e, m in rep["by_era"].items():
        row(f"  era {e}", m)
    for s, m in rep["by_source"].items():
        row(f"  source {s}", m)
    by_cond = rep.get("by_condition") or {}
    any_maps = any(v["n_condition_maps"] for v in by_cond.values())
    for c, v in by_cond.items():
        if v["n_condition_maps"]:
            row(f"  condition {c}, pooled maps", v["pooled"])
            row(f"  condition {c}, own maps ({v['n_condition_maps']} img)", v["condition_aware"])
        else:
            row(f"  condition {c}", v["condition_aware"])
    if rep.get("tier_runs"):
        lines.append("tiers run by the cascade: " + ", ".join(f"{n} {v:.0%}" for n, v in rep["tier_runs"].items()))
    lines.append("MCC, acc, AUC at the data's label mix; ECE and reward at the validators' 50/50 "
                 "(reward: windows of 100 and 10 resampled from this data); '-': one label only")
    if by_cond and not any_maps:
        lines.append("no condition has its own maps in this calibration file: every image used "
                     "the pooled ones")
    return "\n".join(lines)


def write_predictions_csv(out: Outputs, path: Path) -> Path:
    """One row per image: label, source, era, level, cascade answer, each tier raw/calibrated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from cascade.conditions import CONDITIONS, SCORED

    names = list(out.raw)
    cond_cols = [*CONDITIONS, *[f"{c}_score" for c in SCORED]] if out.conditions else []
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "source", "era", "level", "cascade", "stopped_after",
                    "decision", "cascade_pooled",
                    *[f"{n}:raw" for n in names], *[f"{n}:calibrated" for n in names],
                    *[f"cond:{c}" for c in cond_cols]])
        for i in range(len(out.paths)):
            conds = out.conditions[i] if out.conditions else {}
            w.writerow([out.paths[i], out.labels[i], out.sources[i], out.eras[i],
                        "" if out.levels[i] is None else out.levels[i],
                        out.cascade[i] if out.cascade else "",
                        out.stopped_after[i] if out.stopped_after else "",
                        out.decisions[i] if out.decisions else "",
                        out.cascade_pooled[i] if out.cascade_pooled else "",
                        *[out.raw[n][i] for n in names], *[out.calibrated[n][i] for n in names],
                        *[_csv_value(conds.get(c)) for c in cond_cols]])
    return path


def _csv_value(v: Any) -> Any:
    return int(v) if isinstance(v, bool) else ("" if v is None else v)


def write_plots(out: Outputs, directory: Path) -> list[Path]:
    """Reliability diagram and confusion matrices of the cascade and every tier."""
    from natix_miner.toolkit.plots import plot_confusions, plot_reliability

    y = np.asarray(out.labels)
    series = {"cascade": out.array("cascade")} if out.cascade else {}
    series.update({f"tier {n}": np.asarray(v, dtype=np.float64) for n, v in out.calibrated.items()})
    curves, mats = {}, {}
    for name, p in series.items():
        ok = np.isfinite(p)
        if ok.any():
            rows = balanced_indices(y[ok])
            curves[name] = reliability_bins(p[ok][rows], y[ok][rows], bins=10)
            mats[name] = confusion(y[ok], binarize(p[ok]))
    directory = Path(directory)
    return [plot_reliability(curves, directory / "reliability.png",
                             title="reliability at the validators' 50/50 label mix"),
            plot_confusions(mats, directory / "confusion.png")]


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, holdout indices): `fraction` of each label held out, at random."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    hold: list[int] = []
    for lab in (0, 1):
        idx = np.flatnonzero(y == lab)
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        if fraction > 0 and len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        hold.extend(idx[:k].tolist())
    hold_arr = np.array(sorted(hold), dtype=np.int64)
    fit_arr = np.setdiff1d(np.arange(len(y)), hold_arr)
    return fit_arr, hold_arr


def limit_samples(samples: Sequence[Any], limit: Optional[int], seed: int) -> list[Any]:
    """A random subset of `limit` samples keeping the label proportions (all when None)."""
    samples = list(samples)
    if limit is None or limit >= len(samples):
        return samples
    _, keep = stratified_split([s.label for s in samples], limit / len(samples), seed)
    return [samples[i] for i in keep]


# --------------------------------------------------------------------------------------------
# the two drivers behind `natix-miner eval` and `natix-miner calibrate`
# --------------------------------------------------------------------------------------------

def load_samples(folders: Sequence[Path], split: Optional[str], limit: Optional[int], seed: int) -> list[Any]:
    """Labelled samples of one split from one or more folders (a stratified subset with `limit`)."""
    from natix_miner.toolkit.dataset import DatasetError, load_folder, select

    samples: list[Any] = []
    for folder in folders:
        samples.extend(select(load_folder(Path(folder)), split))
    if not samples:
        raise DatasetError(f"no images of split {split!r} in {', '.join(map(str, folders))}")
    return limit_samples(samples, limit, seed)


def default_cache_path(cfg: Any) -> Path:
    return Path(cfg.artifacts_dir) / ".eval_cache" / "tier_outputs.json"


async def _engine_outputs(cfg: Any, samples: Sequence[Any], era: str, seed: int, *,
                          calibration: Any = None, with_cascade: bool, cache: Optional[TierCache],
                          batch_size: int, progress: bool, tier_factory: Any = None) -> Outputs:
    from cascade.config import without_store
    from cascade.engine import CascadeEngine
    from models.registry import build_tier

    # labelled evaluation images must never land in the miner's store (and from there in training)
    engine = CascadeEngine(without_store(cfg), tier_factory or build_tier, calibration=calibration)
    await engine.start()
    try:
        return await collect(engine, samples, era, seed, with_cascade=with_cascade, cache=cache,
                             batch_size=batch_size, progress=progress)
    finally:
        await engine.stop()


async def run_eval(config: Path, folders: Sequence[Path], *, split: Optional[str] = "val",
                   era: str = "mixed", seed: int = 0, limit: Optional[int] = None,
                   calibration_path: Optional[Path] = None, json_path: Optional[Path] = None,
                   out_dir: Optional[Path] = None, use_cache: bool = True, batch_size: int = 8,
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate the cascade and every tier alone; return (and optionally write) the report."""
    from cascade.calibration import CalibrationSet
    from cascade.config import load_cascade_config

    if era not in ch.ERA_CHOICES:
        raise ValueError(f"era must be one of {', '.join(ch.ERA_CHOICES)}, got {era!r}")
    cfg = load_cascade_config(Path(config))
    samples = load_samples(folders, split, limit, seed)
    cache = TierCache(default_cache_path(cfg)) if use_cache else None
    calibration = CalibrationSet.load(calibration_path) if calibration_path is not None else None
    out = await _engine_outputs(cfg, samples, era, seed, calibration=calibration, with_cascade=True,
                                cache=cache, batch_size=batch_size, progress=progress)
    rep = report(out, seed=seed)
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rep, indent=2) + "\n", encoding="utf-8")
        logger.info("report written to {}", json_path)
    if out_dir is not None:
        paths = write_plots(out, Path(out_dir))
        paths.append(write_predictions_csv(out, Path(out_dir) / "predictions.csv"))
        logger.info("wrote {}", ", ".join(map(str, paths)))
    return rep


def _balanced_ece(p: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    rows = balanced_indices(y, None, seed)
    return ece(p[rows], y[rows])


def _ece_or_none(p: np.ndarray, y: np.ndarray, balanced: bool, seed: int = 0) -> Optional[float]:
    ok = np.isfinite(p)
    if not ok.any():
        return None
    return _clean(_balanced_ece(p[ok], y[ok], seed) if balanced else ece(p[ok], y[ok]))


async def run_calibration(config: Path, folders: Sequence[Path], *, split: Optional[str] = "val",
                          era: str = "mixed", seed: int = 0, limit: Optional[int] = None,
                          method: Optional[str] = None, out_path: Optional[Path] = None,
                          holdout_fraction: float = 0.3, balance: bool = True, use_cache: bool = True,
                          batch_size: int = 8, progress: bool = True, force: bool = False,
                          conditions: bool = True, condition_min_images: Optional[int] = None,
                          condition_min_per_label: Optional[int] = None) -> dict[str, Any]:
    """Fit per-tier calibrators, consensus weights, the threshold map and, per image condition
    with enough labelled images, its own weights and threshold map; write the engine's file.

    The images are split per label into a fitting part and a held-out part (`holdout_fraction`);
    everything is fitted on the first and the ECE/reward figures reported for the second, so
    they are not flattered by having seen the answers. With a fraction of 0 the figures are
    in-sample and flagged as such. The file written is the one fitted on the fitting part.
    With `balance` (default) the fit sees both labels equally often, as validators draw them, and
    the held-out ECE is measured at that mix too.

    The new file is written only if its held-out ECE (fused probability, condition-aware) is no
    worse than that of the file it would replace (applied to the same held-out images), or of no
    calibration at all when there is none; otherwise the old file stays and `written` is False,
    unless `force`. Per condition (`engine.conditions.calibration_min_images` /
    `..._per_label`, overridable) the summary compares pooled and condition-aware maps on the
    held-out images of that condition.
    """
    from cascade.calibration import POOLED, CalibrationSet, fit_calibration_set, fit_condition_maps
    from cascade.conditions import PRIORITY
    from cascade.config import load_cascade_config

    if era not in ch.ERA_CHOICES:
        raise ValueError(f"era must be one of {', '.join(ch.ERA_CHOICES)}, got {era!r}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"--holdout-fraction must be in [0, 1), got {holdout_fraction}")
    cfg = load_cascade_config(Path(config))
    cond_cfg = cfg.engine.conditions
    min_images = cond_cfg.calibration_min_images if condition_min_images is None else condition_min_images
    min_per_label = cond_cfg.calibration_min_per_label if condition_min_per_label is None \
        else condition_min_per_label
    if min_images < 2 or min_per_label < 1:
        raise ValueError("the minimum images per condition must be >= 2 and per label >= 1")
    target = Path(out_path) if out_path is not None else (
        cfg.resolve(cfg.engine.calibration) if cfg.engine.calibration
        else Path(cfg.artifacts_dir) / "calibration.json")
    samples = load_samples(folders, split, limit, seed)
    cache = TierCache(default_cache_path(cfg)) if use_cache else None
    out = await _engine_outputs(cfg, samples, era, seed, calibration=CalibrationSet.identity(),
                                with_cascade=False, cache=cache, batch_size=batch_size,
                                progress=progress)
    y = np.asarray(out.labels, dtype=np.int64)
    fit_idx, hold_idx = stratified_split(y, holdout_fraction, seed)
    if holdout_fraction == 0:
        hold_idx = fit_idx
    names = list(out.raw)
    raw = {n: np.asarray(out.raw[n], dtype=np.float64) for n in names}
    specs = {s.name: s for s in cfg.active_tiers}
    priors = {n: specs[n].weight for n in names}
    methods = {n: method or specs[n].calibration for n in names}
    fit_rows = balanced_indices(y, fit_idx, seed) if balance else fit_idx
    cal = fit_calibration_set({n: raw[n][fit_rows] for n in names}, y[fit_rows], methods=methods,
                              prior=priors)
    if conditions:
        C_fit = np.stack([np.where(np.isfinite(raw[n][fit_idx]),
                                   cal.calibrators[n](np.nan_to_num(raw[n][fit_idx], nan=0.5)), np.nan)
                          for n in names], axis=1)
        flags = {c: out.flags(c)[fit_idx] for c in PRIORITY}
        cal.conditions = fit_condition_maps(C_fit, y[fit_idx], flags, names,
                                            [cal.weights[n] for n in names], min_images=min_images,
                                            min_per_label=min_per_label, balanced=balance)
    yh = y[hold_idx]
    hold_raw = {n: raw[n][hold_idx] for n in names}
    hold_conds = [out.conditions[i] for i in hold_idx]
    tiers: dict[str, Any] = {}
    for n in names:
        r = hold_raw[n]
        ok = np.isfinite(r)
        c = np.full_like(r, np.nan)
        if ok.any():
            c[ok] = np.asarray(cal.calibrators[n](r[ok]), dtype=np.float64)
        tiers[n] = {"method": methods[n], "ece_before": _ece_or_none(r, yh, balance, seed),
                    "ece_after": _ece_or_none(c, yh, balance, seed), "weight": cal.weights.get(n)}
    fused, final, decisions = cal.apply(hold_raw, priors, hold_conds)
    ok = np.isfinite(fused)
    equal_raw, _, _ = CalibrationSet.identity().apply(hold_raw, priors)
    okr = np.isfinite(equal_raw)
    # the file this one would replace, on the same held-out images (none: no calibration at all)
    previous, previous_name = None, "no calibration (identity)"
    if target.exists():
        try:
            previous = CalibrationSet.load(target)
            previous_name = str(target)
        except Exception as exc:  # noqa: BLE001 - an unreadable file is replaced, with a word
            logger.warning("the current calibration file {} is unreadable ({}); comparing with no "
                           "calibration", target, exc)
    prev_fused = equal_raw if previous is None else previous.apply(hold_raw, priors, hold_conds)[0]
    ece_new = _ece_or_none(fused, yh, balance, seed)
    ece_current = _ece_or_none(prev_fused, yh, balance, seed)
    worse = ece_new is not None and ece_current is not None and ece_new > ece_current + 1e-12
    by_condition: dict[str, Any] = {}
    pooled_fused, pooled_final, _ = cal.apply(hold_raw, priors, hold_conds, condition_aware=False)
    for c in PRIORITY:
        m = np.array([hc.get(c) is True for hc in hold_conds], dtype=bool)
        fitted = cal.conditions.get(c)
        n_fit = int(out.flags(c)[fit_idx].sum())
        n_fit_pos = int(y[fit_idx][out.flags(c)[fit_idx]].sum())
        if not m.any() and fitted is None and n_fit == 0:
            continue
        by_condition[c] = {
            "n_fit": n_fit, "n_fit_positive": n_fit_pos, "n_holdout": int(m.sum()),
            "own_maps": fitted is not None,
            "n_own_maps_fit": None if fitted is None else fitted.n,
            "n_own_maps_fit_positive": None if fitted is None else fitted.n_positive,
            "t_star": None if fitted is None else fitted.threshold_map.t_star,
            "n_own_maps_holdout": int(np.sum(m & (decisions != POOLED))),
            "pooled": figures(pooled_final[m], yh[m], seed=seed) if m.any() else None,
            "condition_aware": figures(final[m], yh[m], seed=seed) if m.any() else None}
    summary = {
        "file": str(target), "era": era, "split": split or "all", "seed": seed,
        "n_fit": int(fit_idx.size), "n_holdout": int(hold_idx.size),
        "in_sample": holdout_fraction == 0, "balanced": balance,
        "t_star": cal.threshold_map.t_star,
        "tiers": tiers,
        "fused": {"ece_before": _ece_or_none(equal_raw, yh, balance, seed),
                  "ece_after": ece_new,
                  "ece_after_pooled": _ece_or_none(pooled_fused, yh, balance, seed),
                  "reward_at_0_5_before": _clean(expected_reward(equal_raw[okr], yh[okr], seed=seed)),
                  "reward_at_t_star_after": _clean(expected_reward(final[ok], yh[ok], seed=seed)),
                  "reward_at_t_star_pooled": _clean(expected_reward(pooled_final[ok], yh[ok], seed=seed))},
        "condition_min": {"images": min_images, "per_label": min_per_label},
        "conditions": by_condition,
        "current": {"file": previous_name, "ece": ece_current},
        "written": False, "forced": False,
    }
    cal.metrics = {**cal.metrics, "holdout": summary}
    if worse and not force:
        logger.warning("held-out ECE of the new calibration {:.4f} is worse than {:.4f} of {}: "
                       "nothing written (--force writes it anyway)", ece_new, ece_current, previous_name)
        return summary
    summary["written"], summary["forced"] = True, bool(worse)
    cal.save(target)
    logger.info("calibration written to {}", target)
    return summary


def format_calibration(summary: dict[str, Any]) -> str:
    """ECE before/after per tier and fused, the threshold, per-condition maps, for the terminal."""
    def f(v: Optional[float]) -> str:
        return "      -" if v is None else f"{v:7.3f}"

    where = "in-sample (no holdout!)" if summary["in_sample"] else f"held-out ({summary['n_holdout']} images)"
    mix = "50/50 label mix (classes balanced)" if summary.get("balanced") else "the data's label mix"
    lines = [f"fitted on {summary['n_fit']} images; figures {where}; era {summary['era']}; "
             f"fit and ECE at {mix}",
             f"{'':<40} {'ECE raw':>7} {'ECE cal':>7} {'weight':>7}"]
    for n, t in summary["tiers"].items():
        lines.append(f"{n[:40]:<40} {f(t['ece_before'])} {f(t['ece_after'])} {f(t['weight'])}  ({t['method']})")
    fz = summary["fused"]
    lines.append(f"{'fused (prior weights, raw -> fitted)':<40} {f(fz['ece_before'])} {f(fz['ece_after'])}")
    lines.append(f"reward-optimal threshold t* = {summary['t_star']:.4f} (mapped to 0.5 + eps)")
    lines.append(f"expected reward at 50/50: raw fused at 0.5 {f(fz['reward_at_0_5_before']).strip()} -> "
                 f"calibrated at t* {f(fz['reward_at_t_star_after']).strip()}")
    conds = summary.get("conditions") or {}
    if conds:
        cm = summary.get("condition_min", {})
        lines.append(f"per condition (own maps need >= {cm.get('images')} fitting images, >= "
                     f"{cm.get('per_label')} per label); held-out MCC / ECE / reward, pooled -> own:")
        for c, v in conds.items():
            head = f"  {c:<13} in fit {v['n_fit']:>4}, held-out {v['n_holdout']:>4}"
            if not v["own_maps"]:
                lines.append(f"{head}: pooled maps (too few: {v['n_fit_positive']} roadwork, "
                             f"{v['n_fit'] - v['n_fit_positive']} none)")
                continue
            p, o = v["pooled"] or {}, v["condition_aware"] or {}
            lines.append(f"{head}: own t* {v['t_star']:.4f} from {v['n_own_maps_fit']} images "
                         f"({v['n_own_maps_fit_positive']} roadwork; earlier conditions took the rest); "
                         f"MCC {f(p.get('mcc')).strip()} -> "
                         f"{f(o.get('mcc')).strip()}, ECE {f(p.get('ece')).strip()} -> "
                         f"{f(o.get('ece')).strip()}, reward {f(p.get('reward')).strip()} -> "
                         f"{f(o.get('reward')).strip()}")
    cur = summary.get("current") or {}
    verdict = (f"held-out fused ECE {f(fz['ece_after']).strip()} (new) vs "
               f"{f(cur.get('ece')).strip()} ({cur.get('file')})")
    if summary.get("written"):
        forced = " although worse (--force)" if summary.get("forced") else ""
        lines.append(f"{verdict}: written{forced}: {summary['file']}")
    else:
        lines.append(f"{verdict}: NOT written, the current file stays (worse held-out ECE; "
                     f"--force writes it anyway)")
    return "\n".join(lines)
