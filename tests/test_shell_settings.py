"""The `miner:` section: defaults, the shipped config, and errors that name file and key."""

import re
from pathlib import Path

import pytest

from cascade.errors import ConfigError
from natix_miner.settings import (DEFAULT_NETUID, MinerSettings, load_settings,
                                  parse_miner_settings)

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_subnet_facts():
    s = parse_miner_settings(None, source="x.yaml")
    assert isinstance(s, MinerSettings)
    assert s.netuid == DEFAULT_NETUID == 72
    assert s.guard.verify_signature and s.guard.require_validator_permit
    assert s.telemetry_port is None
    assert s.synapse_hash_fields == []  # SN72's validators hash no field: off by default


def test_engine_deadline_must_leave_the_validators_9_s(tmp_path):
    text = (ROOT / "configs" / "cpu.yaml").read_text().replace("deadline_ms: 6000", "deadline_ms: 9500")
    path = tmp_path / "late.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert "engine.deadline_ms" in str(err.value) and str(path) in str(err.value)


def test_shipped_cpu_config_loads_both_slices():
    miner, cascade = load_settings(ROOT / "configs" / "cpu.yaml")
    assert miner.netuid == 72
    assert cascade.tiers and cascade.source.endswith("cpu.yaml")


@pytest.mark.parametrize("data,key", [
    ({"netuid": "72"}, "miner.netuid"),
    ({"bogus": 1}, "miner.bogus"),
    ({"fallback_probability": 0.5}, "miner.fallback_probability"),  # the engine's key, not the shell's
    ({"telemetry_port": 70000}, "miner.telemetry_port"),
    ({"guard": {"min_stake": -1}}, "miner.guard.min_stake"),
    ({"guard": {"verify_signature": "yes"}}, "miner.guard.verify_signature"),
    ({"guard": {"allow_hotkeys": ["not-an-address"]}}, "miner.guard.allow_hotkeys[0]"),
    ({"guard": {"rate_limit_per_minute": -3}}, "miner.guard.rate_limit_per_minute"),
    ({"decode": {"max_pixels": 0}}, "miner.decode.max_pixels"),
    ({"decode": {"formats": ["JPEG", "HEIC"]}}, "miner.decode.formats[1]"),
    ({"decode": {"max_side": 10}}, "miner.decode.max_side"),
    ({"decode": {"timeout_ms": 0}}, "miner.decode.timeout_ms"),
    ({"decode": {"max_decoded_mib": 0}}, "miner.decode.max_decoded_mib"),
    ({"guard": {"clock_skew_s": -1}}, "miner.guard.clock_skew_s"),
    ({"guard": {"max_request_age_s": 0}}, "miner.guard.max_request_age_s"),
    ({"guard": {"resync_min_interval_s": 0}}, "miner.guard.resync_min_interval_s"),
    ({"server": {"header_timeout_s": 0}}, "miner.server.header_timeout_s"),
    ({"server": {"max_header_bytes": 100}}, "miner.server.max_header_bytes"),
    ({"server": {"max_connections": 0}}, "miner.server.max_connections"),
    ({"synapse_hash_fields": ["prediction"]}, "miner.synapse_hash_fields[0]"),
    ({"metagraph_fail_alert": 0}, "miner.metagraph_fail_alert"),
    ({"max_concurrent_forwards": -1}, "miner.max_concurrent_forwards"),
    ({"malloc_arena_max": -1}, "miner.malloc_arena_max"),
])
def test_errors_name_file_and_key(data, key):
    with pytest.raises(ConfigError) as info:
        parse_miner_settings(data, source="my.yaml")
    assert info.value.source == "my.yaml"
    assert info.value.key == key
    assert "my.yaml" in str(info.value) and key in str(info.value)


def test_miner_section_in_a_file(tmp_path):
    cfg = (ROOT / "configs" / "cpu.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(re.sub(r"^miner:.*$", "miner:\n  metagraph_resync_s: 0", cfg, count=1,
                          flags=re.MULTILINE).replace("  metagraph_resync_s: 600", "  # removed"))
    with pytest.raises(ConfigError) as info:
        load_settings(bad)
    assert info.value.key == "miner.metagraph_resync_s" and str(bad) in str(info.value)
