"""The learning loop end to end on tiny images, with the real CPU tier:
answers -> store -> `store export` -> `store label` -> `train` -> the retrained head answers the
stored images differently. Plus the labelling flows and the loader's view of an exported folder."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cascade.config import load_cascade_config
from cascade.engine import CascadeEngine
from models.registry import build_tier
from natix_miner.cli import main
from natix_miner.toolkit import store_folder
from natix_miner.toolkit.dataset import DatasetError, load_folder
from natix_miner.toolkit.training import run_training
from tests.test_cpumodel_train import road

TIER = "effnet_lite0.roadwork_head"


def barriers(rng: np.random.Generator) -> Image.Image:
    """Roadwork the first head never saw: blue-and-white barrier boards instead of orange cones."""
    im = road(rng, False)
    d = ImageDraw.Draw(im)
    y = int(rng.integers(150, 190))
    for _ in range(int(rng.integers(3, 6))):
        x = int(rng.integers(10, 260))
        for j in range(4):
            d.rectangle([x + 12 * j, y, x + 12 * j + 11, y + 22], fill=(20, 60, 230) if j % 2 else (245, 245, 245))
        d.rectangle([x, y + 22, x + 4, y + 40], fill=(40, 40, 40))
        d.rectangle([x + 44, y + 22, x + 48, y + 40], fill=(40, 40, 40))
    return im


@pytest.fixture
def loop(tmp_path):
    roads = tmp_path / "roads"
    rng = np.random.default_rng(7)
    for sub, cones in (("roadwork", True), ("no_roadwork", False)):
        (roads / sub).mkdir(parents=True)
        for i in range(10):
            road(rng, cones).save(roads / sub / f"{sub}_{i:02d}.jpg", quality=90)
    cfg = tmp_path / "cpu.yaml"
    # band 0.5 keeps every answer: the test must not depend on where the first head lands
    cfg.write_text(f"""
artifacts_dir: {tmp_path / 'artifacts'}
engine:
  store: {{dir: {tmp_path / 'store'}, band: 0.5}}
tiers:
  - name: {TIER}
    backend: efficientnet_lite
    options: {{threads: 1, tiles: []}}
