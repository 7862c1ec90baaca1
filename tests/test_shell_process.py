"""The neuron as pm2 runs it: a separate process, stopped by a signal, with clear start errors."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from natix_miner.neuron import port_is_free

ROOT = Path(__file__).resolve().parent.parent
HAZARD = """
miner: {netuid: 72}
artifacts_dir: ./artifacts
tiers:
  - {name: hazard_cues.v1, backend: hazard_cues}
devices: {cpu: {memory_gib: 4}}
"""
NEEDS_HEAD = """
miner: {netuid: 72}
artifacts_dir: ./artifacts
tiers:
  - {name: effnet_lite0.roadwork_head, backend: efficientnet_lite}
devices: {cpu: {memory_gib: 4}}
"""
ALLOWED = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"  # //Bob


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path: Path, config: str, port: int, *extra: str) -> subprocess.Popen:
    (tmp_path / "cfg.yaml").write_text(config)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           # bittensor must not look up a public IP: --local announces 127.0.0.1 itself.
           "BT_AXON_EXTERNAL_IP": "127.0.0.1"}
    cmd = [sys.executable, str(ROOT / "neurons" / "miner.py"), "--local", "--config",
           str(tmp_path / "cfg.yaml"), "--axon.port", str(port), "--allow-hotkey", ALLOWED, *extra]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_listening(proc: subprocess.Popen, port: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"miner exited early ({proc.returncode}): {proc.stderr.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("miner never started listening")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_frees_the_port(tmp_path, sig):
    port = _port()
    proc = _start(tmp_path, HAZARD, port)
    try:
        _wait_listening(proc, port)
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert code == 0, err
    assert port_is_free("127.0.0.1", port)
    assert "miner stopped" in err


def test_missing_head_exits_2_with_the_fix(tmp_path):
    proc = _start(tmp_path, NEEDS_HEAD, _port())
    try:
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert code == 2, err
    assert "natix-miner train --config" in err


def test_bad_config_exits_2_naming_the_key(tmp_path):
    proc = _start(tmp_path, HAZARD.replace("netuid: 72", "netuid: 72, bogus_key: 2"),
                  _port())
    code = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert code == 2 and "miner.bogus_key" in err


def test_help_lists_bittensor_flags():
    out = subprocess.run([sys.executable, str(ROOT / "neurons" / "miner.py"), "--help"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         timeout=60).stdout
    for flag in ("--netuid", "--subtensor.network", "--wallet.name", "--wallet.hotkey",
                 "--axon.port", "--axon.external_ip", "--logging.debug", "--local",
                 "--allow-hotkey", "--config"):
        assert flag in out


def test_tier_start_failures_are_one_clear_line_and_exit_1(capsys):
    from cascade.engine import TierStartError
    from natix_miner.commands.serve import EXIT_FAILED, report_start_failure

    exc = TierStartError("tier big (vlm) failed to start on cuda:0: out of memory")
    assert report_start_failure(exc) == EXIT_FAILED
    assert "error: tier big (vlm) failed to start" in capsys.readouterr().err
    assert report_start_failure(RuntimeError("a bug")) < 0      # unknown errors still raise
