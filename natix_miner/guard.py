"""Who may query the miner, decided from the request headers before the body is deserialised.

bittensor's axon calls the blacklist before its own `verify`, with a synapse built from headers
only, so every refusal here costs a dictionary lookup (or one sr25519 verification), never a
base64 image. The guard does all of it in the blacklist step, in this order, cheapest first:
caller hotkey present and well-formed, deny list, registration / validator permit / stake,
the sr25519 signature, freshness and replay, and only then the per-hotkey rate limit (so
replays and forgeries cannot use up a validator's allowance). Its `verify` step is a no-op that
replaces bittensor's `default_verify`, whose freshness test trusts two unsigned headers and
whose nonce table grows by one entry per caller uuid.

What is signed: bittensor's dendrite signs
`{nonce}.{caller hotkey}.{our hotkey}.{uuid}.{computed_body_hash}`, and the nonce of every
dendrite since 7.2 is the send time in ns. So freshness is judged from the nonce alone (older
than `max_request_age_s` + `clock_skew_s`, or more than `clock_skew_s` ahead, is refused) and a
nonce is accepted once; the seen-nonce memory only holds nonces still inside that window.
`computed_body_hash` covers the body fields named in the synapse class's
`required_hash_fields`, and SN72's `ImageSynapse` declares none: the image is NOT covered by
the signature, only the headers are. A subnet revision that hashes the image is followed with
`miner.synapse_hash_fields` (off by default: turning it on alone would refuse every validator).

Permit lag: a caller refused as unregistered or without a permit may have registered or gained
its permit after the last metagraph sync. Such a refusal (when its signature verifies) triggers
an early re-sync, at most one per `resync_min_interval_s`, and the decision waits up to
`resync_wait_s` for the fresh view. Refusals are logged once per caller and reason per
`refusal_log_period_s` (and at most `refusal_log_lines` distinct lines per period), counted
always.

The guard reads a `MetagraphView`, an immutable snapshot built from anything metagraph-like
(`hotkeys`, `S` or `stake`, `validator_permit`), so it is tested without a chain and the
neuron swaps snapshots atomically after each re-sync (`MetagraphSync`).

No `from __future__ import annotations` here: the axon compares the blacklist and verify
functions' annotations with the real classes.
"""

import asyncio
import collections
import concurrent.futures
import functools
import inspect
import threading
import time
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from bittensor_wallet import Keypair
from loguru import logger

from natix_miner import request_context
from natix_miner.logsafe import clip
from natix_miner.protocol import ImageSynapse
from natix_miner.settings import GuardSettings

# Longest header values a real dendrite sends (ss58 hotkey 48, uuid 36, signature 130 chars).
MAX_HOTKEY_CHARS = 64
MAX_UUID_CHARS = 64
MAX_SIGNATURE_CHARS = 256
# Refusal kinds that a newer metagraph may turn into an admission.
_LAG_KINDS = ("unregistered", "no_permit")


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

    def __len__(self) -> int:
        return len(self._seen)


