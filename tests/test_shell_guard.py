"""The guard on its own: signatures, registration, permit, stake, rate limit, priority.

Requests are signed by a real bittensor Dendrite exactly as a validator's are, then rebuilt from
their headers the way the axon rebuilds them before calling the blacklist.
"""

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest
from loguru import logger

import bittensor as bt
from natix_miner.guard import Guard, MetagraphSync, MetagraphView, RateLimiter, static_view
from natix_miner.protocol import ImageSynapse
from natix_miner.settings import GuardSettings


@pytest.fixture
def keys(make_wallet):
    return SimpleNamespace(miner=make_wallet("miner"), validator=make_wallet("validator"),
                           other=make_wallet("other"))


def signed(caller, receiver_hotkey: str, image: str = "aGk=", **header_overrides) -> ImageSynapse:
    """What the axon's blacklist sees: a dendrite-signed request rebuilt from its headers."""
    dendrite = bt.Dendrite(wallet=caller)
    info = bt.AxonInfo(version=1, ip="127.0.0.1", port=8091, ip_type=4, hotkey=receiver_hotkey,
                       coldkey=receiver_hotkey)
    syn = dendrite.preprocess_synapse_for_request(info, ImageSynapse(image=image), timeout=9)
    headers = syn.to_headers()
    headers.update(header_overrides)
    return ImageSynapse.from_headers(headers)


def metagraph(hotkeys, stakes, permits):
    return SimpleNamespace(hotkeys=hotkeys, S=np.array(stakes, dtype=np.float32),
                           validator_permit=np.array(permits))


def test_registered_validator_is_admitted_with_stake_priority(keys):
    v = keys.validator.hotkey.ss58_address
    view = MetagraphView.from_metagraph(metagraph(["5Fother" + "x" * 41, v], [1.0, 2500.0],
                                                  [False, True]))
    guard = Guard(GuardSettings(), keys.miner.hotkey.ss58_address, view)
    syn = signed(keys.validator, keys.miner.hotkey.ss58_address)
    assert guard.check(syn) == (False, "admitted")
    assert guard.priority(syn) == pytest.approx(2500.0)


def test_unknown_hotkey_refused_without_exception(keys):
    guard = Guard(GuardSettings(), keys.miner.hotkey.ss58_address, MetagraphView.empty())
    refused, reason = guard.check(signed(keys.validator, keys.miner.hotkey.ss58_address))
    assert refused and reason.startswith("unregistered")
    assert guard.priority(signed(keys.validator, keys.miner.hotkey.ss58_address)) == 0.0


def test_non_validator_refused_unless_permit_not_required(keys):
    v = keys.validator.hotkey.ss58_address
    view = MetagraphView.from_metagraph(metagraph([v], [10.0], [False]))
    me = keys.miner.hotkey.ss58_address
    refused, reason = Guard(GuardSettings(), me, view).check(signed(keys.validator, me))
    assert refused and reason.startswith("no_permit")
    lenient = Guard(GuardSettings(require_validator_permit=False), me, view)
    assert lenient.check(signed(keys.validator, me))[0] is False


def test_stake_under_minimum_refused(keys):
    v = keys.validator.hotkey.ss58_address
    me = keys.miner.hotkey.ss58_address
    view = MetagraphView.from_metagraph(metagraph([v], [99.0], [True]))
    refused, reason = Guard(GuardSettings(min_stake=100.0), me, view).check(signed(keys.validator, me))
    assert refused and reason.startswith("low_stake")


def test_empty_and_forged_signatures_refused(keys):
    v = keys.validator.hotkey.ss58_address
    me = keys.miner.hotkey.ss58_address
    guard = Guard(GuardSettings(), me, static_view([v]))
    empty = signed(keys.validator, me)
    empty.dendrite.signature = ""
    assert guard.check(empty)[1].startswith("bad_signature: empty")
    # Signed by another key while claiming the validator's hotkey.
    forged = signed(keys.other, me)
    forged.dendrite.hotkey = v
    assert guard.check(forged)[1].startswith("bad_signature")
    # A genuine request whose body hash was swapped after signing.
    tampered = signed(keys.validator, me, computed_body_hash="0" * 64)
    assert guard.check(tampered)[1].startswith("bad_signature")
    # Signed for another miner: replaying it at us fails.
    elsewhere = signed(keys.validator, keys.other.hotkey.ss58_address)
    assert guard.check(elsewhere)[1].startswith("bad_signature")
    assert guard.check(signed(keys.validator, me)) == (False, "admitted")
    assert guard.refused["bad_signature"] == 4


