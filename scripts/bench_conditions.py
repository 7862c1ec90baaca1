#!/usr/bin/env python
"""Cost and behaviour of the image-condition estimate (`cascade.conditions`).

Prints (1) milliseconds per frame of `estimate_conditions` at the sizes a miner receives
(validator 224 crops, a 1360x800 dashcam frame, a 4K frame), median and p90 over `--repeats`,
interleaved so a busy machine slows every size alike; and, with `--images DIR` (repeatable),
(2) for each scored condition the median score and the share flagged on clean frames, on the
training augmentations that synthesise it (`natix_miner/toolkit/train_augment.py`: night, fog,
rain, motion blur), on a synthetic glare (`natix_miner/toolkit/condition_probes.py`) and on the
validator's augmented and letterbox eras, all after a JPEG q75 round trip. `--top DIR` also
writes one PNG per condition with the dev frames that score highest, to check by eye that the
scores mean what they say on real frames.

    .venv/bin/python scripts/bench_conditions.py --images ../shared/data/gtsdb-dashcam-dev
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cascade.conditions import SCORED, estimate_conditions  # noqa: E402
from natix_miner.toolkit import challenge, train_augment  # noqa: E402
from natix_miner.toolkit.condition_probes import glare  # noqa: E402

VARIANTS = {
    "clean": None,
    "night": train_augment.night,
    "fog": train_augment.fog,
    "rain": train_augment.rain,
    "motion_blur": train_augment.motion_blur,
    "glare*": glare,
}


def cost(repeats: int) -> None:
    rng = np.random.default_rng(0)
    frames = {f"{w}x{h}": Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for w, h in ((224, 224), (1360, 800), (3840, 2160))}
    times: dict[str, list[float]] = {k: [] for k in frames}
    for k, im in frames.items():
        estimate_conditions(im)
    for _ in range(repeats):
        for k, im in frames.items():
            t0 = time.perf_counter()
            estimate_conditions(im)
            times[k].append((time.perf_counter() - t0) * 1000.0)
    print(f"estimate_conditions cost per frame ({repeats} repeats, interleaved):")
    for k, t in times.items():
        print(f"  {k:>10}: median {np.median(t):5.2f} ms, p90 {np.percentile(t, 90):5.2f} ms")


def behaviour(folder: Path, n: int, seed: int, top: Path | None) -> None:
    with open(folder / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    pick = [rows[i] for i in np.random.default_rng(seed).choice(len(rows), min(n, len(rows)), replace=False)]
    names = list(VARIANTS) + ["augmented", "letterbox"]
    scores = {v: {c: [] for c in SCORED} for v in names}
    flags = {v: {c: [] for c in SCORED} for v in names}
    clean_scores: list[tuple[dict, Path]] = []
    for k, row in enumerate(pick):
        im = Image.open(folder / row["path"]).convert("RGB")
        views = {}
        for v, fn in VARIANTS.items():
            views[v] = im if fn is None else fn(im, np.random.default_rng([seed, k, len(v)]))
        views["augmented"], _ = challenge.apply_era(im, "augmented", np.random.default_rng([seed, k, 1]))
        views["letterbox"], _ = challenge.apply_era(im, "letterbox", np.random.default_rng([seed, k, 2]))
        for v, view in views.items():
            c = estimate_conditions(challenge.jpeg_roundtrip(view))
            for name in SCORED:
                scores[v][name].append(c[f"{name}_score"])
                flags[v][name].append(bool(c[name]))
            if v == "clean":
                clean_scores.append((c, folder / row["path"]))
    print(f"\n{folder.name}: {len(pick)} frames; median score (share flagged) per condition and variant")
    print(f"{'':<13}" + "".join(f"{v:>16}" for v in names))
    for name in SCORED:
        print(f"{name:<13}" + "".join(f"{np.median(scores[v][name]):7.2f} ({np.mean(flags[v][name]):4.2f})"
                                      for v in names))
    print("(* glare: no training augmentation makes it; a synthetic sun with a Gaussian bloom)")
    if top is not None:
        top.mkdir(parents=True, exist_ok=True)
        for name in SCORED:
            best = sorted(clean_scores, key=lambda t: -t[0][f"{name}_score"])[:8]
            sheet = Image.new("RGB", (4 * 320, 2 * 200))
            for j, (c, path) in enumerate(best):
                with Image.open(path) as im:
                    th = im.convert("RGB").resize((320, 200))
                sheet.paste(th, ((j % 4) * 320, (j // 4) * 200))
            out = top / f"{folder.name}-top-{name}.png"
            sheet.save(out)
            top_scores = ", ".join(f"{c[name + '_score']:.2f}" for c, _ in best)
            print(f"  top {name}: {out} (scores {top_scores})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=50, help="timed calls per size (default: 50)")
    p.add_argument("--images", type=Path, action="append", default=[], metavar="DIR",
                   help="labelled folder (manifest.csv) whose frames to score; repeatable")
    p.add_argument("-n", type=int, default=60, help="frames per folder (default: 60)")
    p.add_argument("--seed", type=int, default=0, help="seed of the frame choice and augmentations")
    p.add_argument("--top", type=Path, default=None, metavar="DIR",
                   help="write the highest-scoring clean frames per condition as PNGs here")
    args = p.parse_args(argv)
    cost(args.repeats)
    for folder in args.images:
        behaviour(folder, args.n, args.seed, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
