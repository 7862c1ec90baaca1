"""The guard on its own: signatures, registration, permit, stake, rate limit, priority.

Requests are signed by a real bittensor Dendrite exactly as a validator's are, then rebuilt from
their headers the way the axon rebuilds them before calling the blacklist.
"""

from types import SimpleNamespace

import numpy as np
import pytest

import bittensor as bt
from natix_miner.guard import Guard, MetagraphView, RateLimiter, static_view
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
