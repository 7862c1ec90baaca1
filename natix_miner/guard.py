"""Who may query the miner, decided from the request headers before the body is deserialised.

bittensor's axon calls the blacklist before its own `verify`, with a synapse built from headers
only, so every refusal here costs a dictionary lookup (or one sr25519 verification), never a
base64 image. The guard verifies the dendrite's signature itself, because a blacklist keyed on
a claimed hotkey is spoofable wherever the axon's check skips an empty signature (bittensor
issue 3392). The signed message is the one bittensor's dendrite signs:
`{nonce}.{caller hotkey}.{our hotkey}.{uuid}.{computed_body_hash}`; the axon then checks that
the body matches `computed_body_hash`, so the signature covers the image too.

The guard reads a `MetagraphView`, an immutable snapshot built from anything metagraph-like
(`hotkeys`, `S` or `stake`, `validator_permit`), so it is tested without a chain and the
neuron swaps snapshots atomically after each re-sync.

No `from __future__ import annotations` here: the axon compares the blacklist and priority
functions' annotations with the real classes.
"""

import collections
import functools
import inspect
import threading
import time
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from bittensor_wallet import Keypair
from loguru import logger

from natix_miner.protocol import ImageSynapse
from natix_miner.settings import GuardSettings


@dataclass(frozen=True)
class CallerInfo:
    """What the guard knows about one registered hotkey."""

    uid: int
    stake: float
    validator_permit: bool


def _as_list(values: Any) -> list:
    if values is None:
        return []
    if hasattr(values, "tolist"):
        return list(values.tolist())
    return list(values)


class MetagraphView:
    """An immutable hotkey -> `CallerInfo` snapshot of one metagraph sync."""

    def __init__(self, callers: dict[str, CallerInfo]) -> None:
        self._callers = dict(callers)

    @classmethod
    def from_metagraph(cls, metagraph: Any) -> "MetagraphView":
        """Snapshot any object with `hotkeys`, `S` (or `stake`) and `validator_permit`."""
        hotkeys = [str(h) for h in _as_list(getattr(metagraph, "hotkeys", []))]
        stakes = getattr(metagraph, "S", None)
        if stakes is None:
            stakes = getattr(metagraph, "stake", None)
        stakes = _as_list(stakes) or [0.0] * len(hotkeys)
        permits = _as_list(getattr(metagraph, "validator_permit", None)) or [False] * len(hotkeys)
        if not len(hotkeys) == len(stakes) == len(permits):
            raise ValueError(f"metagraph arrays disagree: {len(hotkeys)} hotkeys, "
                             f"{len(stakes)} stakes, {len(permits)} permits")
        return cls({hk: CallerInfo(uid, float(stakes[uid]), bool(permits[uid]))
                    for uid, hk in enumerate(hotkeys)})

    @classmethod
    def empty(cls) -> "MetagraphView":
        return cls({})

    def get(self, hotkey: str) -> Optional[CallerInfo]:
        return self._callers.get(hotkey)

    def __len__(self) -> int:
        return len(self._callers)

    @property
    def validators(self) -> int:
        return sum(1 for c in self._callers.values() if c.validator_permit)


class RateLimiter:
    """At most `per_minute` admitted requests per hotkey in any rolling 60 s (0 = unlimited)."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._seen: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        if self.per_minute <= 0:
            return True
        now = self._clock()
        with self._lock:
            window = self._seen[key]
            while window and now - window[0] >= 60.0:
                window.popleft()
            if len(window) >= self.per_minute:
                return False
            window.append(now)
            if len(self._seen) > 10_000:  # forget idle callers so memory stays bounded
                for k in [k for k, w in self._seen.items() if not w or now - w[-1] >= 60.0]:
                    del self._seen[k]
            return True


@functools.lru_cache(maxsize=4096)
def _public_key(ss58: str) -> Keypair:
    return Keypair(ss58_address=ss58)


def signature_message(synapse: ImageSynapse, receiver_hotkey: str) -> str:
    """The message bittensor's dendrite signs for a request to `receiver_hotkey`."""
    d = synapse.dendrite
    return f"{d.nonce}.{d.hotkey}.{receiver_hotkey}.{d.uuid}.{synapse.computed_body_hash}"


def verify_signature(synapse: ImageSynapse, receiver_hotkey: str) -> Optional[str]:
    """None if the request is signed by its claimed hotkey for us, else why not."""
    d = synapse.dendrite
    if d is None or not d.hotkey:
        return "no caller hotkey"
    if not d.signature:
        return "empty signature"
    if d.nonce is None or not d.uuid:
        return "missing nonce or uuid"
    try:
        ok = _public_key(d.hotkey).verify(signature_message(synapse, receiver_hotkey), d.signature)
    except (ValueError, TypeError) as exc:
        return f"malformed signature or hotkey ({exc})"
    return None if ok else "signature does not match"


