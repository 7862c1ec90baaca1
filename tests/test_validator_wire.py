"""`validate` against a running local miner: the shell's real neuron, a real tier, the real wire."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cascade.config import parse_cascade_config
from natix_miner.neuron import BackgroundMiner, Miner, NeuronOptions
from natix_miner.settings import MinerSettings
from natix_miner.toolkit.validator import ValidationError, parse_axon, resolve_miner_hotkey, run_validation


def write_folder(root, n_per_label: int = 3):
    """A tiny labelled folder: orange/white striped barriers (1) and plain grey roads (0)."""
    rows = ["path,label,source,split"]
    rng = np.random.default_rng(0)
    for label in (0, 1):
        for i in range(n_per_label):
            img = Image.new("RGB", (320, 200), (110, 110, 115))
            d = ImageDraw.Draw(img)
            d.rectangle((0, 120, 320, 200), fill=(70, 70, 72))
            if label:
                for k in range(6):
                    x = 40 + 40 * k + int(rng.integers(0, 10))
                    d.rectangle((x, 90, x + 18, 150), fill=(255, 110, 0) if k % 2 else (250, 250, 250))
            name = f"img_{label}_{i}.jpg"
            img.save(root / name, quality=90)
            rows.append(f"{name},{label},{'synthetic-' + str(label)},{'val' if i == 0 else 'train'}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def hazard_cascade(tmp_path):
    data = {"artifacts_dir": str(tmp_path / "artifacts"),
            "engine": {"deadline_ms": 4000},
            "tiers": [{"name": "hazard_cues.handset", "backend": "hazard_cues",
                       "expected_latency_ms": 25}]}
    return parse_cascade_config(data, source="<test>", base_dir=str(tmp_path))


@pytest.fixture
def local_miner(tmp_path, free_port, make_wallet):
    validator = make_wallet("validator")
    opts = NeuronOptions(netuid=72, axon_port=free_port, local=True,
                         allow_hotkeys=(validator.hotkey.ss58_address,), rate_limit_per_minute=0)
    miner = Miner(MinerSettings(), hazard_cascade(tmp_path), opts)
    with BackgroundMiner(miner):
        yield miner, validator


async def test_validate_scores_a_running_local_miner(tmp_path, local_miner):
    miner, validator = local_miner
    images = tmp_path / "images"
    images.mkdir()
    write_folder(images)
    rep = await run_validation(miner.address, images, "mixed", 12, 3, hotkey=miner.hotkey,
                               wallet=validator, json_path=tmp_path / "r.json",
                               png_path=tmp_path / "r.png", progress=False)
    assert rep["n"] == 12 and len(rep["rounds"]) == 12
    assert rep["overall"]["invalid"] == 0, rep["first_error"]
    assert rep["status_codes"] == {"200": 12}
    for r in rep["rounds"]:
        assert 0.0 <= r["prediction"] <= 1.0 and 0.0 <= r["reward"] <= 1.0
        assert r["era"] in ("augmented", "letterbox", "raw")
    assert 0.0 <= rep["overall"]["final_score"] <= 1.0
    assert rep["overall"]["latency_p50_ms"] > 0
    assert set(rep["by_era"]) <= {"augmented", "letterbox", "raw"}
    assert sum(s["n"] for s in rep["by_era"].values()) == 12
    assert json.loads((tmp_path / "r.json").read_text())["miner_hotkey"] == miner.hotkey
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert miner.forward_calls == 12

    # a caller the miner's guard does not know gets no answer: every round invalid, reward 0
    refused = await run_validation(miner.address, images, "letterbox", 3, 0, hotkey=miner.hotkey,
                                   progress=False)
    assert refused["overall"]["invalid"] == 3 and refused["overall"]["reward"] == 0.0
    assert refused["first_error"] is not None and "200" not in refused["status_codes"]


async def test_validator_scores_every_round_timeouts_and_nan_included(tmp_path, make_wallet, monkeypatch):
    """The local validator hands every response to the validator's bookkeeping as it came back:
    a timeout (-1) takes a slot in the windows (here of 4 and 2 rounds) and a NaN zeroes the
    windows holding it, so the two timeouts push the NaN out of the window one round early."""
    from types import SimpleNamespace

    from natix_miner.toolkit import validator as val
    from natix_miner.toolkit.scoring import ScoringRules

    images = tmp_path / "images"
    images.mkdir()
    write_folder(images)
    script = [(1, 0.9), (0, 0.1), (1, float("nan")), (1, -1.0), (0, -1.0), (0, 0.1), (1, 0.9)]
    answers = iter(a for _, a in script)

    class ScriptedDendrite:
        async def forward(self, axons, synapse, timeout, deserialize):
            got = next(answers)
            return [SimpleNamespace(prediction=got, dendrite=SimpleNamespace(
                status_code=408 if got == -1.0 else 200, status_message=""))]

        async def aclose_session(self):
            pass

    monkeypatch.setattr(val, "make_dendrite", lambda wallet, ip: ScriptedDendrite())
    drawn = []
    real_draw = val.ch.draw_challenge

    def draw(pools, era, rng, label=None):    # the labels the script answers
        drawn.append(real_draw(pools, era, rng, label=script[len(drawn)][0]))
        return drawn[-1]

    monkeypatch.setattr(val.ch, "draw_challenge", draw)
    rep = await run_validation("127.0.0.1:1", images, "letterbox", len(script), 0, hotkey="5" * 48,
                               wallet=make_wallet("v"), progress=False,
                               rules=ScoringRules(window=4, short_window=2))
    rounds = rep["rounds"]
    assert [r["valid"] for r in rounds] == [True, True, False, False, False, True, True]
    # 1: one class -> MCC 0, acc 1; 2: perfect; 3: NaN; 4, 5: timeouts; 6: the window of 4 still
    # holds the NaN (MCC 0), the window of 2 holds one right answer; 7: the window of 4 is rounds
    # 4-7, the NaN is out: perfect. (Leaving the -1s out would keep the NaN in and pay 0.125.)
    assert [r["reward"] for r in rounds] == [0.125, 1.0, 0.0, 0.0, 0.0, 0.125, 1.0]
    assert [r["zeroed"] for r in rounds] == [False, False, True, True, True, True, False]
    assert rounds[6]["mcc_window"] == 1.0 and rounds[5]["accuracy_window"] == 1.0
    assert rep["overall"]["invalid"] == 3


def test_validate_command_end_to_end(tmp_path, local_miner, capsys):
    from natix_miner.commands import validate

    miner, validator = local_miner
    images = tmp_path / "images"
    images.mkdir()
    write_folder(images)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    validate.add_parser(sub, "validate")
    args = parser.parse_args([
        "validate", "--axon", miner.address, "--images", str(images), "--era", "augmented",
        "--n", "4", "--split", "all", "--hotkey", miner.hotkey,
        "--wallet.name", validator.name, "--wallet.hotkey", validator.hotkey_str,
        "--wallet.path", validator.path, "--json", str(tmp_path / "v.json"), "--no-progress"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "augmented" in out and "final score" in out
    rep = json.loads((tmp_path / "v.json").read_text())
    assert rep["overall"]["invalid"] == 0 and set(rep["by_era"]) == {"augmented"}


def test_axon_address_and_hotkey_resolution(tmp_path, make_wallet):
    assert parse_axon("127.0.0.1:8091") == ("127.0.0.1", 8091)
    for bad in ("8091", "host:", "host:99999", ":80"):
        with pytest.raises(ValidationError):
            parse_axon(bad)
    w = make_wallet("minerwallet")
    assert resolve_miner_hotkey("127.0.0.1", 1, wallet_name="minerwallet", wallet_hotkey="miner",
                                wallet_path=w.path) == w.hotkey.ss58_address
    assert resolve_miner_hotkey("127.0.0.1", 1, hotkey="5Fabc") == "5Fabc"
    with pytest.raises(ValidationError, match="--hotkey"):
        resolve_miner_hotkey("127.0.0.1", 1)


def test_unreadable_miner_wallet_and_unknown_host_are_validation_errors(tmp_path):
    with pytest.raises(ValidationError, match="cannot read hotkey"):
        resolve_miner_hotkey("127.0.0.1", 1, wallet_name="absent", wallet_path=str(tmp_path))
    with pytest.raises(ValidationError, match="cannot resolve"):
        resolve_miner_hotkey("no-such-host.invalid", 1, network="test", netuid=323)
