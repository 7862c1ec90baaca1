"""`train --dataset`: Hugging Face datasets built on disk (save_to_disk, parquet), offline:
their own splits, a seeded grouped split, column mapping, streaming, and a head trained from them."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from natix_miner.cli import main
from natix_miner.toolkit.dataset import DatasetError
from natix_miner.toolkit.hf_dataset import Columns, DatasetSource, StreamedItems, grouped_val_mask, load_splits

datasets = pytest.importorskip("datasets")
TIER = "effnet_lite0.tiny"


@pytest.fixture(autouse=True, scope="module")
def _offline(hf_offline):
    yield


def image(rng: np.random.Generator, positive: bool) -> Image.Image:
    a = rng.integers(60, 200, (40, 40, 3)).astype(np.uint8)
    if positive:
        a[10:26, 10:26] = (255, 120, 0)
    return Image.fromarray(a)


def rows(n: int, seed: int, *, label_name: str = "label", groups: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(n)]
    out = {"img": [image(rng, bool(y)) for y in labels], label_name: labels,
           "where": ["cam" if i % 3 else "web" for i in range(n)]}
    if groups:
        out["drive"] = [f"d{i % groups}" for i in range(n)]
    return out


def to_dataset(data: dict):
    features = datasets.Features({"img": datasets.Image(), **{k: datasets.Value("int64") if k.startswith(("label", "y"))
                                                             else datasets.Value("string") for k in data if k != "img"}})
    return datasets.Dataset.from_dict(data, features=features)


COLS = Columns(image="img", label="label", source="where")


def test_saved_dataset_dict_uses_its_own_splits(tmp_path):
    dd = datasets.DatasetDict({"train": to_dataset(rows(12, 0)), "validation": to_dataset(rows(6, 1))})
    dd.save_to_disk(str(tmp_path / "saved"))
    train, val = load_splits(DatasetSource(str(tmp_path / "saved"), columns=COLS), "train", "val")
    assert len(train) == 12 and len(val) == 6
    assert {s.split for s in train} == {"train"} and {s.split for s in val} == {"val"}
    assert train[1].label == 1 and train[1].key.endswith(":train:1") and val[0].key.endswith(":validation:0")
    assert {s.source for s in train} == {"cam", "web"}
    im = train[1].load()
    assert im.mode == "RGB" and im.getpixel((15, 15)) == (255, 120, 0)


def test_seeded_grouped_split_keeps_groups_whole_and_is_reproducible(tmp_path):
    to_dataset(rows(40, 2, groups=10)).to_parquet(str(tmp_path / "one.parquet"))
    src = DatasetSource(str(tmp_path / "one.parquet"), columns=Columns(image="img", group="drive"),
                        val_fraction=0.3)
    train, val = load_splits(src, "train", "val", seed=5)
    again_train, again_val = load_splits(src, "train", "val", seed=5)
    assert [s.key for s in val] == [s.key for s in again_val] and len(train) + len(val) == 40
    drive = {f"hf:{src.name}:train:{i}": f"d{i % 10}" for i in range(40)}
    assert not {drive[s.key] for s in train} & {drive[s.key] for s in val}
    assert {s.label for s in val} == {0, 1} and {s.label for s in train} == {0, 1}
    other = load_splits(src, "train", "val", seed=6)[1]
    assert [s.key for s in other] != [s.key for s in val]


def test_grouped_mask_stratifies_by_group_label():
    labels = np.array([0, 0, 1, 1, 0, 0, 0, 0])
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    mask = grouped_val_mask(labels, groups, 0.5, seed=0)
    for g in np.unique(groups):
        assert len(set(mask[groups == g])) == 1
    assert not mask[groups == 1].any()  # the only positive group stays in training


def test_column_mapping_and_label_errors_are_clear(tmp_path):
    to_dataset(rows(6, 3, label_name="y")).to_parquet(str(tmp_path / "y.parquet"))
    with pytest.raises(DatasetError, match="no column \\['label'\\].*--label-column"):
        load_splits(DatasetSource(str(tmp_path / "y.parquet"), columns=Columns(image="img")), "train", "val")
    train, _ = load_splits(DatasetSource(str(tmp_path / "y.parquet"), columns=Columns(image="img", label="y")),
                           "train", None)
    assert [s.label for s in train] == [0, 1, 0, 1, 0, 1]
    data = rows(4, 3)
    data["label"] = ["none", "roadwork", "none", "roadwork"]
    ds = datasets.Dataset.from_dict(data, features=datasets.Features(
        {"img": datasets.Image(), "label": datasets.Value("string"), "where": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "named"))
    with pytest.raises(DatasetError, match="--positive-label"):
        load_splits(DatasetSource(str(tmp_path / "named"), columns=Columns(image="img")), "train", None)
    train, _ = load_splits(DatasetSource(str(tmp_path / "named"), columns=Columns(image="img", positive="roadwork")),
                           "train", None)
    assert [s.label for s in train] == [0, 1, 0, 1]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("no data here")
    with pytest.raises(DatasetError, match="neither a saved dataset"):
        load_splits(DatasetSource(str(tmp_path / "plain")), "train", None)


def test_streamed_parquet_is_iterable_again_and_holds_out_the_same_rows(tmp_path):
    to_dataset(rows(30, 4, groups=6)).to_parquet(str(tmp_path / "s.parquet"))
    src = DatasetSource(str(tmp_path / "s.parquet"), columns=Columns(image="img", group="drive"), streaming=True)
    train, val = load_splits(src, "train", "val", seed=1)
    assert isinstance(train, StreamedItems) and isinstance(val, list)
    first = [s.key for s in train]
    assert [s.key for s in train] == first and len(train.seen) == len(first)
    assert not set(first) & {s.key for s in val} and len(first) + len(val) == 30
    epoch1 = [s.key for s in train.shuffled(1, buffer_size=8)]
    assert sorted(epoch1) == sorted(first) and epoch1 != first
    assert [s.key for s in train.shuffled(1, buffer_size=8)] == epoch1


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"""
artifacts_dir: {tmp_path / 'artifacts'}
tiers:
  - name: {TIER}
    backend: efficientnet_lite
    options: {{threads: 2, tiles: [], input_size: 64}}
