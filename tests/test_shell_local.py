"""`natix-miner local` end to end on a tiny synthetic folder: serve --local + built-in validator."""

import argparse
import json

import numpy as np
from PIL import Image

from natix_miner.commands import local

CONFIG = """
miner: {netuid: 72}
artifacts_dir: ./artifacts
tiers:
  - {name: hazard_cues.handset, backend: hazard_cues}
devices: {cpu: {memory_gib: 4}}
"""


def _folder(root):
    rng = np.random.default_rng(0)
    for sub, orange in (("roadwork", True), ("no_roadwork", False)):
        (root / sub).mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(40, 160, (120, 160, 3), dtype=np.uint8)
            if orange:
                arr[60:110, 40:80] = (255, 110, 0)
            Image.fromarray(arr).save(root / sub / f"{i}.jpg", quality=90)
    return root


def test_local_runs_to_its_report(tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    images = _folder(tmp_path / "images")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    local.add_parser(sub, "local")
    args = parser.parse_args(["local", "--config", str(tmp_path / "cfg.yaml"), "--images",
                              str(images), "-n", "6", "--split", "all",
                              "--json", str(tmp_path / "report.json")])
    assert args.era == "mixed"
    assert args.func(args) == 0
    overall = json.loads((tmp_path / "report.json").read_text())["overall"]
    assert overall["n"] == 6 and overall["invalid"] == 0, overall
    assert -1.0 <= overall["mcc"] <= 1.0 and overall["latency_p50_ms"] > 0
    out = capsys.readouterr().out
    assert "MCC" in out  # the printed table
    # ...and it ends with how to read the score and what to run next
    assert out.rstrip().splitlines()[-2].startswith("How to read it: reward is what one validator")
    assert out.rstrip().splitlines()[-1].startswith("Next: ")


def test_png_title_names_the_data_set(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from unittest import mock

    from natix_miner.toolkit import plots

    (tmp_path / "cfg.yaml").write_text(CONFIG)
    images = _folder(tmp_path / "roadwork-set")
    parser = argparse.ArgumentParser()
    local.add_parser(parser.add_subparsers(), "local")
    args = parser.parse_args(["local", "--config", str(tmp_path / "cfg.yaml"), "--images",
                              str(images), "-n", "4", "--split", "all", "--png",
                              str(tmp_path / "r.png")])
    with mock.patch.object(plots, "plot_validation", wraps=plots.plot_validation) as plot:
        assert args.func(args) == 0
    title = plot.call_args.kwargs["title"]
    assert title.startswith("roadwork-set (all split), era mixed, 4 challenges") and "127.0.0.1" not in title
