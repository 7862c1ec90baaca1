"""Labelled images from the Hugging Face `datasets` library: hub ids, saved dataset dirs, parquet.

Why: the subnet's own training data is a hub dataset (`natix-network-org/roadwork`: an image
column and a 0/1 label column), and an operator's curated sets are often parquet files or a
`save_to_disk` directory. They all become the same `HFSample`s the folder loader's `Sample`s are
(`key`, `label`, `source`, `split`, `load()`), so training never asks where an image came from.

Splits: the dataset's own splits when it has the ones asked for (`val` and `validation` are the
same name); otherwise a seeded split of the training split, grouped by `group_column` (frames of
one drive, crops of one photo) so a group never sits on both sides. In memory it is stratified by
the group's label; streamed, a row goes to val when a hash of (seed, group) falls below the
fraction, so the split is the same without ever holding the set.

Streaming (`streaming=True`) reads rows as they come, for sets that do not fit in memory; the
training split is then an iterable (`StreamedItems`) and the val split is materialised (cap it
with `max_images`).
"""

from __future__ import annotations

import glob
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
from PIL import Image

from natix_miner.toolkit.dataset import DatasetError

VAL_ALIASES = ("val", "validation", "valid", "dev")


@dataclass(frozen=True)
class Columns:
    """Which dataset columns hold what (`--image-column`, `--label-column`, ...)."""

    image: str = "image"
    label: str = "label"
    # Rows sharing a value stay on one side of a seeded split (None: every row is its own group).
    group: Optional[str] = None
    # Per-row source name for per-source figures (None: the dataset's name).
    source: Optional[str] = None
    # Label value that means roadwork when labels are not 0/1 (e.g. "roadwork").
    positive: Optional[str] = None


@dataclass(frozen=True)
class DatasetSource:
    """One `--dataset` argument and how to read it."""

    name: str
    columns: Columns = field(default_factory=Columns)
    streaming: bool = False
    # Fraction of groups held out when the dataset has no val split of its own.
    val_fraction: float = 0.25
    # Hub revision (branch, tag or commit) of a hub id.
    revision: Optional[str] = None

    @property
    def short_name(self) -> str:
        p = Path(self.name)
        return p.stem if p.suffix == ".parquet" else (p.name or self.name)


class _RowImage:
    """Lazy access to one row's image of a map-style dataset (picklable for loader workers)."""

    def __init__(self, ds: Any, index: int, column: str) -> None:
        self.ds, self.index, self.column = ds, index, column

    def __call__(self) -> Any:
        return self.ds[self.index][self.column]


@dataclass(frozen=True)
class HFSample:
    """One labelled row; `key` names it exactly (dataset, split, row) for fingerprints."""

    key: str
    label: int
    source: str
    split: str
    image: Any = field(repr=False, compare=False, hash=False)

    @property
    def path(self) -> str:
        return self.key

    def load(self) -> Image.Image:
        value = self.image() if callable(self.image) else self.image
        return to_pil(value, self.key)


def to_pil(value: Any, where: str) -> Image.Image:
    """An RGB PIL image from what a dataset cell may hold: PIL, {bytes, path}, bytes or a path."""
    from PIL import ImageOps

    if isinstance(value, Image.Image):
        im = value
    elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        im = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    elif isinstance(value, (bytes, bytearray)):
        im = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        im = Image.open(value)
    else:
        raise DatasetError(f"{where}: image cell of type {type(value).__name__} is not an image")
    return ImageOps.exif_transpose(im).convert("RGB")


def binary_label(value: Any, columns: Columns, where: str) -> int:
    """0/1 from a label cell; `columns.positive` maps other label values (strings, class ids)."""
    if columns.positive is not None:
        return int(str(value) == columns.positive)
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return int(value)
    raise DatasetError(f"{where}: column {columns.label!r} must hold 0/1 (1 = roadwork), got "
                       f"{value!r}; map other values with --positive-label VALUE")


def _is_saved_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json",
                                                               "dataset_info.json"))


def _parquet_files(path: Path) -> Optional[list[str]]:
    if path.is_file() and path.suffix == ".parquet":
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*.parquet"))
        return files or None
    if any(ch in str(path) for ch in "*?["):
        return sorted(f for f in glob.glob(str(path)) if f.endswith(".parquet")) or None
    return None


