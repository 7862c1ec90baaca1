"""Bounded on-disk store of uncertain inputs, for later labelling (active learning).

An answer whose fused probability lands near the threshold, or whose tiers disagree strongly, is
exactly the image a person should label next. The engine hands such images to `submit`, which
returns at once: a single writer thread downscales, hashes and writes the JPEG and its SQLite row
(tier outputs, conditions, time), then evicts the oldest items beyond `max_items`. A full queue
drops the item (counted) rather than delaying an answer or growing memory.
"""

import hashlib
import json
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
    label INTEGER
)
"""


def uncertainty_reason(fused: float, tier_probs: Mapping[str, float], cfg: StoreConfig,
                       threshold: float = 0.5) -> Optional[str]:
    """Why this answer is worth labelling ("near_threshold", "disagreement"), or None."""
    if abs(fused - threshold) < cfg.band:
        return "near_threshold"
    vals = list(tier_probs.values())
    if len(vals) >= 2 and max(vals) - min(vals) > cfg.disagreement:
        return "disagreement"
    return None


class UncertainStore:
    def __init__(self, directory: "str | Path", *, max_items: int = 2000, max_side: int = 512,
                 max_pending: int = 32, on_saved: Optional[Callable[[], None]] = None,
                 on_dropped: Optional[Callable[[], None]] = None) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self.dir = Path(directory)
        self.max_items = max_items
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

    def _open(self) -> None:
        (self.dir / "images").mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.dir / "index.sqlite", check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(SCHEMA)
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
        digest = hashlib.sha256(image.tobytes()).hexdigest()
        if self._conn.execute("SELECT 1 FROM items WHERE sha256 = ?", (digest,)).fetchone():
            return None
        rel = f"images/{digest[:2]}/{digest}.jpg"
        path = self.dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="JPEG", quality=90)
        cur = self._conn.execute(
            "INSERT INTO items (sha256, created, file, prob, reason, record) VALUES (?, ?, ?, ?, ?, ?)",
            (digest, time.time(), rel, prob, reason, json.dumps(record, default=str)))
        self._evict()
        self._conn.commit()
        self._on_saved()
        return int(cur.lastrowid)

    def _evict(self) -> None:
        assert self._conn is not None
        (count,) = self._conn.execute("SELECT COUNT(*) FROM items").fetchone()
        excess = count - self.max_items
        if excess <= 0:
            return
        rows = self._conn.execute("SELECT id, file FROM items ORDER BY id ASC LIMIT ?", (excess,)).fetchall()
        for row_id, rel in rows:
            (self.dir / rel).unlink(missing_ok=True)
        self._conn.executemany("DELETE FROM items WHERE id = ?", [(r[0],) for r in rows])

    def flush(self, timeout: Optional[float] = None) -> None:
        """Wait until every queued write has finished (tests, shutdown)."""
        self._pool.submit(lambda: None).result(timeout=timeout)

    def items(self) -> list[dict[str, Any]]:
        """Every stored item, oldest first (for the labelling tool)."""
        def read() -> list[dict[str, Any]]:
            assert self._conn is not None
            rows = self._conn.execute(
                "SELECT id, sha256, created, file, prob, reason, record, label FROM items ORDER BY id").fetchall()
            return [{"id": r[0], "sha256": r[1], "created": r[2], "path": str(self.dir / r[3]),
                     "prob": r[4], "reason": r[5], "record": json.loads(r[6]), "label": r[7]} for r in rows]
        return self._pool.submit(read).result()

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
