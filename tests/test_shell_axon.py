"""The miner through a real bittensor axon and dendrite on 127.0.0.1, no chain.

The engine is the real `CascadeEngine` with the weight-free hazard-cue tier, so the forward, the
guard, decode and the engine seam all run as in production.
"""

import asyncio
import base64
import io
import math
import socket
import struct
import zlib

import aiohttp
import numpy as np
import pytest
from PIL import Image

import bittensor as bt
from natix_miner.guard import CallerInfo, MetagraphView
from natix_miner.neuron import BackgroundMiner, Miner, NeuronOptions, port_is_free, throwaway_wallet
from natix_miner.protocol import ImageSynapse
from natix_miner.settings import load_settings

CONFIG = """
miner:
  netuid: 72
  decode:
    max_base64_chars: 400000
    max_bytes: 300000
    max_pixels: 4000000
  guard:
    rate_limit_per_minute: 0
artifacts_dir: ./artifacts
engine:
  deadline_ms: 6000
  fallback_probability: 0.5
tiers:
  - name: hazard_cues.v1
    backend: hazard_cues
    max_batch_size: 8
    expected_latency_ms: 30
devices:
  cpu: {memory_gib: 4}
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg_b64(im: Image.Image, quality: int = 75) -> str:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return base64.b64encode(buf.getvalue()).decode()


def street_like(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    arr[150:200, 80:120] = (255, 110, 0)  # an orange blob
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One local miner for the module, plus the wallets of its callers."""
    root = tmp_path_factory.mktemp("axon")
    (root / "cfg.yaml").write_text(CONFIG)
    settings, cascade = load_settings(root / "cfg.yaml")
    wallets = {n: throwaway_wallet(root / "wallets", name=n)
               for n in ("validator", "stranger", "weak")}
    port = _port()
    options = NeuronOptions(netuid=72, local=True, axon_port=port,
                            allow_hotkeys=(wallets["validator"].hotkey.ss58_address,))
    miner = Miner(settings, cascade, options)
    runner = BackgroundMiner(miner).start(timeout_s=120)
    yield {"miner": miner, "wallets": wallets, "port": port}
    runner.stop()


def axon_info(world) -> "bt.AxonInfo":
    m = world["miner"]
    return bt.AxonInfo(version=1, ip="127.0.0.1", port=world["port"], ip_type=4, hotkey=m.hotkey,
                       coldkey=m.wallet.coldkeypub.ss58_address)


async def query(world, wallet_name: str, image: str, timeout: float = 9.0) -> ImageSynapse:
    dendrite = bt.Dendrite(wallet=world["wallets"][wallet_name])
    try:
        return await dendrite(axon_info(world), ImageSynapse(image=image), timeout=timeout,
                              deserialize=False)
    finally:
        await dendrite.aclose_session()


def valid(p: float) -> bool:
    return isinstance(p, float) and math.isfinite(p) and 0.0 <= p <= 1.0


async def test_validator_query_gets_a_probability(world):
    before = world["miner"].forward_calls
    resp = await query(world, "validator", jpeg_b64(street_like()))
    assert resp.dendrite.status_code == 200, resp.dendrite.status_message
    assert valid(resp.prediction) and resp.prediction != -1.0
    assert resp.image == ""  # the reply carries no image back
    assert world["miner"].forward_calls == before + 1
    # deserialize() is what a validator calling with deserialize=True reads.
    assert resp.deserialize() == resp.prediction


async def test_bind_is_loopback_only(world):
    assert world["miner"].axon is not None
    assert world["miner"].axon.fast_config.host == "127.0.0.1"


async def test_unregistered_hotkey_refused_before_forward(world):
    before = world["miner"].forward_calls
    resp = await query(world, "stranger", jpeg_b64(street_like()))
    assert resp.dendrite.status_code == 403
    assert resp.prediction == -1.0
    assert world["miner"].forward_calls == before


async def test_non_validator_refused_before_forward(world):
    miner = world["miner"]
    weak = world["wallets"]["weak"].hotkey.ss58_address
    old = miner.guard.view
    miner.guard.update(MetagraphView({weak: CallerInfo(uid=3, stake=50.0, validator_permit=False)}))
    try:
        before = miner.forward_calls
        resp = await query(world, "weak", jpeg_b64(street_like()))
        assert resp.dendrite.status_code == 403 and "no_permit" in resp.dendrite.status_message
        assert miner.forward_calls == before
    finally:
        miner.guard.update(old)


async def _raw_post(world, synapse: ImageSynapse) -> tuple[int, dict]:
    """POST a prepared synapse exactly as bittensor's dendrite does (headers + JSON body)."""
    url = f"http://127.0.0.1:{world['port']}/ImageSynapse"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, headers=synapse.to_headers(), json=synapse.model_dump(),
                                timeout=aiohttp.ClientTimeout(total=9)) as resp:
            return resp.status, await resp.json(content_type=None)


def _signed(world, wallet_name: str, image: str) -> ImageSynapse:
    dendrite = bt.Dendrite(wallet=world["wallets"][wallet_name])
    return dendrite.preprocess_synapse_for_request(axon_info(world), ImageSynapse(image=image), 9)


async def test_empty_signature_refused_before_forward(world):
    before = world["miner"].forward_calls
    syn = _signed(world, "validator", jpeg_b64(street_like()))
    syn.dendrite.signature = ""
    status, body = await _raw_post(world, syn)
    assert status in (401, 403), body
    assert world["miner"].forward_calls == before


