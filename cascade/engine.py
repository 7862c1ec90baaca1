"""The async cascade engine: tiers resident, model work off the event loop, an answer by the deadline.

Layering follows vLLM's: the engine schedules (router, deadline, fusion); a per-device worker (a
thread pool of `threads_per_device` threads) runs `tier.predict`; a per-tier micro-batcher
collects concurrent requests up to `max_batch_size` (waiting at most `max_wait_ms` for more) and
keeps one batch in flight per tier, so under load the requests that arrive while the tier is busy
become the next batch. Each request waits for a tier's result for at most its remaining budget
(and the tier's `timeout_ms`); a result that arrives later is discarded, and the answer is fused
from the tiers that finished. A tier that raises, returns garbage or times out is dropped from that
answer and counted; after `failures_to_open` consecutive failures its circuit breaker opens and
one probe request is let through after `cooldown_s`. Whatever the tiers do, the answer is a finite
probability in [0, 1] (the configured fallback when no tier answered).
"""

import asyncio
import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from loguru import logger
from PIL import Image

from cascade.calibration import POOLED, CalibrationSet
from cascade.conditions import estimate_conditions
from cascade.config import CascadeConfig, TierSpec
from cascade.consensus import weighted_geometric_mean
from cascade.errors import ConfigError, MissingArtifactError
from cascade.placement import Placement, PlacementError, plan_placement
from cascade.router import Router
from cascade.store import UncertainStore, uncertainty_reason
from cascade.telemetry import BREAKER_STATES, Telemetry
from cascade.tier import Tier, TierOutput

LATENCY_EMA_ALPHA = 0.2
STOP_TIMEOUT_S = 10.0


class TierStartError(RuntimeError):
    """A tier failed to build, load or warm up; the engine does not start without it."""


class InvalidTierOutput(ValueError):
    """A tier returned something that is not a probability in [0, 1]."""


@dataclass
class CascadeResult:
    """One answer. `prob` is what the miner sends: finite, in [0, 1], after the threshold map."""

    prob: float
    tier_probs: dict[str, float] = field(default_factory=dict)  # calibrated, per tier that answered
    raw_probs: dict[str, float] = field(default_factory=dict)  # as the tiers returned them
    stopped_after: Optional[str] = None  # last tier that answered (None: fallback)
    escalated: bool = False  # more than one tier was asked
    fallback: bool = False  # no tier answered: prob is the configured fallback
    latency_ms: float = 0.0
    conditions: dict[str, Any] = field(default_factory=dict)
    decision: str = POOLED  # whose threshold map and weights applied: "pooled" or a condition
    evidence: dict[str, dict] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)  # tiers asked that raised / timed out / returned garbage
    fused: Optional[float] = None  # fused calibrated probability before the threshold map
    deadline_hit: bool = False  # the deadline cut a tier still running
    skipped: dict[str, str] = field(default_factory=dict)  # tier -> why it was not asked (breaker, budget)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (logs, eval reports)."""
        return dataclasses.asdict(self)