def test_garbage_signature_and_missing_hotkey_do_not_raise(keys):
    me = keys.miner.hotkey.ss58_address
    v = keys.validator.hotkey.ss58_address
    guard = Guard(GuardSettings(allow_hotkeys=[v]), me)
    syn = signed(keys.validator, me)
    syn.dendrite.signature = "0xnothex"
    assert guard.check(syn)[0] is True
    bare = ImageSynapse()
    assert guard.check(bare)[0] is True


def test_allow_and_deny_lists(keys):
    me = keys.miner.hotkey.ss58_address
    v = keys.validator.hotkey.ss58_address
    assert Guard(GuardSettings(allow_hotkeys=[v]), me).check(signed(keys.validator, me))[0] is False
    denied = Guard(GuardSettings(allow_hotkeys=[v], deny_hotkeys=[v]), me)
    assert denied.check(signed(keys.validator, me))[1].startswith("denied")


def test_rate_limit_per_hotkey_rolls_over():
    now = [0.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")  # per hotkey
    now[0] = 59.9
    assert not limiter.allow("a")
    now[0] = 60.0
    assert limiter.allow("a")
    assert RateLimiter(0).allow("a")  # 0 = off


def test_rate_limit_in_guard(keys):
    me = keys.miner.hotkey.ss58_address
    v = keys.validator.hotkey.ss58_address
    guard = Guard(GuardSettings(rate_limit_per_minute=2), me, static_view([v]))
    results = [guard.check(signed(keys.validator, me))[0] for _ in range(3)]
    assert results == [False, False, True] and guard.refused["rate_limited"] == 1


def test_view_swap_takes_effect(keys):
    me = keys.miner.hotkey.ss58_address
    v = keys.validator.hotkey.ss58_address
    guard = Guard(GuardSettings(), me)
    assert guard.check(signed(keys.validator, me))[0] is True
    guard.update(MetagraphView.from_metagraph(metagraph([v], [5.0], [True])))
    assert guard.check(signed(keys.validator, me))[0] is False


def test_metagraph_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        MetagraphView.from_metagraph(metagraph(["a", "b"], [1.0], [True, True]))


# ----- signed freshness, replay, rate-limit order (issue 11 items 1-2) -------------------------

def signed_at(caller, receiver_hotkey: str, nonce: int, uuid: str = "11111111-2222-3333-4444-555555555555",
              **header_overrides) -> ImageSynapse:
    """A request signed by `caller` with a chosen nonce, rebuilt from its headers."""
    syn = ImageSynapse(image="aGk=", timeout=9.0)
    syn.dendrite = bt.TerminalInfo(ip="127.0.0.1", version=1005000, nonce=nonce, uuid=uuid,
                                   hotkey=caller.hotkey.ss58_address)
    syn.axon = bt.TerminalInfo(ip="127.0.0.1", port=8091, hotkey=receiver_hotkey)
    message = f"{nonce}.{caller.hotkey.ss58_address}.{receiver_hotkey}.{uuid}.{syn.body_hash}"
    syn.dendrite.signature = f"0x{caller.hotkey.sign(message).hex()}"
    headers = syn.to_headers()
    headers.update(header_overrides)
    return ImageSynapse.from_headers(headers)


@pytest.mark.parametrize("overrides", [{}, {"timeout": "1000000"}, {"bt_header_dendrite_version": "0"}])
def test_an_old_signed_request_is_refused_whatever_the_unsigned_headers_say(keys, overrides):
    me, v = keys.miner.hotkey.ss58_address, keys.validator.hotkey.ss58_address
    guard = Guard(GuardSettings(), me, static_view([v]))
    hour_ago = time.time_ns() - 3600 * 10**9
    refused, reason = guard.check(signed_at(keys.validator, me, hour_ago, **overrides))
    assert refused and reason.startswith("stale"), reason
    # Just inside max_request_age_s + clock_skew_s (9 + 5 s) it is still fresh.
    assert guard.check(signed_at(keys.validator, me, time.time_ns() - 12 * 10**9))[0] is False


@pytest.mark.parametrize("ahead_ns", [3600 * 10**9, None])
def test_a_nonce_from_the_future_is_refused_and_does_not_block_the_caller(keys, ahead_ns):
    me, v = keys.miner.hotkey.ss58_address, keys.validator.hotkey.ss58_address
    guard = Guard(GuardSettings(), me, static_view([v]))
    nonce = 2**63 - 1 if ahead_ns is None else time.time_ns() + ahead_ns
    refused, reason = guard.check(signed_at(keys.validator, me, nonce))
    assert refused and reason.startswith("future"), reason
    assert guard.check(signed(keys.validator, me))[0] is False  # later genuine requests still pass


def test_a_replayed_request_is_refused_and_does_not_use_up_the_rate_limit(keys):
    me, v = keys.miner.hotkey.ss58_address, keys.validator.hotkey.ss58_address
    guard = Guard(GuardSettings(rate_limit_per_minute=3), me, static_view([v]))
    captured = signed(keys.validator, me)
    assert guard.check(captured) == (False, "admitted")
    replays = [guard.check(captured.model_copy(deep=True)) for _ in range(149)]
    assert all(r[0] and r[1].startswith("replay") for r in replays)
    forged = signed(keys.other, me)
    forged.dendrite.hotkey = v
    assert all(guard.check(forged)[0] for _ in range(20))
    # The genuine validator still has the rest of its minute: 2 more admitted, then limited.
    fresh = [guard.check(signed(keys.validator, me))[0] for _ in range(3)]
    assert fresh == [False, False, True]
    assert guard.refused["replay"] == 149 and guard.refused["rate_limited"] == 1


def test_seen_nonces_are_forgotten_once_outside_the_window(keys):
    me, v = keys.miner.hotkey.ss58_address, keys.validator.hotkey.ss58_address
    now = [time.time_ns()]
    guard = Guard(GuardSettings(rate_limit_per_minute=0), me, static_view([v]),
                  clock_ns=lambda: now[0])
    for i in range(50):
        assert guard.check(signed_at(keys.validator, me, now[0] - i * 1000))[0] is False
    assert guard.stats()["seen_nonces"] == 50
    now[0] += 15 * 10**9  # past 9 s + 5 s skew: refused as stale anyway, so no need to remember
    assert guard.stats()["seen_nonces"] == 0


def test_oversized_header_values_are_refused_and_logged_short(keys):
    me = keys.miner.hotkey.ss58_address
    lines = []
    sink = logger.add(lines.append, level="INFO")
    try:
        guard = Guard(GuardSettings(), me)
        syn = signed(keys.validator, me)
        syn.dendrite.hotkey = "5" * 65536
        refused, reason = guard.check(syn)
    finally:
        logger.remove(sink)
    assert refused and reason.startswith("malformed")
    assert lines and max(len(line) for line in lines) < 600


# ----- refusal logging once per caller and reason (issue 9 item 3) -----------------------------

def test_refusals_are_logged_once_per_caller_and_reason_per_period(keys):
    me = keys.miner.hotkey.ss58_address
    now = [0.0]
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        guard = Guard(GuardSettings(refusal_log_period_s=60.0), me, clock=lambda: now[0])
        stranger = signed(keys.validator, me)
        for _ in range(100):
            guard.check(stranger)
        other = signed(keys.other, me)
        for _ in range(5):
            guard.check(other)
        assert len(lines) == 2 and guard.refused["unregistered"] == 105
        now[0] = 61.0  # a new period: one summary, then the caller is logged again
        guard.check(stranger)
    finally:
        logger.remove(sink)
    assert len(lines) == 4 and "103 repeated refusals" in lines[2], lines


def test_fresh_hotkeys_cannot_flood_the_refusal_log(keys):
    me = keys.miner.hotkey.ss58_address
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO")
    try:
        guard = Guard(GuardSettings(refusal_log_lines=5), me)
        syn = signed(keys.validator, me)
        for i in range(200):
            syn.dendrite.hotkey = f"5Fake{i:043d}"
            guard.check(syn)
    finally:
        logger.remove(sink)
    assert len(lines) == 5 and guard.refused["unregistered"] == 200


# ----- permit lag: early, rate-limited re-sync (issue 9 item 3) ---------------------------------

class SlowChainMetagraph:
    """Metagraph-like: the validator shows up (with its permit) only after `sync`."""

    def __init__(self, validator: str, delay_s: float = 0.05) -> None:
        self.hotkeys, self.S, self.validator_permit = ["5Cminer" + "x" * 41], [0.0], [False]
        self.validator, self.delay_s, self.syncs = validator, delay_s, 0

    def sync(self) -> MetagraphView:
        time.sleep(self.delay_s)
        self.syncs += 1
        self.hotkeys, self.S, self.validator_permit = ([self.hotkeys[0], self.validator],
                                                        [0.0, 500.0], [False, True])
        return MetagraphView.from_metagraph(self)


async def test_a_new_validator_is_admitted_after_an_early_resync(keys):
    me, v = keys.miner.hotkey.ss58_address, keys.validator.hotkey.ss58_address
    mg = SlowChainMetagraph(v)
    guard = Guard(GuardSettings(resync_wait_s=2.0), me, MetagraphView.from_metagraph(mg))
    sync = MetagraphSync(mg.sync, guard, min_interval_s=60.0, alert_after=3)
    try:
        assert await guard.check_async(signed(keys.validator, me)) == (False, "admitted")
        assert mg.syncs == 1 and guard.refused == {}
        # A stranger right after: no second chain query inside the minimum interval, no wait.
        t0 = time.monotonic()
        refused, reason = await guard.check_async(signed(keys.other, me))
        assert refused and reason.startswith("unregistered") and time.monotonic() - t0 < 0.5
        assert mg.syncs == 1 and sync.stats()["early_syncs"] == 1
    finally:
        sync.close()


async def test_a_forged_caller_does_not_trigger_a_resync(keys):
    me, v = keys.miner.hotkey.ss58_address, keys.validator.hotkey.ss58_address
    mg = SlowChainMetagraph(v)
    guard = Guard(GuardSettings(), me, MetagraphView.from_metagraph(mg))
    sync = MetagraphSync(mg.sync, guard, min_interval_s=0.0, alert_after=3)
    try:
        forged = signed(keys.other, me)
        forged.dendrite.hotkey = v
        assert (await guard.check_async(forged))[0] is True
        assert mg.syncs == 0
    finally:
        sync.close()


async def test_a_resync_slower_than_the_wait_answers_with_the_old_view(keys):
    me, v = keys.miner.hotkey.ss58_address, keys.validator.hotkey.ss58_address
    mg = SlowChainMetagraph(v, delay_s=0.6)
    guard = Guard(GuardSettings(resync_wait_s=0.1), me, MetagraphView.from_metagraph(mg))
    sync = MetagraphSync(mg.sync, guard, min_interval_s=60.0, alert_after=3)
    try:
        t0 = time.monotonic()
        refused, reason = await guard.check_async(signed(keys.validator, me))
        assert refused and reason.startswith("unregistered") and time.monotonic() - t0 < 0.5
        await asyncio.sleep(0.8)  # the sync lands later; the next request sees it
        assert await guard.check_async(signed(keys.validator, me)) == (False, "admitted")
    finally:
        sync.close()


# ----- metagraph re-sync failures surface (issue 11 item 9) ------------------------------------

async def test_repeated_resync_failures_turn_the_view_stale_and_say_so(keys):
    me = keys.miner.hotkey.ss58_address
    calls = []

    def failing() -> MetagraphView:
        calls.append(1)
        if len(calls) <= 3:
            raise ConnectionError("chain endpoint unreachable")
        return MetagraphView.empty()

    lines = []
    sink = logger.add(lambda m: lines.append(m), level="WARNING")
    guard = Guard(GuardSettings(), me)
    sync = MetagraphSync(failing, guard, min_interval_s=0.0, alert_after=3)
    try:
        for i in range(3):
            with pytest.raises(ConnectionError):
                await asyncio.wrap_future(sync.request(early=False))
            assert sync.stats()["state"] == ("stale" if i == 2 else "ok")
        errors = [m for m in lines if m.record["level"].name == "ERROR"]
        assert len(errors) == 1 and "3 times in a row" in str(errors[0])
        assert sync.stats()["consecutive_failures"] == 3 and sync.stats()["syncs_failed"] == 3
        await asyncio.wrap_future(sync.request(early=False))
        assert sync.stats()["state"] == "ok" and sync.stats()["consecutive_failures"] == 0
    finally:
        logger.remove(sink)
        sync.close()