def open_dataset(src: DatasetSource) -> dict[str, Any]:
    """{split name: Dataset or IterableDataset} of a saved dir, parquet files or a hub id."""
    try:
        import datasets
    except ImportError:
        raise ImportError("--dataset needs the Hugging Face datasets library: "
                          "pip install -c constraints.txt datasets") from None
    path = Path(src.name).expanduser()
    if _is_saved_dir(path):
        loaded = datasets.load_from_disk(str(path))
        if src.streaming:
            loaded = (loaded.to_iterable_dataset() if isinstance(loaded, datasets.Dataset)
                      else datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()}))
    else:
        files = _parquet_files(path)
        try:
            if files is not None:
                loaded = datasets.load_dataset("parquet", data_files={"train": files}, streaming=src.streaming)
            elif path.exists():
                raise DatasetError(f"{src.name}: neither a saved dataset directory (dataset_dict.json / "
                                   "state.json) nor parquet files")
            else:
                loaded = datasets.load_dataset(src.name, revision=src.revision, streaming=src.streaming)
        except DatasetError:
            raise
        except Exception as exc:  # noqa: BLE001 - hub errors come in many types; name the dataset
            raise DatasetError(f"{src.name}: could not open the dataset ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:300]})") from None
    if isinstance(loaded, (datasets.Dataset, datasets.IterableDataset)):
        return {"train": loaded}
    return dict(loaded)


def _split_name(splits: dict[str, Any], wanted: str) -> Optional[str]:
    if wanted in splits:
        return wanted
    if wanted in VAL_ALIASES:
        return next((a for a in VAL_ALIASES if a in splits), None)
    return None


def _check_columns(ds: Any, src: DatasetSource, split: str) -> None:
    cols = ds.column_names
    if cols is None:  # some streamed sets only know their columns after the first row
        return
    c = src.columns
    needed = [x for x in (c.image, c.label, c.group, c.source) if x is not None]
    missing = [x for x in needed if x not in cols]
    if missing:
        raise DatasetError(f"{src.name} [{split}]: no column {missing} (columns: {sorted(cols)}); "
                           "map them with --image-column / --label-column / --group-column / "
                           "--source-column")


