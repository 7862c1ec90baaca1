"""Bounded on-disk store of uncertain inputs: the miner's own hard cases, for labelling and retraining.

An answer whose fused probability lands near the threshold, or whose tiers disagree strongly, is
exactly the image a person should label next (optionally also a small random share of confident
answers: an unbiased sample, which calibration needs). The engine hands such images to `submit`,
which returns at once: one writer thread, niced below the tiers' threads, downscales the image to
`max_side`, hashes the stored pixels (SHA-256, which also de-duplicates), writes the JPEG and its
SQLite row (tier outputs, conditions, time), then evicts the oldest items until the store is
within both `max_items` and its disk budget `max_bytes` (JPEG bytes + record bytes; SQLite's own
pages add a few per cent). When `max_pending` writes are already queued (a burst of requests, a
slow disk) the item is dropped and counted: a write never delays an answer, and the images
waiting in memory stay bounded.

Privacy: a row holds the downscaled pixels, their hash, the tier outputs and evidence, the image
conditions and the time. It holds no caller identity: no hotkey, no IP, no request headers (the
engine is never given them).

`natix-miner store export` reads the store (read-only, while the miner runs) into a labelled
image folder for `train` and `calibrate` (`natix_miner.toolkit.store_folder`).
"""

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from loguru import logger
from PIL import Image

from cascade.config import StoreConfig

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT UNIQUE NOT NULL,
    created REAL NOT NULL,
    file TEXT NOT NULL,
    prob REAL NOT NULL,
    reason TEXT NOT NULL,
    record TEXT NOT NULL,
    label INTEGER,
    bytes INTEGER NOT NULL DEFAULT 0
)
"""
INDEX_FILE = "index.sqlite"
WRITER_NICE = 10  # how much lower the writer thread runs than the tiers (Linux: per thread)


def uncertainty_reason(fused: float, tier_probs: Mapping[str, float], cfg: StoreConfig,
                       threshold: float = 0.5, *, rng: Optional[random.Random] = None) -> Optional[str]:
    """Why this answer is worth labelling ("near_threshold", "disagreement", "random"), or None."""
    if abs(fused - threshold) < cfg.band:
        return "near_threshold"
    vals = list(tier_probs.values())
    if len(vals) >= 2 and max(vals) - min(vals) > cfg.disagreement:
        return "disagreement"
    if cfg.random_fraction > 0 and (rng or random).random() < cfg.random_fraction:
        return "random"
    return None


def _row(r: tuple, directory: Path) -> dict[str, Any]:
    return {"id": r[0], "sha256": r[1], "created": r[2], "path": str(directory / r[3]), "file": r[3],
            "prob": r[4], "reason": r[5], "record": json.loads(r[6]), "label": r[7], "bytes": r[8]}


SELECT_ITEMS = "SELECT id, sha256, created, file, prob, reason, record, label, bytes FROM items ORDER BY id"


def read_items(directory: "str | Path") -> list[dict[str, Any]]:
    """Every stored item, oldest first, read without taking the writer (the miner may be running)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if not index.exists():
        raise FileNotFoundError(f"no uncertain-case store at {directory} ({INDEX_FILE} missing)")
    conn = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        return [_row(r, directory) for r in conn.execute(SELECT_ITEMS).fetchall()]
    finally:
        conn.close()


