"""The uncertain-case store is bounded and never blocks the caller."""

from PIL import Image

from cascade.config import StoreConfig
from cascade.store import UncertainStore, uncertainty_reason


def test_store_evicts_oldest_beyond_max_items(tmp_path):
    store = UncertainStore(tmp_path / "s", max_items=3, max_side=32, max_pending=8)
    try:
        for i in range(5):
            fut = store.submit(Image.new("RGB", (100, 60), (i * 40, 0, 0)), {"tier_probs": {"a": 0.5}},
                               prob=0.5, reason="near_threshold")
            assert fut is not None
        store.flush()
        items = store.items()
        assert len(items) == 3
        assert [it["record"]["tier_probs"]["a"] for it in items] == [0.5] * 3
        files = list((tmp_path / "s" / "images").rglob("*.jpg"))
        assert len(files) == 3
        assert max(Image.open(items[-1]["path"]).size) <= 32
        # a duplicate image is stored once
        store.submit(Image.new("RGB", (100, 60), (160, 0, 0)), {}, prob=0.5, reason="near_threshold")
        store.flush()
        assert len(store.items()) == 3
    finally:
        store.close()


def test_full_queue_drops_instead_of_blocking(tmp_path):
    dropped = []
    store = UncertainStore(tmp_path / "s", max_items=10, max_pending=0, on_dropped=lambda: dropped.append(1))
    try:
        assert store.submit(Image.new("RGB", (8, 8)), {}, prob=0.5, reason="x") is None
        assert dropped == [1]
    finally:
        store.close()


def test_uncertainty_reason():
    cfg = StoreConfig(band=0.1, disagreement=0.6)
    assert uncertainty_reason(0.55, {"a": 0.55}, cfg) == "near_threshold"
    assert uncertainty_reason(0.9, {"a": 0.95, "b": 0.2}, cfg) == "disagreement"
    assert uncertainty_reason(0.9, {"a": 0.95, "b": 0.8}, cfg) is None


def _noise(seed, size=(200, 150)):
    import numpy as np

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype="uint8"))


def test_disk_budget_evicts_the_oldest_until_it_fits(tmp_path):
    store = UncertainStore(tmp_path / "s", max_items=100, max_bytes=10 ** 9, max_pending=16)
    try:
        for i in range(6):
            store.submit(_noise(i), {"i": i}, prob=0.5, reason="near_threshold")
        store.flush()
        sizes = [it["bytes"] for it in store.items()]
        assert len(sizes) == 6 and min(sizes) > 1000      # noise JPEGs: tens of kB each
    finally:
        store.close()
    budget = sum(sizes[-2:]) + 10                          # room for the two newest only
    store = UncertainStore(tmp_path / "s", max_items=100, max_bytes=budget)  # budget lowered: evicts at open
    try:
        kept = store.items()
        assert [it["record"]["i"] for it in kept] == [4, 5]
        assert store.usage()["bytes"] <= budget
        assert len(list((tmp_path / "s" / "images").rglob("*.jpg"))) == 2
    finally:
        store.close()


def test_a_store_from_before_the_budget_is_migrated_and_readable_while_open(tmp_path):
    import sqlite3

    d = tmp_path / "old"
    (d / "images").mkdir(parents=True)
    conn = sqlite3.connect(d / "index.sqlite")
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT UNIQUE NOT NULL, "
                 "created REAL NOT NULL, file TEXT NOT NULL, prob REAL NOT NULL, reason TEXT NOT NULL, "
                 "record TEXT NOT NULL, label INTEGER)")
    _noise(0).save(d / "images" / "a.jpg")
    conn.execute("INSERT INTO items (sha256, created, file, prob, reason, record) VALUES "
                 "('aa', 1.0, 'images/a.jpg', 0.5, 'near_threshold', '{}')")
    conn.commit()
    conn.close()
    store = UncertainStore(d)
    try:
        store.submit(_noise(1), {"new": True}, prob=0.45, reason="near_threshold")
        store.flush()
        from cascade.store import read_items

        rows = read_items(d)                               # a second, read-only reader
        assert [r["bytes"] > 0 for r in rows] == [True, True] and rows[1]["record"] == {"new": True}
    finally:
        store.close()


def test_random_share_of_confident_answers():
    import random

    cfg = StoreConfig(band=0.1, random_fraction=0.5)
    rng = random.Random(0)
    got = [uncertainty_reason(0.95, {"a": 0.95}, cfg, rng=rng) for _ in range(400)]
    assert 150 < got.count("random") < 250 and set(got) <= {"random", None}
    assert uncertainty_reason(0.95, {"a": 0.95}, StoreConfig(), rng=rng) is None


async def test_store_is_on_by_default_and_a_slow_disk_never_delays_an_answer(tmp_path, monkeypatch):
    import threading
    import time

    from cascade import store as store_mod
    from cascade.config import StoreConfig as SC, without_store
    from tests.test_engine_core import image, make_engine

    assert SC().enabled
    release = threading.Event()
    original = store_mod.UncertainStore._write

    def slow_write(self, *a, **k):                         # a disk that hangs until released
        release.wait(10)
        return original(self, *a, **k)

    monkeypatch.setattr(store_mod.UncertainStore, "_write", slow_write)
    eng, _ = make_engine(tmp_path, {"fast.a": {"prob": 0.52}},
                         engine={"store": {"dir": str(tmp_path / "u"), "max_pending": 2}})
    assert without_store(eng.config).engine.store.enabled is False
    async with eng:
        assert eng.store is not None                       # on without asking
        t0 = time.monotonic()
        for k in range(6):
            res = await eng.predict(image(k + 1))
            assert round(res.prob) == 1
        elapsed = time.monotonic() - t0
        dropped = eng.telemetry.store_dropped._value.get()
        release.set()
        eng.store.flush()
        kept = len(eng.store.items())
    assert elapsed < 2.0                                   # six answers, none waited on the disk
    assert dropped == 4 and kept == 2                      # 2 queued, the rest dropped and counted
