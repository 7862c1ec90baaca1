"""Malformed cascade configs are refused with the file, the key and what was expected."""

import pytest
import yaml

from cascade.config import load_cascade_config
from cascade.errors import ConfigError

TIER = {"name": "fast.a", "backend": "hazard_cues"}


def load(tmp_path, data):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_cascade_config(path)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'tiers\[0\].max_batch'") as info:
        load(tmp_path, {"tiers": [{**TIER, "max_batch": 4}]})
    assert "unknown key" in str(info.value)


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'engine.deadline_ms': expected a number, got 'fast'"):
        load(tmp_path, {"engine": {"deadline_ms": "fast"}, "tiers": [TIER]})
    for bad in (0, float("nan"), float("inf")):  # the deadline guarantee needs a finite budget
        with pytest.raises(ConfigError, match=r"key 'engine.deadline_ms'"):
            load(tmp_path, {"engine": {"deadline_ms": bad}, "tiers": [TIER]})
    with pytest.raises(ConfigError, match=r"key 'tiers\[0\].calibration'"):
        load(tmp_path, {"tiers": [{**TIER, "calibration": "beta"}]})
    with pytest.raises(ConfigError, match=r"key 'devices.cuda:0.memory_gib'"):
        load(tmp_path, {"tiers": [TIER], "devices": {"cuda:0": {"memory_gib": "80GB"}}})


def test_missing_tiers_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"bad.yaml: key 'tiers': expected a non-empty list"):
        load(tmp_path, {"engine": {}})


def test_new_sections_have_defaults(tmp_path):
    cfg = load(tmp_path, {"tiers": [TIER], "engine": {"conditions": {"night_luminance": 0.2}}})
    assert cfg.engine.conditions.night_luminance == 0.2
    assert cfg.tiers[0].calibration == "temperature"
    assert cfg.devices["cpu"].context_overhead_gib is None


def test_default_cpu_config_loads():
    cfg = load_cascade_config("configs/cpu.yaml")
    assert cfg.active_tiers and cfg.engine.deadline_ms < 9000


@pytest.mark.parametrize("typo", ["engin", "routr", "artifact_dir", "tier"])
def test_unknown_top_level_key_is_refused(tmp_path, typo):
    """A typo at the top would leave a whole section on its defaults without a word."""
    with pytest.raises(ConfigError, match=rf"bad.yaml: key '{typo}': expected one of .*'engine'") as info:
        load(tmp_path, {"tiers": [TIER], typo: {}})
    assert "unknown top-level key" in str(info.value) and "'miner'" in str(info.value)


def test_every_shipped_config_loads_with_its_miner_section():
    from pathlib import Path

    from natix_miner.settings import load_settings
    for path in sorted(Path("configs").glob("*.yaml")):
        miner, cascade = load_settings(path)
        assert cascade.active_tiers, path
