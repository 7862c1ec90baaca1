"""scripts/gpu_check.sh's CPU dry run: the same steps the GPU check runs, on two tiny tiers."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_on_cpu(tmp_path, capsys, monkeypatch):
    loader = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    check = importlib.util.module_from_spec(loader)
    monkeypatch.setitem(sys.modules, "gpu_check", check)
    loader.loader.exec_module(check)
    out = tmp_path / "check.json"
    rc = check.main(["--device", "cpu", "--repeats", "1", "--requests", "4", "--json", str(out),
                     "--tiers", "vit.tiny", "clip.tiny", "--workdir", str(tmp_path / "work")])
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads(out.read_text())
    tiers = {t["name"]: t for t in report["tiers"]}
    assert set(tiers) == {"vit.tiny", "clip.tiny"} and all(t["ok"] for t in tiers.values())
    assert tiers["vit.tiny"]["params"] > 0  # counted from the tiny checkpoint's config
    assert all(t["bs1_p50_ms"] is not None and t["max_p99_ms"] is not None for t in tiers.values())
    single, split = report["engines"]
    assert single["ok"] and single["full_cascade"] == 4 and not single["two_devices"]
    assert split["ok"] and set(split["logical"].values()) == {"cuda:0", "cuda:1"}  # really split
    assert "engine, 2 logical devices" in text and "gpu check passed" in text
    assert check.main(["--device", "cpu", "--tiers", "nope", "--workdir", str(tmp_path / "w2")]) == 2
