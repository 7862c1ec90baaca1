"""`eval` and `calibrate` on a tiny labelled folder with a real CPU tier (hazard cues)."""

import argparse
import asyncio
import json

import numpy as np
import pytest
import yaml

from cascade.calibration import CalibrationSet
from natix_miner.toolkit import evaluation
from natix_miner.toolkit.dataset import load_folder
from tests.test_validator_wire import write_folder

KEYS = {"mcc", "accuracy", "auc", "ece", "reward", "n"}


@pytest.fixture
def setup(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_folder(images, n_per_label=5)
    (images / "broken.jpg").write_bytes(b"not a jpeg")        # skipped with a warning, never fatal
    with open(images / "manifest.csv", "a") as fh:
        fh.write("broken.jpg,1,synthetic-1,val\n")
    cfg = {"artifacts_dir": "artifacts",
           "engine": {"deadline_ms": 4000, "calibration": "artifacts/calibration.json"},
           "tiers": [{"name": "hazard_cues.handset", "backend": "hazard_cues",
                      "expected_latency_ms": 25, "calibration": "platt"}]}
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config, images


def _parse(module, argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    module.add_parser(sub, argv[0])
    return parser.parse_args(argv)


def test_eval_command_writes_the_report_plots_and_predictions(setup, tmp_path, capsys):
    from natix_miner.commands import evaluate

    config, images = setup
    args = _parse(evaluate, ["eval", "--config", str(config), "--images", str(images), "--split",
                             "all", "--era", "mixed", "--json", str(tmp_path / "e.json"),
                             "--out", str(tmp_path / "out"), "--no-progress"])
    assert args.func(args) == 0
    rep = json.loads((tmp_path / "e.json").read_text())
    assert set(rep) == {"cascade", "tiers", "by_source", "by_era", "by_condition", "tier_runs"}
    assert rep["tier_runs"] == {"hazard_cues.handset": 1.0}  # the only tier: it always runs
    assert set(rep["cascade"]) == KEYS and rep["cascade"]["n"] == 10
    assert set(rep["tiers"]) == {"hazard_cues.handset"} and set(rep["tiers"]["hazard_cues.handset"]) == KEYS
    assert set(rep["by_source"]) == {"synthetic-0", "synthetic-1"}
    assert rep["by_source"]["synthetic-1"]["auc"] is None      # one label: undefined, not faked
    assert set(rep["by_era"]) <= {"augmented", "letterbox", "raw"}
    assert sum(m["n"] for m in rep["by_era"].values()) == 10
    c = rep["cascade"]
    assert -1 <= c["mcc"] <= 1 and 0 <= c["accuracy"] <= 1 and 0 <= c["auc"] <= 1
    assert 0 <= c["ece"] <= 1 and 0 <= c["reward"] <= 1
    for name in ("reliability.png", "confusion.png", "predictions.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 100
    lines = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert len(lines) == 11 and "hazard_cues.handset:raw" in lines[0]
    assert "cond:fog_score" in lines[0] and "decision" in lines[0]
    for c, v in rep["by_condition"].items():   # no condition maps in play: both columns agree
        assert v["n_condition_maps"] == 0 and v["pooled"] == v["condition_aware"]
    assert "cascade" in capsys.readouterr().out


async def test_same_view_per_image_and_cache_reuse(setup, tmp_path):
    config, images = setup
    striped = next(s for s in load_folder(images) if s.path.name == "img_1_4.jpg")
    a, ma = evaluation.validator_image(striped, "augmented", 7)
    b, mb = evaluation.validator_image(striped, "augmented", 7)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and ma == mb and a.size == (224, 224)
    others = [evaluation.validator_image(striped, "augmented", s)[1] for s in range(8, 14)]
    assert any(m != ma for m in others)           # another seed, another draw
    r1 = await evaluation.run_eval(config, [images], split="all", era="letterbox", progress=False)
    cache_file = tmp_path / "artifacts" / ".eval_cache" / "tier_outputs.json"
    cached = json.loads(cache_file.read_text())
    assert len(cached) == 10
    r2 = await evaluation.run_eval(config, [images], split="all", era="letterbox", progress=False)
    assert r1 == r2
    assert len(json.loads(cache_file.read_text())) == 10       # all hits, nothing new
    # The second run really reads the cache: overwrite every cached raw output with one constant
    # and the tier's own figures collapse to chance (all ties), while the cascade (never cached)
    # is unchanged.
    assert r1["tiers"]["hazard_cues.handset"]["auc"] != pytest.approx(0.5)
    cache_file.write_text(json.dumps({k: 0.9 for k in cached}))
    r3 = await evaluation.run_eval(config, [images], split="all", era="letterbox", progress=False)
    assert r3["tiers"]["hazard_cues.handset"]["auc"] == pytest.approx(0.5)
    assert r3["cascade"] == r1["cascade"]


def _bad_calibration(path):
    """A current file that is plainly wrong: every probability pushed towards 1."""
    from cascade.calibration import PlattCalibrator

    CalibrationSet({"hazard_cues.handset": PlattCalibrator(1.0, 4.0)}, {"hazard_cues.handset": 1.0}).save(path)


def test_calibrate_writes_the_engine_file_and_reports_holdout(setup, tmp_path, capsys):
    from natix_miner.commands import calibrate

    config, images = setup
    path = tmp_path / "artifacts" / "calibration.json"
    _bad_calibration(path)      # the new fit must beat the file it replaces on held-out ECE
    args = _parse(calibrate, ["calibrate", "--config", str(config), "--images", str(images),
                              "--split", "all", "--era", "letterbox", "--holdout-fraction", "0.4",
                              "--no-progress"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "held-out (4 images)" in out and "t* =" in out and f"written: {path}" in out
    cal = CalibrationSet.load(path)
    assert "hazard_cues.handset" in cal.calibrators
    assert 0 < cal.threshold_map.t_star < 1
    hold = json.loads(path.read_text())["metrics"]["holdout"]
    assert hold["n_fit"] == 6 and hold["n_holdout"] == 4 and not hold["in_sample"]
    assert hold["tiers"]["hazard_cues.handset"]["method"] == "platt"   # the tier's own key
    # the evaluated engine now applies the fitted file
    rep = asyncio.run(evaluation.run_eval(config, [images], split="all", era="letterbox",
                                          progress=False))
    assert rep["cascade"]["n"] == 10


def test_stratified_split_and_limit():
    y = [0] * 10 + [1] * 4
    fit, hold = evaluation.stratified_split(y, 0.3, seed=0)
    assert len(set(fit) & set(hold)) == 0 and len(fit) + len(hold) == 14
    assert sorted(np.asarray(y)[hold].tolist()) == [0, 0, 0, 1]
    fit0, hold0 = evaluation.stratified_split(y, 0.0, seed=0)
    assert hold0.size == 0 and fit0.size == 14


def test_figures_handle_failed_answers_and_one_class():
    f = evaluation.figures([0.9, float("nan"), 0.2, 0.7], [1, 1, 0, 0])
    assert f["n"] == 3 and f["accuracy"] == pytest.approx(2 / 3)
    one = evaluation.figures([0.9, 0.8], [1, 1])
    assert one["auc"] is None and one["reward"] is None and one["accuracy"] == 1.0


def test_balanced_indices_repeat_the_minority_label():
    y = np.array([0, 0, 0, 0, 0, 1, 1])
    rows = evaluation.balanced_indices(y)
    assert np.bincount(y[rows]).tolist() == [5, 5]
    assert sorted(set(rows[y[rows] == 0].tolist())) == [0, 1, 2, 3, 4]
    assert evaluation.balanced_indices(np.array([1, 1])).tolist() == [0, 1]
    # ECE at 50/50: a constant 0.5 is perfectly calibrated there, whatever the folder's mix
    f = evaluation.figures(np.full(7, 0.5), y)
    assert f["ece"] == pytest.approx(0.0) and f["mcc"] == 0.0


@pytest.mark.parametrize("command", ["evaluate", "calibrate"])
def test_missing_head_exits_2_with_the_train_command(setup, tmp_path, capsys, command):
    # Same start-up failure handling as `serve`: the missing artefact and the command that makes it.
    import importlib

    config, images = setup
    cfg = yaml.safe_load(config.read_text())
    cfg["tiers"].insert(0, {"name": "effnet_lite0.untrained", "backend": "efficientnet_lite",
                            "expected_latency_ms": 300})
    config.write_text(yaml.safe_dump(cfg))
    module = importlib.import_module(f"natix_miner.commands.{command}")
    args = _parse(module, [command, "--config", str(config), "--images", str(images), "--split",
                           "all", "--no-progress", "--no-cache"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "effnet_lite0.untrained" in err and "natix-miner train --config" in err


def test_calibrate_that_worsens_held_out_ece_keeps_the_current_file(setup, tmp_path, capsys):
    from natix_miner.commands import calibrate

    config, images = setup
    path = tmp_path / "artifacts" / "calibration.json"
    base = ["calibrate", "--config", str(config), "--images", str(images), "--split", "all",
            "--era", "letterbox", "--no-progress"]

    def run(*extra):
        args = _parse(calibrate, base + list(extra))
        code = args.func(args)
        return code, capsys.readouterr().out

    # The current file: isotonic maps fitted on every image, so on any held-out part of them it is
    # calibrated in-sample (ECE ~0); a Platt fit on 60 % cannot beat that on the other 40 %.
    code, _ = run("--holdout-fraction", "0", "--method", "isotonic", "--force")
    assert code == 0
    before = path.read_bytes()
    code, out = run("--holdout-fraction", "0.4", "--method", "platt")
    assert code == 1 and "NOT written, the current file stays" in out and str(path) in out
    assert path.read_bytes() == before
    code, out = run("--holdout-fraction", "0.4", "--method", "platt", "--force")
    assert code == 0 and "although worse (--force)" in out
    assert path.read_bytes() != before
    assert json.loads(path.read_text())["metrics"]["holdout"]["forced"] is True


def test_calibrate_fits_condition_maps_that_eval_then_compares_with_pooled(setup, tmp_path, capsys):
    from natix_miner.commands import calibrate

    from PIL import Image

    from natix_miner.toolkit.train_augment import fog

    config, images = setup
    with open(images / "manifest.csv", "a") as fh:            # foggy frames of both labels
        for label in (0, 1):
            for i in range(1, 4):
                name = f"fog_{label}_{i}.jpg"
                fog(Image.open(images / f"img_{label}_{i}.jpg"), np.random.default_rng(i)).save(images / name)
                fh.write(f"{name},{label},synthetic-{label},train\n")
    path = tmp_path / "artifacts" / "calibration.json"
    args = _parse(calibrate, ["calibrate", "--config", str(config), "--images", str(images), "--split",
                              "all", "--era", "letterbox", "--holdout-fraction", "0", "--force",
                              "--condition-min-images", "2", "--condition-min-per-label", "1",
                              "--no-progress"])
    assert args.func(args) == 0
    cal = CalibrationSet.load(path)
    out = capsys.readouterr().out
    assert "fog" in cal.conditions and "own t*" in out, out
    rep = asyncio.run(evaluation.run_eval(config, [images], split="all", era="letterbox", progress=False))
    assert sum(v["n_condition_maps"] for v in rep["by_condition"].values()) > 0
    assert rep["by_condition"]["fog"]["n_condition_maps"] > 0
    # the pooled column is exactly the cascade under the same file without its condition maps
    cal.pooled_only().save(tmp_path / "pooled.json")
    pooled = asyncio.run(evaluation.run_eval(config, [images], split="all", era="letterbox",
                                             calibration_path=tmp_path / "pooled.json", progress=False))
    for name in cal.conditions:
        assert rep["by_condition"][name]["pooled"] == pooled["by_condition"][name]["condition_aware"]
