"""Labelled image folders: `roadwork/` + `no_roadwork/` subfolders, or a `manifest.csv`.

A manifest has at least `path,label` (label 1 = roadwork; paths relative to the folder) and may
carry `source` and `split` (`train`/`val`) columns, as `../shared/data/*/manifest.csv` do. A row
with an empty label is not labelled yet (an exported miner store, `natix-miner store export`)
and is left out. A folder without a split column gets a deterministic stratified 75/25 split from
a hash of each path, so train and calibrate never see each other's images.
"""

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
SUBFOLDERS = {"roadwork": 1, "no_roadwork": 0}


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    source: str
    split: str

    @property
    def key(self) -> str:
        """The sample's identity in fingerprints and caches: its absolute path."""
        return str(self.path.resolve())

    def load(self) -> Image.Image:
        """The image as RGB (EXIF orientation applied)."""
        from PIL import ImageOps

        with Image.open(self.path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")


class DatasetError(ValueError):
    """An image folder is not in one of the two accepted layouts."""


def _hash_split(rel: str, val_fraction: float) -> str:
    h = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if h < val_fraction else "train"


def load_folder(root: Path, *, val_fraction: float = 0.25) -> list[Sample]:
    """Read every labelled sample of an image folder (see module docstring for the layouts)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    manifest = root / "manifest.csv"
    samples: list[Sample] = []
    unlabelled = 0
    if manifest.exists():
        with open(manifest, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or [])
            if not {"path", "label"} <= cols:
                raise DatasetError(f"{manifest}: needs columns path,label (has {sorted(cols)})")
            for i, row in enumerate(reader, start=2):
                if not (row.get("label") or "").strip():  # not labelled yet
                    unlabelled += 1
                    continue
                try:
                    label = int(row["label"])
                except (TypeError, ValueError):
                    raise DatasetError(f"{manifest}:{i}: label must be 0 or 1, got {row['label']!r}") from None
                if label not in (0, 1):
                    raise DatasetError(f"{manifest}:{i}: label must be 0 or 1, got {label}")
                rel = row["path"]
                split = (row.get("split") or "").strip() or _hash_split(rel, val_fraction)
                samples.append(Sample(root / rel, label, (row.get("source") or "").strip() or root.name,
                                      split))
    else:
        for sub, label in SUBFOLDERS.items():
            folder = root / sub
            if not folder.is_dir():
                continue
            for p in sorted(folder.rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    rel = str(p.relative_to(root))
                    samples.append(Sample(p, label, sub, _hash_split(rel, val_fraction)))
    if not samples and unlabelled:
        raise DatasetError(f"{root}: none of its {unlabelled} images is labelled yet "
                           f"(natix-miner store label {root})")
    if not samples:
        raise DatasetError(f"{root}: no images found (expected manifest.csv with path,label or "
                           f"roadwork/ and no_roadwork/ subfolders)")
    return samples


def select(samples: Iterable[Sample], split: Optional[str] = None) -> list[Sample]:
    """Samples of one split (`train`, `val`), or all when split is None or 'all'."""
    if split in (None, "all"):
        return list(samples)
    return [s for s in samples if s.split == split]
