"""The axon's HTTP surface under abuse: routes, slow clients, malformed signed bodies, arrival.

One real miner on 127.0.0.1 (hazard-cue tier) with short server timeouts; requests are raw
sockets or aiohttp posts signed exactly as bittensor's dendrite signs them.
"""

import asyncio
import base64
import io
import json
import socket
import time

import aiohttp
import numpy as np
import pytest
from PIL import Image

import bittensor as bt
from natix_miner import request_context
from natix_miner.admission import AdmissionGate
from natix_miner.logsafe import clip, quiet_bittensor_axon
from natix_miner.neuron import BackgroundMiner, Miner, NeuronOptions, throwaway_wallet
from natix_miner.protocol import ImageSynapse
from natix_miner.settings import load_settings

CONFIG = """
miner:
  netuid: 72
  guard: {rate_limit_per_minute: 0}
  server: {header_timeout_s: 0.6, body_timeout_s: 0.6, keep_alive_s: 2}
  decode: {max_base64_chars: 400000}
artifacts_dir: ./artifacts
engine: {deadline_ms: 6000, fallback_probability: 0.5}
tiers:
  - {name: hazard_cues.v1, backend: hazard_cues}
devices: {cpu: {memory_gib: 4}}
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jpeg_b64(size=(160, 120), noise: bool = True) -> str:
    buf = io.BytesIO()
    if noise:
        arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    else:  # a smooth gradient: small file, still a full-size decode
        arr = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.arange(size[0], dtype=np.uint8)[None, :, None]
    Image.fromarray(arr).save(buf, format="JPEG", quality=75)
    return base64.b64encode(buf.getvalue()).decode()


def start_miner(root, config: str, name: str):
    (root / f"{name}.yaml").write_text(config)
    settings, cascade = load_settings(root / f"{name}.yaml")
    validator = throwaway_wallet(root / "wallets", name=f"{name}-validator")
    port = _port()
    miner = Miner(settings, cascade, NeuronOptions(
        netuid=72, local=True, axon_port=port, allow_hotkeys=(validator.hotkey.ss58_address,)))
    runner = BackgroundMiner(miner).start(timeout_s=120)
    return {"miner": miner, "validator": validator, "port": port, "runner": runner}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = start_miner(tmp_path_factory.mktemp("http"), CONFIG, "http")
    yield w
    w["runner"].stop()


def axon_info(w) -> "bt.AxonInfo":
    m = w["miner"]
    return bt.AxonInfo(version=1, ip="127.0.0.1", port=w["port"], ip_type=4, hotkey=m.hotkey,
                       coldkey=m.hotkey)


def signed_headers(w, synapse=None, wallet=None) -> dict:
    dendrite = bt.Dendrite(wallet=wallet or w["validator"])
    syn = dendrite.preprocess_synapse_for_request(axon_info(w), synapse or ImageSynapse(image=jpeg_b64()), 9)
    return syn.to_headers(), syn


async def post(w, path: str, headers: dict, data) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{w['port']}{path}", headers=headers, data=data,
                                timeout=aiohttp.ClientTimeout(total=9)) as resp:
            return resp.status, await resp.text()


# ----- routes (issue 11 item 3) ----------------------------------------------------------------

async def test_base_synapse_route_is_gone_and_leaves_no_nonce_behind(world, make_wallet):
    miner = world["miner"]
    assert set(miner.axon.forward_class_types) == {"ImageSynapse", "ExtendedImageSynapse"}
    before = miner.forward_calls
    for i in range(20):  # a brand-new keypair each time, huge uuids: 404, nothing remembered
        dendrite = bt.Dendrite(wallet=make_wallet(f"fresh{i % 2}"))
        dendrite.uuid = "u" * 30_000
        syn = dendrite.preprocess_synapse_for_request(axon_info(world), bt.Synapse(), 9)
        status, _ = await post(world, "/Synapse", syn.to_headers(), json.dumps(syn.model_dump()))
        assert status == 404
    assert miner.axon.nonces == {} and miner.forward_calls == before
    await test_a_well_formed_request_still_gets_an_answer(world)
    assert miner.axon.nonces == {}  # our verify replaces bittensor's: its table never grows


@pytest.mark.parametrize("method,path,status", [("GET", "/ImageSynapse", 405), ("GET", "/docs", 404),
                                                ("GET", "/openapi.json", 404), ("POST", "/nope", 404),
                                                ("PUT", "/ImageSynapse", 405)])
async def test_nothing_but_post_to_a_synapse_route_is_served(world, method, path, status):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://127.0.0.1:{world['port']}{path}") as resp:
            assert resp.status == status


async def test_a_body_over_the_cap_is_refused_before_it_is_read(world):
    headers, _ = signed_headers(world)
    headers["content-length"] = str(10**9)
    reader, writer = await asyncio.open_connection("127.0.0.1", world["port"])
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST /ImageSynapse HTTP/1.1\r\nhost: x\r\n{head}\r\n".encode())
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert b" 413 " in status_line


# ----- malformed signed bodies (issue 11 item 7) ------------------------------------------------

@pytest.mark.parametrize("body,content_type,status", [
    ("[1, 2, 3]", "application/json", 400),
    ("", "application/json", 400),
    ('{"image": 12345, "prediction": "high"}', "application/json", 422),
    (None, None, 422),  # undecodable bytes, no content type: read as JSON all the same
    ("{not json", "application/json", 422),  # FastAPI's own json_invalid answer
])
async def test_signed_but_malformed_bodies_get_400_or_422(world, body, content_type, status):
    headers, syn = signed_headers(world)
    if body is None:
        body = json.dumps(syn.model_dump())
        body = "\x00" + body  # not JSON
    headers.pop("content-type", None)
    if content_type:
        headers["content-type"] = content_type
    before = world["miner"].forward_calls
    got, text = await post(world, "/ImageSynapse", headers, body.encode())
    assert got == status, text
    assert world["miner"].forward_calls == before


async def test_a_valid_body_without_content_type_is_answered(world):
    headers, syn = signed_headers(world)
    headers.pop("content-type", None)
    got, text = await post(world, "/ImageSynapse", headers, json.dumps(syn.model_dump()).encode())
    assert got == 200 and 0.0 <= json.loads(text)["prediction"] <= 1.0


@pytest.mark.parametrize("header,value,status", [
    ("bt_header_dendrite_nonce", "abc", 400),     # bittensor: SynapseParsingError -> 500
    ("bt_header_dendrite_hotkey", "5" * 12_000, 431),  # arrives in one piece: h11 lets it through
])
async def test_headers_that_do_not_parse_or_are_too_large_are_refused(world, header, value, status):
    headers, syn = signed_headers(world)
    headers[header] = value
    before = world["miner"].forward_calls
    got, _ = await post(world, "/ImageSynapse", headers, json.dumps(syn.model_dump()).encode())
    assert got == status and world["miner"].forward_calls == before


async def test_a_body_that_is_not_the_signed_one_gets_400(world):
    headers, syn = signed_headers(world, ImageSynapse(image=jpeg_b64()))
    # The image is not hashed by SN72's synapse, but the terminal info the body hash names must
    # match; a body hash header swapped after signing fails the signature, a body whose own hash
    # differs from the signed header fails here.
    from natix_miner.axon_server import body_check

    class FakeRequest:
        def __init__(self, body, headers):
            self._body, self.headers = body, headers
            self.url = type("U", (), {"path": "/ImageSynapse"})()

        async def body(self):
            return self._body

    check = body_check(world["miner"].axon)
    from fastapi import HTTPException

    with pytest.raises(HTTPException) as info:
        await check(FakeRequest(json.dumps(syn.model_dump()).encode(),
                                {**headers, "computed_body_hash": "0" * 64}))
    assert info.value.status_code == 400
    assert await check(FakeRequest(json.dumps(syn.model_dump()).encode(), headers))


async def test_a_well_formed_request_still_gets_an_answer(world):
    dendrite = bt.Dendrite(wallet=world["validator"])
    try:
        resp = await dendrite(axon_info(world), ImageSynapse(image=jpeg_b64()), timeout=9,
                              deserialize=False)
    finally:
        await dendrite.aclose_session()
    assert resp.dendrite.status_code == 200 and 0.0 <= resp.prediction <= 1.0


# ----- slow clients (issue 11 item 7) -----------------------------------------------------------

async def test_a_client_dribbling_its_headers_is_cut_off(world):
    reader, writer = await asyncio.open_connection("127.0.0.1", world["port"])
    t0 = time.monotonic()
    closed_after = None
    request = b"POST /ImageSynapse HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * 200
    try:
        for byte in request:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.02)
            if reader.at_eof() or writer.transport.is_closing():
                break
            if time.monotonic() - t0 > 5:
                break
        data = await asyncio.wait_for(reader.read(), 3)
        closed_after = time.monotonic() - t0
    finally:
        writer.close()
    assert data == b"" and closed_after is not None and closed_after < 3.0


async def test_an_idle_connection_is_closed(world):
    reader, writer = await asyncio.open_connection("127.0.0.1", world["port"])
    t0 = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data == b"" and time.monotonic() - t0 < 3.0


async def test_a_stalled_signed_body_gets_408(world):
    headers, syn = signed_headers(world)
    body = json.dumps(syn.model_dump()).encode()
    headers["content-length"] = str(len(body))
    headers["content-type"] = "application/json"
    reader, writer = await asyncio.open_connection("127.0.0.1", world["port"])
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(f"POST /ImageSynapse HTTP/1.1\r\nhost: x\r\n{head}\r\n".encode() + body[:100])
    await writer.drain()
    before = world["miner"].forward_calls
    t0 = time.monotonic()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert b" 408 " in status_line and time.monotonic() - t0 < 3.0
    assert world["miner"].forward_calls == before


# ----- the answer budget runs from arrival (issue 11 item 4, the shell's part) ------------------

TIGHT = CONFIG.replace("deadline_ms: 6000", "deadline_ms: 1000").replace(
    "decode: {max_base64_chars: 400000}", "decode: {max_base64_chars: 400000, timeout_ms: 1}")


@pytest.fixture(scope="module")
def tight(tmp_path_factory):
    w = start_miner(tmp_path_factory.mktemp("tight"), TIGHT, "tight")
    yield w
    w["runner"].stop()


async def test_time_spent_before_the_forward_counts_against_the_budget(tight):
    miner = tight["miner"]
    original = miner.guard.check_async

    async def slow_guard(synapse):  # e.g. a permit-lag re-sync wait or a busy axon loop
        await asyncio.sleep(0.85)
        return await original(synapse)

    miner.guard.check_async = slow_guard
    asked = miner.engine.health()["requests"] if "requests" in miner.engine.health() else None
    try:
        dendrite = bt.Dendrite(wallet=tight["validator"])
        t0 = time.monotonic()
        resp = await dendrite(axon_info(tight), ImageSynapse(image=jpeg_b64()), timeout=9,
                              deserialize=False)
        took = time.monotonic() - t0
        await dendrite.aclose_session()
    finally:
        miner.guard.check_async = original
    assert resp.dendrite.status_code == 200 and resp.prediction == 0.5
    assert miner.counters["shed_late"] == 1 and took < 1.2
    if asked is not None:
        assert miner.engine.health()["requests"] == asked


async def test_arrival_from_the_request_context_sheds_a_late_forward(tight):
    miner = tight["miner"]
    before = dict(miner.counters)
    request_context.begin(time.monotonic() - 0.9)  # arrived 0.9 s ago: 0.1 s of 1 s left
    out = await miner.forward(ImageSynapse(image=jpeg_b64()))
    assert out.prediction == 0.5 and miner.counters["shed_late"] == before.get("shed_late", 0) + 1
    request_context.begin()  # just arrived: answered (here: the 1 ms decode budget runs out)
    out = await miner.forward(ImageSynapse(image=jpeg_b64((3000, 2000), noise=False)))
    assert out.prediction == 0.5 and miner.counters["decode_timeout"] >= 1


# ----- stake priority (issue 11 item 9) ---------------------------------------------------------

async def test_admission_gate_serves_the_highest_stake_first_and_times_out_waiters():
    gate = AdmissionGate(1)
    order = []

    async def caller(name, stake, hold_s=0.05, timeout_s=5.0):
        if await gate.acquire(stake, timeout_s):
            order.append(name)
            await asyncio.sleep(hold_s)
            gate.release()
        else:
            order.append(f"{name}:timeout")

    first = asyncio.create_task(caller("first", 0.0, hold_s=0.2))
    await asyncio.sleep(0.01)
    rest = [asyncio.create_task(caller(n, s)) for n, s in [("low", 1.0), ("high", 900.0), ("mid", 50.0)]]
    impatient = asyncio.create_task(caller("impatient", 10_000.0, timeout_s=-1))
    await asyncio.gather(first, *rest, impatient)
    assert order == ["first", "impatient:timeout", "high", "mid", "low"]
    assert gate.active == 0 and gate.stats()["timed_out"] == 1


# ----- logs (issue 11 item 9) -------------------------------------------------------------------

def test_clip_and_bittensor_per_request_lines_are_quiet():
    import logging

    assert len(clip("x" * 65536)) < 120
    dropped = quiet_bittensor_axon()
    before = dropped["BlacklistedException"]
    record = logging.LogRecord("bittensor", logging.ERROR, "axon.py", 1,
                               "BlacklistedException#0e8a4b0c-1f0e-4c35-9d55-3f7f2b1b1b1b: Forbidden.",
                               None, None)
    assert not logging.getLogger("bittensor").filters[-1].filter(record)
    assert dropped["BlacklistedException"] == before + 1
    long = logging.LogRecord("bittensor", logging.ERROR, "axon.py", 1, "y" * 70000, None, None)
    assert logging.getLogger("bittensor").filters[-1].filter(long)
    assert len(long.getMessage()) < 700


# ----- what the signature covers (issue 11 item 10) ---------------------------------------------

HASHED = CONFIG.replace("  guard: {rate_limit_per_minute: 0}",
                        "  guard: {rate_limit_per_minute: 0}\n  synapse_hash_fields: [image]")


@pytest.fixture(scope="module")
def hashed(tmp_path_factory):
    w = start_miner(tmp_path_factory.mktemp("hashed"), HASHED, "hashed")
    yield w
    w["runner"].stop()


async def _swap_image_after_signing(w, cls) -> int:
    headers, syn = signed_headers(w, cls(image=jpeg_b64()))
    body = syn.model_dump()
    body["image"] = jpeg_b64((96, 96))  # a different picture, headers (and signature) untouched
    status, _ = await post(w, "/ImageSynapse", headers, json.dumps(body).encode())
    return status


async def test_sn72s_signature_does_not_cover_the_image(world):
    # The subnet's ImageSynapse hashes no field: a body swapped in transit is still answered.
    assert await _swap_image_after_signing(world, ImageSynapse) == 200


async def test_the_hash_fields_revision_setting_covers_the_image(hashed):
    from natix_miner.protocol import synapse_class

    Hashed = synapse_class(ImageSynapse, ["image"])
    assert Hashed.__name__ == "ImageSynapse" and Hashed.required_hash_fields == ("image",)
    headers, syn = signed_headers(hashed, Hashed(image=jpeg_b64()))
    status, _ = await post(hashed, "/ImageSynapse", headers, json.dumps(syn.model_dump()).encode())
    assert status == 200
    assert await _swap_image_after_signing(hashed, Hashed) == 400
    # Why it is off by default: a validator whose synapse hashes nothing is refused.
    headers, syn = signed_headers(hashed, ImageSynapse(image=jpeg_b64()))
    status, _ = await post(hashed, "/ImageSynapse", headers, json.dumps(syn.model_dump()).encode())
    assert status == 400