class UncertainStore:
    def __init__(self, directory: "str | Path", *, max_items: int = 2000, max_bytes: Optional[int] = None,
                 max_side: int = 512, max_pending: int = 4, on_saved: Optional[Callable[[], None]] = None,
                 on_dropped: Optional[Callable[[], None]] = None) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1 (or None for no disk budget)")
        self.dir = Path(directory)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_side = max_side
        self.max_pending = max_pending
        self._on_saved = on_saved or (lambda: None)
        self._on_dropped = on_dropped or (lambda: None)
        self._pending = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cascade-store")
        self._conn: Optional[sqlite3.Connection] = None
        # open the database on the writer thread so every statement runs on one thread
        self._pool.submit(self._open).result()

    @classmethod
    def from_config(cls, directory: "str | Path", cfg: StoreConfig, **kwargs: Any) -> "UncertainStore":
        return cls(directory, max_items=cfg.max_items, max_bytes=int(cfg.max_mb * 1024 * 1024),
                   max_side=cfg.max_side, max_pending=cfg.max_pending, **kwargs)

    def _open(self) -> None:
        try:  # Linux applies a nice value to the calling thread only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           min(19, os.getpriority(os.PRIO_PROCESS, 0) + WRITER_NICE))
        except (AttributeError, OSError):
            pass
        (self.dir / "images").mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.dir / INDEX_FILE, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(SCHEMA)
        cols = {r[1] for r in self._conn.execute("PRAGMA table_info(items)")}
        if "bytes" not in cols:  # a store written before the disk budget existed
            self._conn.execute("ALTER TABLE items ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0")
            for row_id, rel, record in self._conn.execute("SELECT id, file, record FROM items").fetchall():
                p = self.dir / rel
                size = (p.stat().st_size if p.exists() else 0) + len(record)
                self._conn.execute("UPDATE items SET bytes = ? WHERE id = ?", (size, row_id))
        self._evict()  # the budget may have been lowered since the last run
        self._conn.commit()

    def submit(self, image: Image.Image, record: Mapping[str, Any], *, prob: float, reason: str) -> Optional[Future]:
        """Queue one item; never blocks. Returns the write's future, or None when dropped."""
        with self._lock:
            if self._pending >= self.max_pending:
                self._on_dropped()
                return None
            self._pending += 1
        try:
            return self._pool.submit(self._write_guarded, image, dict(record), float(prob), reason)
        except RuntimeError:  # pool shut down
            with self._lock:
                self._pending -= 1
            self._on_dropped()
            return None

    def _write_guarded(self, image: Image.Image, record: dict, prob: float, reason: str) -> Optional[int]:
        try:
            return self._write(image, record, prob, reason)
        except Exception as exc:  # a failed write must never reach a request
            logger.warning("uncertain store: could not save an item: {}", exc)
            self._on_dropped()
            return None
        finally:
            with self._lock:
                self._pending -= 1

    def _write(self, image: Image.Image, record: dict, prob: float, reason: str) -> Optional[int]:
        assert self._conn is not None
        img = image.convert("RGB")
        if max(img.size) > self.max_side:
            img = img.copy()
            img.thumbnail((self.max_side, self.max_side), Image.BILINEAR)
        digest = hashlib.sha256(img.tobytes()).hexdigest()
        if self._conn.execute("SELECT 1 FROM items WHERE sha256 = ?", (digest,)).fetchone():
            return None
        rel = f"images/{digest[:2]}/{digest}.jpg"
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="JPEG", quality=90)
        blob = json.dumps(record, default=str)
        size = path.stat().st_size + len(blob)
        cur = self._conn.execute(
            "INSERT INTO items (sha256, created, file, prob, reason, record, bytes) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (digest, time.time(), rel, prob, reason, blob, size))
        self._evict()
        self._conn.commit()
        self._on_saved()
        return int(cur.lastrowid)

    def _evict(self) -> None:
        """Drop the oldest items until both the item cap and the disk budget hold."""
        assert self._conn is not None
        count, total = self._conn.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM items").fetchone()
        if count <= self.max_items and (self.max_bytes is None or total <= self.max_bytes):
            return
        doomed = []
        for row_id, rel, size in self._conn.execute("SELECT id, file, bytes FROM items ORDER BY id ASC"):
            if count <= self.max_items and (self.max_bytes is None or total <= self.max_bytes):
                break
            doomed.append((row_id, rel))
            count -= 1
            total -= size
        for _, rel in doomed:
            (self.dir / rel).unlink(missing_ok=True)
        self._conn.executemany("DELETE FROM items WHERE id = ?", [(r[0],) for r in doomed])

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every queued write has finished (tests, shutdown)."""
        self._pool.submit(lambda: None).result(timeout=timeout)

    def items(self) -> list[dict[str, Any]]:
        """Every stored item, oldest first."""
        def read() -> list[dict[str, Any]]:
            assert self._conn is not None
            return [_row(r, self.dir) for r in self._conn.execute(SELECT_ITEMS).fetchall()]
        return self._pool.submit(read).result()

    def usage(self) -> dict[str, int]:
        """Items held and their bytes (JPEG + record), against the caps."""
        def read() -> tuple[int, int]:
            assert self._conn is not None
            return self._conn.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM items").fetchone()
        count, total = self._pool.submit(read).result()
        return {"items": int(count), "bytes": int(total), "max_items": self.max_items,
                "max_bytes": -1 if self.max_bytes is None else int(self.max_bytes)}

    def close(self) -> None:
        def shut() -> None:
            if self._conn is not None:
                self._conn.commit()
                self._conn.close()
                self._conn = None
        try:
            self._pool.submit(shut).result(timeout=10)
        except RuntimeError:
            pass
        self._pool.shutdown(wait=True)