class CircuitBreaker:
    """closed -> (n consecutive failures) -> open -> (cooldown) -> half_open: one probe -> closed/open."""

    def __init__(self, failures_to_open: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failures_to_open = max(1, failures_to_open)
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.state = "closed"
        self.consecutive_failures = 0
        self.opened_at = 0.0
        self.probe_in_flight = False

    def allow(self) -> bool:
        """Whether a request may use the tier now (in half-open state: exactly one probe)."""
        if self.state == "closed":
            return True
        if self.state == "open" and self.clock() - self.opened_at >= self.cooldown_s:
            self.state = "half_open"
            self.probe_in_flight = False
        if self.state == "half_open" and not self.probe_in_flight:
            self.probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        if self.state != "closed":
            logger.info("circuit breaker closed again after a successful probe")
        self.state = "closed"
        self.consecutive_failures = 0
        self.probe_in_flight = False

    def abandon_probe(self) -> None:
        """The half-open probe's requester went away (cancelled) before a verdict: without this
        the breaker would wait forever for a probe that never reports, keeping the tier out."""
        if self.state == "half_open":
            self.probe_in_flight = False

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        self.probe_in_flight = False
        if self.state == "half_open" or self.consecutive_failures >= self.failures_to_open:
            self.state = "open"
            self.opened_at = self.clock()


@dataclass
class _Pending:
    image: Image.Image
    future: "asyncio.Future[Any]"
    submitted: float


def _check_outputs(tier: Tier, images: Sequence[Image.Image]) -> list["TierOutput | Exception"]:
    """Run `tier.predict` (on a worker thread) and turn anything that is not a probability into an error."""
    outs = tier.predict(list(images))
    if not isinstance(outs, (list, tuple)) or len(outs) != len(images):
        got = len(outs) if isinstance(outs, (list, tuple)) else type(outs).__name__
        raise InvalidTierOutput(f"tier {tier.name} returned {got} outputs for {len(images)} images")
    checked: list["TierOutput | Exception"] = []
    for out in outs:
        if isinstance(out, Exception):
            checked.append(out)
            continue
        prob = getattr(out, "prob", None)
        try:
            ok = prob is not None and not isinstance(prob, bool) and math.isfinite(float(prob)) \
                and 0.0 <= float(prob) <= 1.0
        except (TypeError, ValueError):
            ok = False
        checked.append(out if ok else InvalidTierOutput(f"tier {tier.name} returned prob={prob!r}"))
    return checked


class TierRunner:
    """One tier's micro-batcher, breaker and counters."""

    def __init__(self, spec: TierSpec, tier: Tier, device: str, executor: ThreadPoolExecutor,
                 breaker: CircuitBreaker, telemetry: Telemetry) -> None:
        self.spec = spec
        self.tier = tier
        self.device = device
        self.executor = executor
        self.breaker = breaker
        self.telemetry = telemetry
        self.calls = 0
        self.failures = 0
        self.failures_by_kind: dict[str, int] = {}
        self.batches = 0
        self.latency_ema_ms: Optional[float] = None
        self.timeout_s = None if spec.timeout_ms is None else spec.timeout_ms / 1000.0
        self._queue: "asyncio.Queue[_Pending]" = asyncio.Queue()
        self._task: Optional[asyncio.Task] = None
        self._set_gauge()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def expected_latency_ms(self) -> float:
        return self.spec.expected_latency_ms if self.latency_ema_ms is None else self.latency_ema_ms

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher:{self.name}")

    def submit(self, image: Image.Image) -> "asyncio.Future[Any]":
        loop = asyncio.get_running_loop()
        fut: "asyncio.Future[Any]" = loop.create_future()
        self._queue.put_nowait(_Pending(image, fut, time.monotonic()))
        self.calls += 1
        self.telemetry.tier_calls.labels(self.name).inc()
        return fut

    def allow(self) -> bool:
        allowed = self.breaker.allow()
        self._set_gauge()
        return allowed

    def record_success(self) -> None:
        self.breaker.record_success()
        self._set_gauge()

    def record_failure(self, kind: str) -> None:
        was = self.breaker.state
        self.breaker.record_failure()
        self.failures += 1
        self.failures_by_kind[kind] = self.failures_by_kind.get(kind, 0) + 1
        self.telemetry.tier_failures.labels(self.name, kind).inc()
        if self.breaker.state == "open" and was != "open":
            logger.warning("tier {} taken out of rotation after {} consecutive failures (last: {}); "
                           "probe in {:.0f} s", self.name, self.breaker.consecutive_failures, kind,
                           self.breaker.cooldown_s)
        self._set_gauge()

    def _set_gauge(self) -> None:
        self.telemetry.breaker_state.labels(self.name).set(BREAKER_STATES[self.breaker.state])

    async def _collect(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        max_batch = self.spec.max_batch_size
        if self.spec.max_wait_ms > 0:
            loop = asyncio.get_running_loop()
            until = loop.time() + self.spec.max_wait_ms / 1000.0
            while len(batch) < max_batch:
                left = until - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
        while len(batch) < max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [p for p in batch if not p.future.done()]  # requests that gave up are not run
            if not live:
                continue
            self.batches += 1
            self.telemetry.tier_batch_size.labels(self.name).observe(len(live))
            try:
                outs: list[Any] = await loop.run_in_executor(
                    self.executor, _check_outputs, self.tier, [p.image for p in live])
            except asyncio.CancelledError:
                for p in live:
                    if not p.future.done():
                        p.future.set_result(RuntimeError("engine stopped"))
                raise
            except Exception as exc:  # the whole batch failed: every item carries the error
                outs = [exc] * len(live)
            now = time.monotonic()
            lat = [(now - p.submitted) * 1000.0 for p in live]
            for p, out, ms in zip(live, outs, lat):
                self.telemetry.tier_latency.labels(self.name).observe(ms / 1000.0)
                if not p.future.done():
                    p.future.set_result(out)
            mean_ms = sum(lat) / len(lat)
            self.latency_ema_ms = mean_ms if self.latency_ema_ms is None else \
                (1 - LATENCY_EMA_ALPHA) * self.latency_ema_ms + LATENCY_EMA_ALPHA * mean_ms

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        while not self._queue.empty():
            p = self._queue.get_nowait()
            if not p.future.done():
                p.future.set_result(RuntimeError("engine stopped"))

    def health(self) -> dict[str, Any]:
        try:
            described = self.tier.describe()
        except Exception as exc:  # health must answer even when a backend's describe breaks
            described = {"error": repr(exc)}
        return {"loaded": True, "device": self.device, "breaker": self.breaker.state,
                "consecutive_failures": self.breaker.consecutive_failures,
                "failures": self.failures, "failures_by_kind": dict(self.failures_by_kind),
                "calls": self.calls, "batches": self.batches, "queued": self._queue.qsize(),
                "latency_ema_ms": None if self.latency_ema_ms is None else round(self.latency_ema_ms, 2),
                "expected_latency_ms": round(self.expected_latency_ms, 2), "describe": described}


class CascadeEngine:
    """See the module docstring. Construct, `await start()`, `await predict(image)`, `await stop()`."""

    def __init__(self, config: CascadeConfig, tier_factory: Callable[[TierSpec], Tier], *,
                 telemetry: Optional[Telemetry] = None, placement: Optional[Placement] = None,
                 calibration: Optional[CalibrationSet] = None) -> None:
        self.config = config
        self.tier_factory = tier_factory
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.placement = placement
        self.calibration: CalibrationSet = calibration if calibration is not None else CalibrationSet.identity()
        self._calibration_given = calibration is not None
        # apply a condition's own threshold map and weights where the calibration has them
        # (eval turns this off to measure what they change)
        self.condition_aware = True
        self.router = Router(config.router)
        self.store: Optional[UncertainStore] = None
        self._runners: list[TierRunner] = []
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._aux: Optional[ThreadPoolExecutor] = None
        self._ready = False
        self._started = False
        self._answers = 0

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def tiers(self) -> dict[str, Tier]:
        """The loaded tier instances, in cascade order."""
        return {r.name: r.tier for r in self._runners}

    async def __aenter__(self) -> "CascadeEngine":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def load_calibration(self, calibration: Optional[CalibrationSet] = None) -> CalibrationSet:
        """(Re)load the calibration (the configured file unless one is given) and re-aim the router."""
        if calibration is None:
            calibration = CalibrationSet.load(self.config.resolve(self.config.engine.calibration))
        self.calibration = calibration
        self._weights = self._consensus_weights()
        priors = {t.name: t.weight for t in self.config.active_tiers}
        self._decision_weights = {d: calibration.weights_for(d, priors)
                                  for d in (POOLED, *calibration.conditions)}
        self.router = Router(self.config.router,
                             threshold=calibration.decision_threshold(self.config.router.threshold))
        return calibration

    async def start(self) -> None:
        """Plan placement, build, load and warm up every enabled tier; ready only when all did."""
        if self._started:
            return
        loop = asyncio.get_running_loop()
        specs = self.config.active_tiers
        if not specs:
            raise ConfigError(self.config.source, "tiers", "at least one tier with enabled: true")
        self.load_calibration(self.calibration if self._calibration_given else None)
        if self.placement is None:
            self.placement = plan_placement(specs, self.config.devices)
        if not self.placement.fits:
            raise PlacementError(self.placement)
        threads = self.config.engine.threads_per_device
        for spec in specs:
            device = self.placement.assignments[spec.name]
            if device not in self._executors:
                self._executors[device] = ThreadPoolExecutor(
                    max_workers=threads, thread_name_prefix=f"cascade-{device.replace(':', '')}")
        self._aux = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cascade-aux")
        built: dict[str, Tier] = {}

        async def bring_up(spec: TierSpec) -> Tier:
            device = self.placement.assignments[spec.name]
            ex = self._executors[device]
            t0 = time.monotonic()
            tier = await loop.run_in_executor(ex, self.tier_factory, spec)
            built[spec.name] = tier
            tier.device = device
            await loop.run_in_executor(ex, tier.load, device)
            await loop.run_in_executor(ex, tier.warmup)
            logger.info("tier {} loaded and warmed up on {} in {:.1f} s", spec.name, device,
                        time.monotonic() - t0)
            return tier

        results = await asyncio.gather(*(bring_up(s) for s in specs), return_exceptions=True)
        errors = [(s, r) for s, r in zip(specs, results) if isinstance(r, BaseException)]
        if errors:
            await self._close_tiers(built)
            self._shutdown_executors()
            spec, exc = errors[0]
            for other, e in errors[1:]:
                logger.error("tier {} also failed to start: {!r}", other.name, e)
            if isinstance(exc, (MissingArtifactError, ConfigError)):
                raise exc
            raise TierStartError(f"tier {spec.name} ({spec.backend}) failed to start on "
                                 f"{self.placement.assignments[spec.name]}: {exc!r}") from exc
        breaker_cfg = self.config.engine.breaker
        for spec, tier in zip(specs, results):
            device = self.placement.assignments[spec.name]
            runner = TierRunner(spec, tier, device, self._executors[device],
                                CircuitBreaker(breaker_cfg.failures_to_open, breaker_cfg.cooldown_s),
                                self.telemetry)
            runner.start()
            self._runners.append(runner)
        store_cfg = self.config.engine.store
        if store_cfg.enabled:
            self.store = UncertainStore.from_config(self.config.resolve(store_cfg.dir), store_cfg,
                                                    on_saved=self.telemetry.store_saved.inc,
                                                    on_dropped=self.telemetry.store_dropped.inc)
        self._started = True
        self._ready = True
        self.telemetry.ready.set(1)
        logger.info("cascade ready: {}", " -> ".join(f"{r.name}@{r.device}" for r in self._runners))

    async def stop(self) -> None:
        """Stop the batchers, close the tiers on their workers, release threads and the store."""
        self._ready = False
        self.telemetry.ready.set(0)
        for r in self._runners:
            await r.stop()
        await self._close_tiers({r.name: r.tier for r in self._runners})
        self._runners = []
        self._shutdown_executors()
        if self.store is not None:
            store, self.store = self.store, None
            await asyncio.get_running_loop().run_in_executor(None, store.close)
        self._started = False

    async def _close_tiers(self, tiers: dict[str, Tier]) -> None:
        """Close every tier on a fresh thread: its device worker may still be stuck in a call the
        deadline abandoned, and shutdown must not wait behind it (bounded by STOP_TIMEOUT_S)."""
        loop = asyncio.get_running_loop()
        for name, tier in tiers.items():
            try:
                await asyncio.wait_for(loop.run_in_executor(None, tier.close), STOP_TIMEOUT_S)
            except Exception as exc:
                logger.warning("tier {} did not close cleanly: {!r}", name, exc)

    def _shutdown_executors(self) -> None:
        for ex in self._executors.values():
            ex.shutdown(wait=False, cancel_futures=True)
        self._executors = {}
        if self._aux is not None:
            self._aux.shutdown(wait=False, cancel_futures=True)
            self._aux = None

    # ------------------------------------------------------------------ requests

    def _fuse(self, cal: dict[str, float], decision: str = POOLED) -> float:
        names = list(cal)
        weights = self._decision_weights.get(decision, self._weights)
        return weighted_geometric_mean([cal[n] for n in names], [weights[n] for n in names])

    def _consensus_weights(self) -> dict[str, float]:
        """Fitted weights where the calibration has them; config priors, rescaled onto the fitted
        scale, for tiers it does not know (`cascade.calibration.resolve_weights`)."""
        return self.calibration.weights_for(POOLED, {t.name: t.weight for t in self.config.active_tiers})

    def _decision_for(self, conditions: Optional[dict[str, Any]]) -> str:
        """The maps this image gets: its condition's own threshold map and consensus weights where
        the calibration has them (first condition in `cascade.conditions.PRIORITY` order), else
        the pooled ones. Per-tier calibrators are pooled for every image."""
        return self.calibration.decision_for(conditions) if self.condition_aware else POOLED

    async def predict(self, image: Image.Image, deadline_s: Optional[float] = None) -> CascadeResult:
        """Answer one image within `deadline_s` (default: the config's `deadline_ms`)."""
        if not self._ready:
            raise RuntimeError("CascadeEngine.predict called before start() finished (engine not ready)")
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        budget = self.config.engine.deadline_ms / 1000.0
        if deadline_s is not None and math.isfinite(deadline_s):
            budget = max(0.0, float(deadline_s))
        deadline = t0 + budget
        self.telemetry.requests.inc()
        cond_fut = loop.run_in_executor(self._aux, estimate_conditions, image, self.config.engine.conditions)
        conditions: Optional[dict[str, Any]] = None
        raw: dict[str, float] = {}
        cal: dict[str, float] = {}
        evidence: dict[str, dict] = {}
        failed: list[str] = []
        skipped: dict[str, str] = {}
        asked: list[str] = []
        deadline_hit = False
        fused: Optional[float] = None
        stopped_after: Optional[str] = None
        decision = POOLED

        for runner in self._runners:
            remaining = deadline - time.monotonic()
            if deadline_hit or remaining <= 0:
                skipped[runner.name] = "no_time"
                continue
            if cal and not self.router.fits(runner.expected_latency_ms, remaining * 1000.0):
                skipped[runner.name] = "budget"
                self.telemetry.tier_skipped.labels(runner.name, "budget").inc()
                continue
            if not runner.allow():
                skipped[runner.name] = "breaker"
                self.telemetry.tier_skipped.labels(runner.name, "breaker").inc()
                continue
            is_probe = runner.breaker.state == "half_open"
            asked.append(runner.name)
            fut = runner.submit(image)
            limit = remaining if runner.timeout_s is None else min(remaining, runner.timeout_s)
            try:
                done, _ = await asyncio.wait({fut}, timeout=limit)
            except asyncio.CancelledError:  # the caller gave up (e.g. the shell's wait_for)
                fut.cancel()  # the batcher skips it if still queued
                if is_probe:
                    runner.breaker.abandon_probe()
                raise
            if not done:
                fut.cancel()  # the batcher skips it if still queued; a late result is discarded
                by_deadline = runner.timeout_s is None or runner.timeout_s >= remaining
                runner.record_failure("deadline" if by_deadline else "timeout")
                failed.append(runner.name)
                deadline_hit = deadline_hit or by_deadline
                continue
            out = fut.result()
            if isinstance(out, BaseException):
                runner.record_failure("invalid" if isinstance(out, InvalidTierOutput) else "error")
                failed.append(runner.name)
                logger.debug("tier {} failed on a request: {!r}", runner.name, out)
                continue
            runner.record_success()
            raw[runner.name] = float(out.prob)
            cal[runner.name] = self.calibration.calibrate(runner.name, float(out.prob))
            evidence[runner.name] = dict(out.evidence or {})
            stopped_after = runner.name
            if conditions is None:  # computed alongside the first tier: ready by now
                conditions = await self._await_conditions(cond_fut, deadline)
                decision = self._decision_for(conditions)
            fused = self._fuse(cal, decision)
            t_star = self.calibration.threshold_map_for(decision)
            threshold = None if decision == POOLED or t_star.is_identity else t_star.t_star
            if self.router.should_stop(fused, len(cal), conditions, threshold=threshold).stop:
                break

        if conditions is None:
            conditions = cond_fut.result() if cond_fut.done() and not cond_fut.cancelled() \
                and cond_fut.exception() is None else {}
            if not cond_fut.done():
                cond_fut.cancel()
        fallback = fused is None or not math.isfinite(fused)
        prob = self.config.engine.fallback_probability if fallback \
            else float(self.calibration.threshold_map_for(decision)(fused))
        if not math.isfinite(prob):
            prob, fallback = self.config.engine.fallback_probability, True
        prob = min(1.0, max(0.0, float(prob)))
        latency_ms = (time.monotonic() - t0) * 1000.0
        self._count(asked, fallback, deadline_hit, latency_ms, budget)
        result = CascadeResult(prob=prob, tier_probs=cal, raw_probs=raw, stopped_after=stopped_after,
                               escalated=len(asked) > 1, fallback=fallback, latency_ms=latency_ms,
                               conditions=conditions, decision=decision, evidence=evidence, failed=failed,
                               fused=None if fallback else fused, deadline_hit=deadline_hit,
                               skipped=skipped)
        if self.store is not None and not fallback:
            self._maybe_store(image, result)
        return result

    async def _await_conditions(self, fut: "asyncio.Future[dict]", deadline: float) -> dict[str, Any]:
        left = deadline - time.monotonic()
        if (left <= 0 and not fut.done()) or fut.cancelled():  # cancelled: stop() dropped the work
            return {}
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(left, 0.0))
        except Exception as exc:  # a broken image statistic must not cost the answer
            if not isinstance(exc, asyncio.TimeoutError):
                logger.debug("condition estimate failed: {!r}", exc)
            return {}

    def _count(self, asked: list[str], fallback: bool, deadline_hit: bool, latency_ms: float,
               budget_s: float) -> None:
        t = self.telemetry
        self._answers += 1
        t.answers.labels("fallback" if fallback else "fused").inc()
        t.request_latency.observe(latency_ms / 1000.0)
        if len(asked) > 1:
            t.escalations.inc()
        if deadline_hit:
            t.deadline_misses.inc()
        if latency_ms > budget_s * 1000.0 + 1.0:
            t.late_answers.inc()

    def _maybe_store(self, image: Image.Image, result: CascadeResult) -> None:
        assert self.store is not None
        reason = uncertainty_reason(result.prob, result.tier_probs, self.config.engine.store)
        if reason is None:
            return
        record = {"tier_probs": result.tier_probs, "raw_probs": result.raw_probs,
                  "fused": result.fused, "conditions": result.conditions, "failed": result.failed,
                  "evidence": result.evidence, "stopped_after": result.stopped_after,
                  "decision": result.decision}
        self.store.submit(image, record, prob=result.prob, reason=reason)

    async def predict_batch(self, images: Sequence[Image.Image],
                            deadline_s: Optional[float] = None) -> list[CascadeResult]:
        """Answer many images concurrently (offline eval); each keeps its own deadline."""
        return list(await asyncio.gather(*(self.predict(im, deadline_s) for im in images)))

    async def tier_outputs(self, image: Image.Image, *,
                           timeout_s: Optional[float] = None) -> dict[str, "TierOutput | Exception"]:
        """Every enabled tier's raw output for one image, ignoring the router and the breakers.

        For `calibrate` and `eval`, which need all tiers on every labelled image. Tiers run
        concurrently through their batchers; a tier that does not answer within `timeout_s`
        (default: the engine deadline) gets a TimeoutError in its slot.
        """
        if not self._ready:
            raise RuntimeError("CascadeEngine.tier_outputs called before start() finished")
        limit = self.config.engine.deadline_ms / 1000.0 if timeout_s is None else timeout_s
        futs = {r.name: r.submit(image) for r in self._runners}
        done, _ = await asyncio.wait(set(futs.values()), timeout=limit)
        out: dict[str, "TierOutput | Exception"] = {}
        for name, fut in futs.items():
            if fut in done:
                out[name] = fut.result()
            else:
                fut.cancel()
                out[name] = TimeoutError(f"tier {name} did not answer within {limit:.2f} s")
        return out

    def health(self) -> dict[str, Any]:
        """Readiness (every tier loaded and warmed up) and each tier's state and counters."""
        tiers: dict[str, Any] = {r.name: r.health() for r in self._runners}
        for spec in self.config.active_tiers:
            tiers.setdefault(spec.name, {"loaded": False, "device": spec.device, "breaker": "closed",
                                         "failures": 0, "calls": 0, "latency_ema_ms": None})
        return {"ready": self._ready, "answers": self._answers,
                "calibration": self.calibration.source or ("identity" if self.calibration.is_identity
                                                           else "in-memory"),
                "threshold": self.router.threshold,
                "placement": dict(self.placement.assignments) if self.placement else {},
                "tiers": tiers}
