"""The live (chain) path without a chain: registration check, axon serve, metagraph re-sync.

A stand-in for the subtensor answers the three calls the neuron makes; the axon, dendrite,
guard and engine are the real ones.
"""

import asyncio
import base64
import io
import socket
import time

import numpy as np
import pytest
from PIL import Image

import bittensor as bt
from natix_miner.neuron import BackgroundMiner, Miner, NeuronOptions, NotRegisteredError, throwaway_wallet
from natix_miner.protocol import ImageSynapse
from natix_miner.settings import load_settings

CONFIG = """
miner:
  netuid: 72
  metagraph_resync_s: 0.2
artifacts_dir: ./artifacts
tiers:
  - {name: hazard_cues.v1, backend: hazard_cues}
devices: {cpu: {memory_gib: 4}}
"""


class MetagraphStandIn:
    def __init__(self, hotkeys, stakes, permits):
        self.hotkeys, self.S, self.validator_permit = hotkeys, np.array(stakes), np.array(permits)
        self.syncs = 0
        self.next_permits = None

    def sync(self, subtensor=None, **_):
        self.syncs += 1
        if self.next_permits is not None:
            self.validator_permit = np.array(self.next_permits)


class ChainStandIn:
    def __init__(self, registered: bool, metagraph: MetagraphStandIn):
        self.registered, self._metagraph = registered, metagraph
        self.served = []
        self.closed = False

    def is_hotkey_registered(self, hotkey_ss58: str, netuid: int) -> bool:
        return self.registered

    def metagraph(self, netuid: int):
        return self._metagraph

    def serve_axon(self, netuid, axon, certificate=None):
        self.served.append((netuid, axon.info()))

    def close(self):
        self.closed = True


def _jpeg_b64() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=75)
    return base64.b64encode(buf.getvalue()).decode()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    settings, cascade = load_settings(tmp_path / "cfg.yaml")
    miner_w = throwaway_wallet(tmp_path / "w", name="miner")
    validator_w = throwaway_wallet(tmp_path / "w", name="validator")
    return settings, cascade, miner_w, validator_w


def test_unregistered_hotkey_is_a_clear_error(setup):
    settings, cascade, miner_w, _ = setup
    chain = ChainStandIn(False, MetagraphStandIn([], [], []))
    miner = Miner(settings, cascade, NeuronOptions(netuid=72, axon_port=_port(), axon_ip="127.0.0.1",
                                                   wallet_name="mw", wallet_hotkey="mh"),
                  wallet=miner_w, subtensor=chain)
    with pytest.raises(NotRegisteredError) as info:
        BackgroundMiner(miner).start(timeout_s=60)
    msg = str(info.value)
    assert "not registered on netuid 72" in msg and "natix-miner register --netuid 72" in msg
    assert miner.engine is None  # refused before any model was loaded


async def _query(validator_w, miner, port) -> ImageSynapse:
    dendrite = bt.Dendrite(wallet=validator_w)
    info = bt.AxonInfo(version=1, ip="127.0.0.1", port=port, ip_type=4, hotkey=miner.hotkey,
                       coldkey=miner.hotkey)
    try:
        return await dendrite(info, ImageSynapse(image=_jpeg_b64()), timeout=9,
                              deserialize=False)
    finally:
        await dendrite.aclose_session()


async def test_registered_miner_serves_and_resyncs(setup):
    settings, cascade, miner_w, validator_w = setup
    v = validator_w.hotkey.ss58_address
    mg = MetagraphStandIn([miner_w.hotkey.ss58_address, v], [0.0, 1000.0], [False, True])
    chain = ChainStandIn(True, mg)
    port = _port()
    miner = Miner(settings, cascade, NeuronOptions(netuid=72, axon_port=port, axon_ip="127.0.0.1",
                                                   axon_external_ip="127.0.0.1"),
                  wallet=miner_w, subtensor=chain)
    runner = await asyncio.to_thread(BackgroundMiner(miner).start, 60)
    try:
        assert chain.served and chain.served[0][0] == 72  # axon announced on the subnet
        resp = await _query(validator_w, miner, port)
        assert resp.dendrite.status_code == 200 and 0.0 <= resp.prediction <= 1.0
        # The validator loses its permit; the next re-sync must take it into account.
        mg.next_permits = [False, False]
        deadline = time.monotonic() + 5
        while mg.syncs < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert mg.syncs >= 2
        resp = await _query(validator_w, miner, port)
        assert resp.dendrite.status_code == 403 and resp.prediction == -1.0
    finally:
        await asyncio.to_thread(runner.stop)
    assert chain.closed