class Guard:
    """Blacklist and priority for `ImageSynapse` requests."""

    def __init__(self, settings: GuardSettings, receiver_hotkey: str,
                 view: Optional[MetagraphView] = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.receiver_hotkey = receiver_hotkey
        self._view = view or MetagraphView.empty()
        self._allow = frozenset(settings.allow_hotkeys)
        self._deny = frozenset(settings.deny_hotkeys)
        self._rate = RateLimiter(settings.rate_limit_per_minute, clock)
        self.refused: collections.Counter = collections.Counter()
        self.admitted = 0

    @property
    def view(self) -> MetagraphView:
        return self._view

    def update(self, view: MetagraphView) -> None:
        """Swap in a fresh metagraph snapshot (one reference assignment: safe across threads)."""
        self._view = view

    def _refuse(self, kind: str, hotkey: Optional[str], detail: str) -> tuple[bool, str]:
        self.refused[kind] += 1
        logger.debug("guard refused {} ({}): {}", hotkey, kind, detail)
        return True, f"{kind}: {detail}"

    def check(self, synapse: ImageSynapse) -> tuple[bool, str]:
        """(True, reason) to refuse, (False, reason) to admit. Never raises."""
        d = synapse.dendrite
        hotkey = d.hotkey if d is not None else None
        if not hotkey:
            return self._refuse("no_hotkey", hotkey, "request carries no caller hotkey")
        if hotkey in self._deny:
            return self._refuse("denied", hotkey, "hotkey is on the deny list")
        allowed = hotkey in self._allow
        info = self._view.get(hotkey)
        if not allowed:
            if info is None:
                return self._refuse("unregistered", hotkey, "hotkey not registered on the subnet")
            if self.settings.require_validator_permit and not info.validator_permit:
                return self._refuse("no_permit", hotkey, "caller has no validator permit")
            if info.stake < self.settings.min_stake:
                return self._refuse("low_stake", hotkey,
                                    f"stake {info.stake:g} < minimum {self.settings.min_stake:g}")
        if self.settings.verify_signature:
            problem = verify_signature(synapse, self.receiver_hotkey)
            if problem is not None:
                return self._refuse("bad_signature", hotkey, problem)
        if not self._rate.allow(hotkey):
            return self._refuse("rate_limited", hotkey,
                                f"more than {self.settings.rate_limit_per_minute} requests a minute")
        self.admitted += 1
        return False, "admitted"

    def priority(self, synapse: ImageSynapse) -> float:
        """Caller stake: under load the axon serves the heaviest validators first."""
        d = synapse.dendrite
        info = self._view.get(d.hotkey) if d is not None and d.hotkey else None
        return float(info.stake) if info is not None else 0.0

    def stats(self) -> dict[str, Any]:
        return {"admitted": self.admitted, "refused": dict(self.refused),
                "metagraph_hotkeys": len(self._view), "allow_hotkeys": len(self._allow)}


def attach(axon: Any, forward: Callable, guard: Guard, synapse_cls: type = ImageSynapse) -> None:
    """Attach `forward` for `synapse_cls` behind `guard`, with the exact signatures the axon asserts.

    The axon compares the blacklist and priority signatures with the forward's synapse class, so
    they are stamped with `synapse_cls` (one guard serves every route).
    """

    def blacklist(synapse: ImageSynapse) -> typing.Tuple[bool, str]:
        try:
            return guard.check(synapse)
        except Exception as exc:  # noqa: BLE001 - a guard bug must refuse, not crash the request
            logger.exception("guard failed; refusing the request: {}", exc)
            return True, f"guard_error: {type(exc).__name__}"

    def priority(synapse: ImageSynapse) -> float:
        return guard.priority(synapse)

    param = [inspect.Parameter("synapse", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               annotation=synapse_cls)]
    blacklist.__signature__ = inspect.Signature(param, return_annotation=typing.Tuple[bool, str])
    priority.__signature__ = inspect.Signature(param, return_annotation=float)
    axon.attach(forward_fn=forward, blacklist_fn=blacklist, priority_fn=priority)


def static_view(hotkeys: Iterable[str], *, stake: float = 0.0,
                validator_permit: bool = True) -> MetagraphView:
    """A view of fixed hotkeys (the `--local` miner's only callers)."""
    return MetagraphView({hk: CallerInfo(i, stake, validator_permit)
                          for i, hk in enumerate(hotkeys)})