def _hash_val(seed: int, group: Any, fraction: float) -> bool:
    h = int(hashlib.sha1(f"{seed}|{group}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < fraction


def grouped_val_mask(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Seeded stratified grouped split: True for the rows whose group is held out.

    A group's label is its maximum (a drive with one roadwork frame is a roadwork group); within
    each label, groups are shuffled and the first `round(fraction * count)` held out (at least one
    when that label has two groups or more), so a small set keeps both labels on both sides.
    """
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    glabel = {g: int(labels[groups == g].max()) for g in uniq}
    held: set[Any] = set()
    for cls in (0, 1):
        gs = [g for g in uniq if glabel[g] == cls]
        rng.shuffle(gs)
        k = int(round(fraction * len(gs)))
        if len(gs) >= 2:
            k = min(max(k, 1), len(gs) - 1)
        held.update(gs[:k])
    return np.isin(groups, np.array(sorted(held, key=str), dtype=groups.dtype)) if held else \
        np.zeros(len(groups), bool)


def _map_samples(ds: Any, src: DatasetSource, split_name: str, tag: str,
                 keep: Optional[np.ndarray] = None) -> list[HFSample]:
    c = src.columns
    labels = [binary_label(v, c, f"{src.name} [{split_name}] row {i}") for i, v in enumerate(ds[c.label])]
    sources = ds[c.source] if c.source else [src.short_name] * len(labels)
    rows = range(len(labels)) if keep is None else np.flatnonzero(keep)
    return [HFSample(f"hf:{src.name}:{split_name}:{i}", labels[i], str(sources[i]), tag,
                     _RowImage(ds, int(i), c.image)) for i in rows]


class StreamedItems:
    """The training split of a streamed dataset: iterable again each epoch, never held whole.

    Rows keep the key and hold-out decision of their position in the source stream, whatever
    the epoch's order: `shuffled(epoch)` reorders through a seeded buffer after both are made.
    `seen` holds the (key, label) pairs of the last full pass, for the data fingerprint.
    """

    def __init__(self, ds: Any, src: DatasetSource, split_name: str, *, seed: int,
                 hold_out: bool, limit: Optional[int], shuffle_epoch: Optional[int] = None,
                 buffer_size: int = 1000) -> None:
        self.ds, self.src, self.split_name = ds, src, split_name
        self.seed, self.hold_out, self.limit = seed, hold_out, limit
        self.shuffle_epoch, self.buffer_size = shuffle_epoch, buffer_size
        self.seen: list[tuple[str, int]] = []
        self._owner: Optional[StreamedItems] = None

    def shuffled(self, epoch: int, buffer_size: int = 1000) -> "StreamedItems":
        """The same rows, in an order drawn through a buffer seeded by (seed, epoch)."""
        out = StreamedItems(self.ds, self.src, self.split_name, seed=self.seed, hold_out=self.hold_out,
                            limit=self.limit, shuffle_epoch=epoch, buffer_size=buffer_size)
        out._owner = self._owner or self  # a pass over the shuffled view names the same rows
        return out

    def _rows(self) -> Iterator[HFSample]:
        c = self.src.columns
        seen: list[tuple[str, int]] = []
        for i, row in enumerate(self.ds):
            if self.limit is not None and len(seen) >= self.limit:
                break
            group = row[c.group] if c.group else i
            if self.hold_out and _hash_val(self.seed, group, self.src.val_fraction):
                continue
            key = f"hf:{self.src.name}:{self.split_name}:{i}"
            label = binary_label(row[c.label], c, f"{self.src.name} [{self.split_name}] row {i}")
            seen.append((key, label))
            yield HFSample(key, label, str(row[c.source]) if c.source else self.src.short_name,
                           "train", row[c.image])
        self.seen = seen
        if self._owner is not None:
            self._owner.seen = seen

    def __iter__(self) -> Iterator[HFSample]:
        if self.shuffle_epoch is None:
            yield from self._rows()
            return
        rng = np.random.default_rng([self.seed, self.shuffle_epoch, 11])
        buffer: list[HFSample] = []
        for sample in self._rows():
            if len(buffer) < self.buffer_size:
                buffer.append(sample)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], sample = sample, buffer[j]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


def _stream_val(ds: Any, src: DatasetSource, split_name: str, *, seed: int, from_train: bool,
                limit: Optional[int]) -> list[HFSample]:
    c = src.columns
    out: list[HFSample] = []
    for i, row in enumerate(ds):
        if limit is not None and len(out) >= limit:
            break
        group = row[c.group] if c.group else i
        if from_train and not _hash_val(seed, group, src.val_fraction):
            continue
        out.append(HFSample(f"hf:{src.name}:{split_name}:{i}",
                            binary_label(row[c.label], c, f"{src.name} [{split_name}] row {i}"),
                            str(row[c.source]) if c.source else src.short_name, "val", row[c.image]))
    return out


def load_splits(src: DatasetSource, split: str, val_split: Optional[str], *, seed: int = 0,
                max_images: Optional[int] = None) -> tuple[Any, list[HFSample]]:
    """(training samples, val samples) of one dataset; see the module docstring for the rules.

    In memory the training samples are a list (capped at `max_images`, stratified, by the caller);
    streamed they are a `StreamedItems` (the first `max_images` rows).
    """
    splits = open_dataset(src)
    train_name = _split_name(splits, split)
    if train_name is None:
        raise DatasetError(f"{src.name}: no split {split!r} (splits: {sorted(splits)})")
    train_ds = splits[train_name]
    _check_columns(train_ds, src, train_name)
    val_name = _split_name(splits, val_split) if val_split else None
    from_train = bool(val_split) and (val_name is None or val_name == train_name)
    if from_train:
        from loguru import logger

        logger.info("{}: no {!r} split (splits: {}); holding out {:.0%} of {!r} by a seeded split{}",
                    src.name, val_split, sorted(splits), src.val_fraction, train_name,
                    f" grouped by {src.columns.group!r}" if src.columns.group else "")
    if src.streaming:
        train = StreamedItems(train_ds, src, train_name, seed=seed, hold_out=from_train, limit=max_images)
        if not val_split:
            return train, []
        vds = train_ds if from_train else splits[val_name]
        return train, _stream_val(vds, src, train_name if from_train else val_name, seed=seed,
                                  from_train=from_train, limit=max_images)
    if from_train:
        c = src.columns
        labels = np.array([binary_label(v, c, f"{src.name} row {i}") for i, v in enumerate(train_ds[c.label])])
        groups = np.asarray(train_ds[c.group]) if c.group else np.arange(len(labels))
        held = grouped_val_mask(labels, groups.astype(str) if groups.dtype == object else groups,
                                src.val_fraction, seed)
        return (_map_samples(train_ds, src, train_name, "train", ~held),
                _map_samples(train_ds, src, train_name, "val", held))
    val: list[HFSample] = []
    if val_name is not None:
        _check_columns(splits[val_name], src, val_name)
        val = _map_samples(splits[val_name], src, val_name, "val")
    return _map_samples(train_ds, src, train_name, "train"), val