class NonceWindow:
    """Freshness from the signed nonce (send time in ns) and once-only use of each nonce.

    Only nonces inside the acceptance window are remembered, per hotkey and at most
    `per_hotkey_cap` of them; only callers whose signature verified reach this table, so its
    size is bounded by (registered or allow-listed hotkeys) x cap.
    """

    def __init__(self, max_age_s: float, skew_s: float, per_hotkey_cap: int, *,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.past_ns = int((max_age_s + skew_s) * 1e9)
        self.future_ns = int(skew_s * 1e9)
        self.per_hotkey_cap = max(1, per_hotkey_cap)
        self._clock_ns = clock_ns
        self._seen: dict[str, dict[tuple[int, str], None]] = {}
        self._lock = threading.Lock()
        self._checks = 0

    def check(self, hotkey: str, nonce: int, uuid: str) -> Optional[tuple[str, str]]:
        """None (and the nonce is now used) if fresh and unseen; else (kind, detail)."""
        now = self._clock_ns()
        oldest = now - self.past_ns
        if nonce < oldest:
            age = (now - nonce) / 1e9
            return "stale", (f"signed {age:.1f} s ago; accepted up to "
                             f"{self.past_ns / 1e9:g} s (nonce is the send time in ns)")
        if nonce > now + self.future_ns:
            ahead = (nonce - now) / 1e9
            return "future", f"signed {ahead:.1f} s in the future; clock skew allowed {self.future_ns / 1e9:g} s"
        key = (nonce, uuid)
        with self._lock:
            seen = self._seen.setdefault(hotkey, {})
            if key in seen:
                return "replay", "this signed request was already answered"
            if len(seen) >= self.per_hotkey_cap:
                for old in [k for k in seen if k[0] < oldest]:
                    del seen[old]
                if len(seen) >= self.per_hotkey_cap:
                    return "rate_limited", (f"more than {self.per_hotkey_cap} signed requests "
                                            "inside the freshness window")
            seen[key] = None
            self._checks += 1
            if self._checks % 1024 == 0:
                self._prune(oldest)
        return None

    def _prune(self, oldest: int) -> None:
        for hotkey in list(self._seen):
            seen = self._seen[hotkey]
            for old in [k for k in seen if k[0] < oldest]:
                del seen[old]
            if not seen:
                del self._seen[hotkey]

    def __len__(self) -> int:
        with self._lock:
            self._prune(self._clock_ns() - self.past_ns)
            return sum(len(s) for s in self._seen.values())


class RefusalLog:
    """One log line per (caller, reason) per period; counts the repeats it swallowed.

    At most `max_lines` distinct lines per period (fresh hotkeys are free to make), then one
    summary line when the period ends. The table is bounded by `max_lines` per period.
    """

    def __init__(self, period_s: float, max_lines: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.period_s = period_s
        self.max_lines = max_lines
        self._clock = clock
        self._lock = threading.Lock()
        self._period_start = clock()
        self._logged: dict[tuple[str, str], int] = {}
        self._unlogged = 0

    def note(self, hotkey: Optional[str], kind: str, detail: str) -> None:
        now = self._clock()
        summary = None
        with self._lock:
            if now - self._period_start >= self.period_s:
                summary = self._roll(now)
            key = (hotkey or "", kind)
            if key in self._logged:
                self._logged[key] += 1
                line = None
            elif len(self._logged) < self.max_lines:
                self._logged[key] = 0
                line = (clip(hotkey), kind, clip(detail, 200))
            else:
                self._unlogged += 1
                line = None
        if summary:
            logger.info(summary)
        if line is not None:
            logger.info("guard refused {} ({}): {} (repeats within {:g} s are counted, not logged)",
                        *line, self.period_s)

    def _roll(self, now: float) -> Optional[str]:
        repeats = sum(self._logged.values())
        summary = None
        if repeats or self._unlogged:
            summary = (f"guard: {repeats} repeated refusals of {len(self._logged)} caller/reason "
                       f"pairs and {self._unlogged} refusals of further callers in the last "
                       f"{now - self._period_start:.0f} s were counted, not logged")
        self._logged.clear()
        self._unlogged = 0
        self._period_start = now
        return summary


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
        return f"malformed signature or hotkey ({clip(str(exc))})"
    return None if ok else "signature does not match"


class Guard:
    """Blacklist (and the stake lookup behind priority) for `ImageSynapse` requests."""

    def __init__(self, settings: GuardSettings, receiver_hotkey: str,
                 view: Optional[MetagraphView] = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.settings = settings
        self.receiver_hotkey = receiver_hotkey
        self._view = view or MetagraphView.empty()
        self._allow = frozenset(settings.allow_hotkeys)
        self._deny = frozenset(settings.deny_hotkeys)
        self._rate = RateLimiter(settings.rate_limit_per_minute, clock)
        # A minute's whole allowance may arrive inside one freshness window.
        per_key = (settings.rate_limit_per_minute + 16 if settings.rate_limit_per_minute > 0
                   else 10_000)
        self._nonces = NonceWindow(settings.max_request_age_s, settings.clock_skew_s, per_key,
                                   clock_ns=clock_ns)
        self._log = RefusalLog(settings.refusal_log_period_s, settings.refusal_log_lines,
                               clock=clock)
        self._sync: Optional["MetagraphSync"] = None
        self.refused: collections.Counter = collections.Counter()
        self.admitted = 0
        self.resync_waits = 0

    @property
    def view(self) -> MetagraphView:
        return self._view

    def update(self, view: MetagraphView) -> None:
        """Swap in a fresh metagraph snapshot (one reference assignment: safe across threads)."""
        self._view = view

    def attach_sync(self, sync: "MetagraphSync") -> None:
        """Let permit-lag refusals ask `sync` for an early re-sync."""
        self._sync = sync

    # ----- the decision ---------------------------------------------------------------------
    def _identity(self, synapse: ImageSynapse) -> tuple[Optional[str], Optional[tuple[str, str]]]:
        d = synapse.dendrite
        hotkey = d.hotkey if d is not None else None
        if not hotkey:
            return hotkey, ("no_hotkey", "request carries no caller hotkey")
        if (len(hotkey) > MAX_HOTKEY_CHARS or len(d.uuid or "") > MAX_UUID_CHARS
                or len(d.signature or "") > MAX_SIGNATURE_CHARS):
            return hotkey, ("malformed", "hotkey, uuid or signature longer than any dendrite sends")
        return hotkey, None

    def _membership(self, hotkey: str) -> Optional[tuple[str, str]]:
        if hotkey in self._deny:
            return "denied", "hotkey is on the deny list"
        if hotkey in self._allow:
            return None
        info = self._view.get(hotkey)
        if info is None:
            return "unregistered", "hotkey not registered on the subnet"
        if self.settings.require_validator_permit and not info.validator_permit:
            return "no_permit", "caller has no validator permit"
        if info.stake < self.settings.min_stake:
            return "low_stake", f"stake {info.stake:g} < minimum {self.settings.min_stake:g}"
        return None

    def _authentic(self, synapse: ImageSynapse) -> Optional[tuple[str, str]]:
        """Signature, then freshness and replay (the nonce is used up here)."""
        if not self.settings.verify_signature:
            return None
        problem = verify_signature(synapse, self.receiver_hotkey)
        if problem is not None:
            return "bad_signature", problem
        d = synapse.dendrite
        return self._nonces.check(d.hotkey, int(d.nonce), d.uuid or "")

    def _finish(self, hotkey: str) -> Optional[tuple[str, str]]:
        if not self._rate.allow(hotkey):
            return "rate_limited", f"more than {self.settings.rate_limit_per_minute} requests a minute"
        return None

    def _refuse(self, hotkey: Optional[str], kind: str, detail: str) -> tuple[bool, str]:
        self.refused[kind] += 1
        self._log.note(hotkey, kind, detail)
        return True, f"{kind}: {detail}"

    def _admit(self, hotkey: str) -> tuple[bool, str]:
        self.admitted += 1
        ctx = request_context.current()
        if ctx is not None:
            info = self._view.get(hotkey)
            ctx.hotkey, ctx.stake = hotkey, float(info.stake) if info is not None else 0.0
        return False, "admitted"

    def check(self, synapse: ImageSynapse) -> tuple[bool, str]:
        """(True, reason) to refuse, (False, reason) to admit. Never raises, never waits."""
        hotkey, problem = self._identity(synapse)
        problem = problem or self._membership(hotkey)
        problem = problem or self._authentic(synapse) or self._finish(hotkey)
        if problem is not None:
            return self._refuse(hotkey, *problem)
        return self._admit(hotkey)

    async def check_async(self, synapse: ImageSynapse) -> tuple[bool, str]:
        """`check`, but a permit-lag refusal waits (bounded) for an early metagraph re-sync."""
        hotkey, problem = self._identity(synapse)
        problem = problem or self._membership(hotkey)
        if problem is not None and problem[0] in _LAG_KINDS and self._sync is not None:
            # Only a caller who really holds the hotkey may cost us a chain query.
            if not self.settings.verify_signature or verify_signature(
                    synapse, self.receiver_hotkey) is None:
                future = self._sync.request(early=True)
                if future is not None:
                    self.resync_waits += 1
                    await asyncio.wait({asyncio.wrap_future(future)},
                                       timeout=self.settings.resync_wait_s)
                    problem = self._membership(hotkey)
        problem = problem or self._authentic(synapse) or self._finish(hotkey)
        if problem is not None:
            return self._refuse(hotkey, *problem)
        return self._admit(hotkey)

    def priority(self, synapse: ImageSynapse) -> float:
        """Caller stake in the current snapshot (0 when unknown)."""
        d = synapse.dendrite
        info = self._view.get(d.hotkey) if d is not None and d.hotkey else None
        return float(info.stake) if info is not None else 0.0

    def stats(self) -> dict[str, Any]:
        return {"admitted": self.admitted, "refused": dict(self.refused),
                "metagraph_hotkeys": len(self._view), "allow_hotkeys": len(self._allow),
                "seen_nonces": len(self._nonces), "rate_limited_hotkeys": len(self._rate),
                "resync_waits": self.resync_waits}


class MetagraphSync:
    """Runs metagraph re-syncs one at a time off every event loop, and says when they fail.

    `sync` is a blocking callable returning a fresh `MetagraphView` (the neuron wraps
    `metagraph.sync` + `MetagraphView.from_metagraph`). A failed sync keeps the last snapshot;
    after `alert_after` failures in a row the state turns "stale", an error is logged (again at
    every further multiple of `alert_after`) and `stats()` says so until a sync succeeds.
    """

    def __init__(self, sync: Callable[[], MetagraphView], guard: Guard, *,
                 min_interval_s: float, alert_after: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sync = sync
        self._guard = guard
        self.min_interval_s = min_interval_s
        self.alert_after = max(1, alert_after)
        self._clock = clock
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                           thread_name_prefix="metagraph")
        self._lock = threading.Lock()
        self._inflight: Optional[concurrent.futures.Future] = None
        self._last_start: Optional[float] = None
        self._last_ok = clock()
        self.ok = 0
        self.failed = 0
        self.early = 0
        self.consecutive_failures = 0
        self.last_error = ""
        guard.attach_sync(self)

    def request(self, *, early: bool) -> Optional[concurrent.futures.Future]:
        """The running sync, or a new one; None for an early request inside the minimum interval."""
        with self._lock:
            if self._inflight is not None and not self._inflight.done():
                return self._inflight
            now = self._clock()
            if early and self._last_start is not None and now - self._last_start < self.min_interval_s:
                return None
            self._last_start = now
            self.early += early
            future = self._pool.submit(self._run)
            self._inflight = future
            return future

    def _run(self) -> MetagraphView:
        try:
            view = self._sync()
        except Exception as exc:  # noqa: BLE001 - the chain being away must not stop serving
            with self._lock:
                self.failed += 1
                self.consecutive_failures += 1
                self.last_error = clip(f"{type(exc).__name__}: {exc}", 300)
                n = self.consecutive_failures
            age = self._clock() - self._last_ok
            if n % self.alert_after == 0:
                logger.error("metagraph re-sync failed {} times in a row (last: {}); the guard is "
                             "still using the snapshot of {:.0f} s ago: new validators are refused "
                             "and lost permits still admitted", n, self.last_error, age)
            else:
                logger.warning("metagraph re-sync failed (keeping the last snapshot): {}",
                               self.last_error)
            raise
        self._guard.update(view)
        with self._lock:
            if self.consecutive_failures >= self.alert_after:
                logger.info("metagraph re-sync works again after {} failures",
                            self.consecutive_failures)
            self.ok += 1
            self.consecutive_failures = 0
            self._last_ok = self._clock()
        return view

    @property
    def stale(self) -> bool:
        return self.consecutive_failures >= self.alert_after

    def stats(self) -> dict[str, Any]:
        return {"state": "stale" if self.stale else "ok", "syncs_ok": self.ok,
                "syncs_failed": self.failed, "early_syncs": self.early,
                "consecutive_failures": self.consecutive_failures,
                "snapshot_age_s": round(self._clock() - self._last_ok, 1),
                "last_error": self.last_error}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def attach(axon: Any, forward: Callable, guard: Guard, synapse_cls: type = ImageSynapse) -> None:
    """Attach `forward` for `synapse_cls` behind `guard`, with the exact signatures the axon asserts.

    The axon compares the blacklist and verify signatures with the forward's synapse class, so
    they are stamped with `synapse_cls` (one guard serves every route). The forward is stamped
    too, so a revision's synapse class (`protocol.synapse_class`) gets its own parsing and hashing.
    No priority function is attached: bittensor runs it only to order a trivial task in its
    thread pool, which orders nothing; the miner's own admission gate uses `guard.priority`.
    """

    async def blacklist(synapse: ImageSynapse) -> typing.Tuple[bool, str]:
        try:
            return await guard.check_async(synapse)
        except Exception as exc:  # noqa: BLE001 - a guard bug must refuse, not crash the request
            logger.exception("guard failed; refusing the request: {}", exc)
            return True, f"guard_error: {type(exc).__name__}"

    def verify(synapse: ImageSynapse) -> None:
        """Signature, freshness and replay were decided in the blacklist step."""

    async def routed(synapse: ImageSynapse) -> ImageSynapse:
        return await forward(synapse)

    param = [inspect.Parameter("synapse", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                               annotation=synapse_cls)]
    blacklist.__signature__ = inspect.Signature(param, return_annotation=typing.Tuple[bool, str])
    verify.__signature__ = inspect.Signature(param, return_annotation=None)
    routed.__signature__ = inspect.Signature(param, return_annotation=synapse_cls)
    # With our own signature check off, bittensor's default_verify stays in place.
    axon.attach(forward_fn=routed, blacklist_fn=blacklist,
                verify_fn=verify if guard.settings.verify_signature else None)


def static_view(hotkeys: Iterable[str], *, stake: float = 0.0,
                validator_permit: bool = True) -> MetagraphView:
    """A view of fixed hotkeys (the `--local` miner's only callers)."""
    return MetagraphView({hk: CallerInfo(i, stake, validator_permit)
                          for i, hk in enumerate(hotkeys)})