""")
    return cfg


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "streamed"])
def test_train_command_fits_a_head_from_a_dataset(tmp_path, streaming):
    to_dataset(rows(24, 5, label_name="y")).to_parquet(str(tmp_path / "d.parquet"))
    cfg = write_config(tmp_path)
    args = ["train", "--config", str(cfg), "--dataset", str(tmp_path / "d.parquet"), "--image-column", "img",
            "--label-column", "y", "--source-column", "where", "--epochs-of-augmentation", "0",
            "--report", str(tmp_path / "r.json")]
    assert main(args + (["--streaming"] if streaming else [])) == 0
    meta = json.loads((tmp_path / "artifacts" / TIER / "head.json").read_text())
    assert meta["datasets"] == [str(tmp_path / "d.parquet")] and meta["mode"] == "head"
    assert meta["backbone"] is None and len(meta["data_fingerprint"]) == 64
    report = json.loads((tmp_path / "r.json").read_text())[TIER]
    assert report["n_train_images"] + report["val"]["all"]["n"] == 24
    assert report["val"]["all"]["auc"] > 0.9  # an orange square is easy for ImageNet features
    assert set(report["val"]["by_source"]) <= {"cam", "web"}


def test_missing_data_is_a_clear_error(tmp_path):
    cfg = write_config(tmp_path)
    assert main(["train", "--config", str(cfg)]) == 2
    assert main(["train", "--config", str(cfg), "--dataset", str(tmp_path / "nothing-here")]) == 2


def test_finetune_from_a_streamed_dataset(tmp_path):
    """The streamed path of the fine-tuning loop (stream order through a seeded buffer, per-batch
    class weights) trains, scores the held-out rows and writes a servable backbone."""
    to_dataset(rows(20, 6)).to_parquet(str(tmp_path / "d.parquet"))
    cfg = write_config(tmp_path)
    assert main(["train", "--config", str(cfg), "--dataset", str(tmp_path / "d.parquet"), "--image-column",
                 "img", "--streaming", "--mode", "finetune", "--epochs", "1", "--head-init", "untrained",
                 "--no-augment", "--batch", "4", "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())[TIER]
    assert report["finetune"]["epochs_run"] == 1 and report["n_train_images"] + report["val"]["all"]["n"] == 20
    meta = json.loads((tmp_path / "artifacts" / TIER / "head.json").read_text())
    assert meta["backbone"]["kind"] == "state_dict" and meta["mode"] == "finetune"
