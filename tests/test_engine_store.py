"""The uncertain-case store is bounded and never blocks the caller."""

from PIL import Image

from cascade.config import StoreConfig
from cascade.store import UncertainStore, uncertainty_reason


def test_store_evicts_oldest_beyond_max_items(tmp_path):
    store = UncertainStore(tmp_path / "s", max_items=3, max_side=32)
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