""")
    return cfg, roads


async def answer(cfg: Path, images: list[Image.Image]):
    engine = CascadeEngine(load_cascade_config(cfg), build_tier)
    async with engine:
        results = [await engine.predict(im) for im in images]
        if engine.store is not None:
            engine.store.flush()
    return results


async def test_answers_store_export_label_train_change_the_answer(loop, tmp_path, capsys):
    cfg, roads = loop
    run_training(cfg, [roads], split="all", val_split=None, augment_copies=0, seed=0)
    rng = np.random.default_rng(1)
    new = [barriers(rng) for _ in range(6)]
    before = await answer(cfg, new)

    out = tmp_path / "labelled"
    assert main(["store", "export", "--config", str(cfg), "--out", str(out), "--val-fraction", "0"]) == 0
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and all(r["label"] == "" and r["source"] == "miner-store" for r in rows)
    assert {f"raw:{TIER}", f"cal:{TIER}", "cond:night", "cond:rain_score", "answer", "reason"} <= set(rows[0])
    assert sorted(float(r["answer"]) for r in rows) == pytest.approx(sorted(r.prob for r in before), abs=1e-5)
    with pytest.raises(DatasetError, match="labelled yet"):
        load_folder(out)                              # nothing labelled: not yet a training folder

    # a person looks at them: all six are roadwork
    args = ["store", "label", str(out)] + sum([["--set", f"{r['sha256'][:10]}=1"] for r in rows], [])
    assert main(args) == 0 and "6 of 6 labelled" in capsys.readouterr().out

    assert main(["train", "--config", str(cfg), "--images", str(roads), "--images", str(out),
                 "--split", "all", "--val-split", "none", "--epochs-of-augmentation", "0"]) == 0
    stored = [Image.open(out / r["path"]).convert("RGB") for r in rows]
    after = await answer(cfg, stored)
    wrong_before = [i for i, r in enumerate(rows) if round(float(r["answer"])) == 0]
    assert wrong_before, [r["answer"] for r in rows]  # the first head missed some of the new look
    assert all(round(after[i].prob) == 1 for i in wrong_before), [a.prob for a in after]


def _folder(tmp_path, n=3):
    """An exported-looking folder without running a model."""
    folder = tmp_path / "exp"
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        sha = f"{i:02d}" + "ab" * 31
        Image.new("RGB", (32, 24), (40 * i, 90, 90)).save(folder / "images" / f"{sha}.jpg")
        rows.append({"path": f"images/{sha}.jpg", "label": "", "source": "miner-store", "split": "train",
                     "sha256": sha, "answer": "0.5", "reason": "near_threshold", "raw:t": "0.5",
                     "cond:night": "0"})
    store_folder.write_manifest(folder, list(rows[0]), rows)
    return folder, rows


def test_interactive_labelling_saves_each_answer_and_can_go_back(tmp_path):
    folder, rows = _folder(tmp_path)
    answers = iter(["1", "x", "b", "0", "s", "q"])
    said = []
    got = store_folder.label_interactively(folder, ask=lambda _: next(answers), say=said.append)
    assert got == {"labelled": 1, "left": 2}
    _, now = store_folder.read_manifest(folder)
    assert [r["label"] for r in now] == ["0", "", ""]            # 1, then back, then 0; skip; quit
    assert any("answer 1, 0, s, b or q" in s for s in said)
    samples = load_folder(folder)                                  # labelled rows load, others wait
    assert [s.label for s in samples] == [0] and samples[0].source == "miner-store"


def test_labels_by_key_from_csv_and_contact_sheet(tmp_path):
    folder, rows = _folder(tmp_path)
    assert main(["store", "label", str(folder), "--sheet", str(tmp_path / "sheet.png")]) == 0
    assert Image.open(tmp_path / "sheet.png").size[0] >= 3 * 100
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label\n{rows[1]['path']},1\n")
    assert main(["store", "label", str(folder), "--from", str(labels), "--set", f"{rows[2]['sha256'][:8]}=0"]) == 0
    _, now = store_folder.read_manifest(folder)
    assert [r["label"] for r in now] == ["", "1", "0"]
    assert main(["store", "label", str(folder), "--set", "abab=1"]) == 2      # too short a key
    assert main(["store", "label", str(folder), "--set", f"{rows[0]['sha256'][:8]}=maybe"]) == 2
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        store_folder.set_labels(folder, {rows[0]["sha256"][:8]: "maybe"})


async def test_export_again_keeps_labels_and_store_rows_hold_no_caller(loop, tmp_path):
    cfg, _ = loop
    # no head needed: the hazard-cue tier answers; the store keeps what the engine knows, no caller
    cfg.write_text(cfg.read_text().replace("backend: efficientnet_lite", "backend: hazard_cues")
                   .replace("options: {threads: 1, tiles: []}", "options: {}"))
    await answer(cfg, [road(np.random.default_rng(i), i % 2 == 0) for i in range(3)])
    from cascade.store import read_items

    items = read_items(tmp_path / "store")
    assert len(items) == 3
    assert set(items[0]["record"]) == {"tier_probs", "raw_probs", "fused", "conditions", "failed",
                                       "evidence", "stopped_after", "decision"}
    out = tmp_path / "exp"
    store_folder.export_store(tmp_path / "store", out, val_fraction=0.0)
    _, rows = store_folder.read_manifest(out)
    store_folder.set_labels(out, {rows[0]["sha256"][:12]: 1})
    await answer(cfg, [road(np.random.default_rng(9), True)])
    got = store_folder.export_store(tmp_path / "store", out, val_fraction=0.0)
    assert got == {"added": 1, "rows": 4, "labelled": 1, "missing": 0}
    _, rows = store_folder.read_manifest(out)
    assert rows[0]["label"] == "1" and all(r["label"] == "" for r in rows[1:])
    assert main(["store", "info", "--config", str(cfg)]) == 0