async def test_forged_signature_refused_before_forward(world):
    before = world["miner"].forward_calls
    # Signed by a stranger's key while claiming the allowed validator's hotkey.
    syn = _signed(world, "stranger", jpeg_b64(street_like()))
    syn.dendrite.hotkey = world["wallets"]["validator"].hotkey.ss58_address
    status, body = await _raw_post(world, syn)
    assert status in (401, 403), body
    assert world["miner"].forward_calls == before
    # The honest version of the same request goes through.
    status, body = await _raw_post(world, _signed(world, "validator", jpeg_b64(street_like())))
    assert status == 200 and valid(float(body["prediction"]))


async def test_fifty_concurrent_queries_all_answered(world):
    images = [jpeg_b64(street_like(i)) for i in range(50)]
    dendrite = bt.Dendrite(wallet=world["wallets"]["validator"])
    try:
        responses = await asyncio.gather(*(
            dendrite(axon_info(world), ImageSynapse(image=im), timeout=9, deserialize=False)
            for im in images))
    finally:
        await dendrite.aclose_session()
    codes = [r.dendrite.status_code for r in responses]
    assert codes == [200] * 50, [r.dendrite.status_message for r in responses if r.dendrite.status_code != 200]
    assert all(valid(r.prediction) for r in responses)


def _png_bomb(width: int, height: int) -> str:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
           + chunk(b"IEND", b""))
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("kind", ["empty", "garbage", "not_base64", "truncated", "huge", "bomb"])
async def test_bad_images_get_the_fallback_and_the_miner_survives(world, kind):
    good = jpeg_b64(street_like())
    image = {
        "empty": "",
        "garbage": base64.b64encode(b"\x00\x01 not a picture" * 50).decode(),
        "not_base64": "@@@@####!!!!",
        "truncated": base64.b64encode(base64.b64decode(good)[:600]).decode(),
        "huge": "A" * 400_100,  # over decode.max_base64_chars, inside the HTTP body cap
        "bomb": _png_bomb(9000, 9000),
    }[kind]
    reason = {"empty": "empty", "garbage": "unknown_format", "not_base64": "bad_base64",
              "truncated": "corrupt", "huge": "too_long", "bomb": "too_many_pixels"}[kind]
    miner = world["miner"]
    before = miner.counters[f"decode_{reason}"]
    resp = await query(world, "validator", image)
    assert resp.dendrite.status_code == 200, resp.dendrite.status_message
    assert resp.prediction == miner.cascade.engine.fallback_probability
    # Still serving normally afterwards.
    again = await query(world, "validator", good)
    assert again.dendrite.status_code == 200 and valid(again.prediction)
    # Refused by decode for the right reason (not, say, an engine failure that also answers 0.5).
    assert miner.counters[f"decode_{reason}"] == before + 1


async def test_stop_releases_the_port(tmp_path, make_wallet):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    settings, cascade = load_settings(tmp_path / "cfg.yaml")
    port = _port()
    miner = Miner(settings, cascade, NeuronOptions(netuid=72, local=True, axon_port=port))
    runner = BackgroundMiner(miner).start(timeout_s=120)
    assert not port_is_free("127.0.0.1", port)
    runner.stop()
    assert port_is_free("127.0.0.1", port)


async def test_extended_synapse_route_is_served_by_the_same_guard(world):
    from natix_miner.protocol import ExtendedImageSynapse

    before = world["miner"].forward_calls
    dendrite = bt.Dendrite(wallet=world["wallets"]["validator"])
    try:
        ok = await dendrite(axon_info(world), ExtendedImageSynapse(image=jpeg_b64(street_like())),
                            timeout=9, deserialize=False)
    finally:
        await dendrite.aclose_session()
    assert ok.dendrite.status_code == 200 and valid(ok.prediction) and ok.image == ""
    assert world["miner"].forward_calls == before + 1
    stranger = bt.Dendrite(wallet=world["wallets"]["stranger"])
    try:
        refused = await stranger(axon_info(world), ExtendedImageSynapse(image="x"), timeout=9,
                                 deserialize=False)
    finally:
        await stranger.aclose_session()
    assert refused.dendrite.status_code == 403 and refused.prediction == -1.0
    assert world["miner"].forward_calls == before + 1


def test_wire_fields_are_exact():
    fields = {k: (f.annotation, f.default) for k, f in ImageSynapse.model_fields.items()
              if k not in bt.Synapse.model_fields}
    assert fields == {"image": (str, ""), "prediction": (float, -1.0), "testnet_label": (int, -1)}
    assert ImageSynapse.__name__ == "ImageSynapse"
    assert ImageSynapse(prediction=0.25).deserialize() == 0.25


class _SlowLoadingTier:
    """A tier whose load outlasts the caller's patience (stands in for minutes of model loading)."""

    def __new__(cls, spec):
        from cascade.tier import Tier, TierOutput

        class Slow(Tier):
            def load(self, device: str) -> None:
                import time

                time.sleep(1.5)

            def predict(self, images):
                return [TierOutput(prob=0.5) for _ in images]

        return Slow(spec)


def test_start_timeout_releases_the_thread_and_never_serves(tmp_path):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    settings, cascade = load_settings(tmp_path / "cfg.yaml")
    port = _port()
    miner = Miner(settings, cascade, NeuronOptions(netuid=72, local=True, axon_port=port),
                  tier_factory=_SlowLoadingTier)
    runner = BackgroundMiner(miner)
    with pytest.raises(TimeoutError):
        runner.start(timeout_s=0.3)
    assert not runner._thread.is_alive()      # start-up cancelled, not left running
    assert miner.axon is None and port_is_free("127.0.0.1", port)