async def test_telemetry_port_serves_engine_and_shell_metrics(tmp_path):
    import aiohttp

    tport = _port()
    (tmp_path / "cfg.yaml").write_text(CONFIG.replace("metagraph_resync_s: 0.2",
                                                      f"telemetry_port: {tport}"))
    settings, cascade = load_settings(tmp_path / "cfg.yaml")
    validator_w = throwaway_wallet(tmp_path / "w", name="validator")
    port = _port()
    miner = Miner(settings, cascade, NeuronOptions(
        netuid=72, local=True, axon_port=port, allow_hotkeys=(validator_w.hotkey.ss58_address,)))
    runner = await asyncio.to_thread(BackgroundMiner(miner).start, 60)
    try:
        resp = await _query(validator_w, miner, port)
        assert resp.dendrite.status_code == 200
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{tport}/metrics") as r:
                text = await r.text()
        assert 'natix_miner_requests_total{outcome="ok"} 1.0' in text
        assert "cascade_requests_total 1.0" in text
        assert "natix_miner_guard_admitted_total 1.0" in text  # the shell's defences are exported
    finally:
        await asyncio.to_thread(runner.stop)


class LateValidatorMetagraph(MetagraphStandIn):
    """The validator registers (with its permit) after the miner's start-up sync."""

    def __init__(self, miner_hotkey: str, validator_hotkey: str):
        super().__init__([miner_hotkey], [0.0], [False])
        self.validator_hotkey = validator_hotkey

    def sync(self, subtensor=None, **_):
        self.syncs += 1
        self.hotkeys = [self.hotkeys[0], self.validator_hotkey]
        self.S, self.validator_permit = np.array([0.0, 800.0]), np.array([False, True])


async def test_a_validator_newer_than_the_last_sync_is_admitted_at_once(setup):
    settings, cascade, miner_w, validator_w = setup
    mg = LateValidatorMetagraph(miner_w.hotkey.ss58_address, validator_w.hotkey.ss58_address)
    chain = ChainStandIn(True, mg)
    port = _port()
    import dataclasses

    settings = dataclasses.replace(settings, metagraph_resync_s=600.0)  # no periodic sync in time
    miner = Miner(settings, cascade, NeuronOptions(netuid=72, axon_port=port, axon_ip="127.0.0.1",
                                                   axon_external_ip="127.0.0.1"),
                  wallet=miner_w, subtensor=chain)
    runner = await asyncio.to_thread(BackgroundMiner(miner).start, 60)
    try:
        resp = await _query(validator_w, miner, port)
        assert resp.dendrite.status_code == 200 and 0.0 <= resp.prediction <= 1.0
        assert mg.syncs == 1 and miner.stats()["metagraph"]["early_syncs"] == 1
        assert miner.guard.refused.get("unregistered", 0) == 0
    finally:
        await asyncio.to_thread(runner.stop)


class BrokenChainMetagraph(MetagraphStandIn):
    def sync(self, subtensor=None, **_):
        self.syncs += 1
        raise ConnectionError("subtensor endpoint unreachable")


async def test_a_metagraph_that_keeps_failing_is_reported_stale(setup, tmp_path):
    import aiohttp

    settings, cascade, miner_w, validator_w = setup
    import dataclasses

    tport = _port()
    settings = dataclasses.replace(settings, metagraph_resync_s=0.05, metagraph_fail_alert=2,
                                   telemetry_port=tport)
    mg = BrokenChainMetagraph([miner_w.hotkey.ss58_address, validator_w.hotkey.ss58_address],
                              [0.0, 10.0], [False, True])
    port = _port()
    miner = Miner(settings, cascade, NeuronOptions(netuid=72, axon_port=port, axon_ip="127.0.0.1",
                                                   axon_external_ip="127.0.0.1"),
                  wallet=miner_w, subtensor=ChainStandIn(True, mg))
    runner = await asyncio.to_thread(BackgroundMiner(miner).start, 60)
    try:
        deadline = time.monotonic() + 5
        while mg.syncs < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        health = miner.stats()["metagraph"]
        assert health["state"] == "stale" and health["consecutive_failures"] >= 2
        assert "unreachable" in health["last_error"]
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{tport}/metrics") as r:
                text = await r.text()
        assert "natix_miner_metagraph_stale 1.0" in text
        assert 'natix_miner_metagraph_resyncs_total{result="failed"}' in text
        # The last good snapshot still serves.
        resp = await _query(validator_w, miner, port)
        assert resp.dendrite.status_code == 200
    finally:
        await asyncio.to_thread(runner.stop)
