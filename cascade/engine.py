"""The async cascade engine: tiers resident, model work off the event loop, an answer by the deadline.

Layering follows vLLM's: the engine schedules (router, deadline, load shedding, fusion); each tier
has its own worker (`cascade.worker.TierWorker`: its own thread and queue, never shared with
another tier, so one slow or hung tier cannot delay another on the same device) behind a per-tier
micro-batcher (`cascade.runner.TierRunner`) that keeps one batch in flight.

For each request the tiers are asked cheapest first. Before a tier is asked, its expected model
time (median of recent batches, queue time excluded) and the time its queue would take are
weighed against the request's remaining budget: a tier whose model time does not fit is skipped
("budget"; after `LATENCY_PROBE_EVERY` such skips one request is let through to re-measure it, so
one stall never takes a tier out for good), a tier whose queue cannot serve the request in time
is skipped ("queue": load shedding, the request moves on at once instead of waiting to miss its
deadline). Each request waits for a tier's result for at most its remaining budget (and the
tier's `timeout_ms`); a result that arrives later is discarded, and the answer is fused from the
tiers that finished. A tier that raises, returns something that is not a finite probability, or
is still running when the request's time runs out is dropped from that answer and counts against
its breaker; after `failures_to_open` consecutive failures the breaker opens and one probe request
is let through after `cooldown_s`. A request that never started on a tier (shed, or still queued
at its deadline) is load, not a failure of that tier. Whatever the tiers do, the answer is a
finite probability in [0, 1] (the configured fallback when no tier answered).
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
from cascade.runner import (CircuitBreaker, InvalidTierOutput, Pending, QueueShed, TierRunner,
                            failure_kind, validate_outputs)
from cascade.store import UncertainStore, uncertainty_reason
from cascade.telemetry import Telemetry
from cascade.tier import MemoryNeeds, Tier, TierOutput
from cascade.worker import TierWorker

__all__ = ["CascadeEngine", "CascadeResult", "CircuitBreaker", "InvalidTierOutput", "TierStartError"]

STOP_TIMEOUT_S = 10.0
# A tier skipped this many requests in a row because its model-time estimate did not fit is
# asked once anyway (when its queue is idle and its configured expected_latency_ms fits), so a
# transient stall is re-measured instead of keeping the tier out for good.
LATENCY_PROBE_EVERY = 8


class TierStartError(RuntimeError):
    """A tier failed to build, load or warm up; the engine does not start without it."""


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
    # tier -> why it did not run for this request: breaker, budget (its model time does not
    # fit), queue (its queue could not serve the request in time: shed), no_time, decided (no
    # answer in the tier's output range could change the decision: `router.skip_if_decided`)
    skipped: dict[str, str] = field(default_factory=dict)
    shed: bool = False  # load shedding dropped a tier from this answer (a "queue" skip)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (logs, eval reports)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Asked:
    """What asking one tier gave: its answer, a failure kind, or a shed (it never ran)."""

    out: Optional[TierOutput] = None
    failure: Optional[str] = None
    shed: bool = False


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
        self._workers: dict[str, TierWorker] = {}
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

    async def _on_worker(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wrap_future(self._workers[name].submit(fn, *args))

    async def start(self) -> None:
        """Build every enabled tier, plan placement, load and warm up; ready only when all did.

        Each tier is built, loaded and warmed up on its own worker thread. Tiers that declare
        `load_alone` (vLLM) load first, one at a time, before any other tier starts loading.
        The other loads run one at a time too (their warm-ups overlap): transformers'
        `from_pretrained` patches process-wide state while it builds a model (torch init
        functions, `PreTrainedModel.tie_weights`), so two loads on two threads can leave a model's
        parameters on the meta device (seen with D-FINE by scripts/gpu_check.sh)."""
        if self._started:
            return
        specs = self.config.active_tiers
        if not specs:
            raise ConfigError(self.config.source, "tiers", "at least one tier with enabled: true")
        if self.config.engine.threads_per_device != 1:
            logger.warning("engine.threads_per_device is obsolete and ignored: every tier has its "
                           "own worker thread")
        self.load_calibration(self.calibration if self._calibration_given else None)
        self._workers = {s.name: TierWorker(s.name) for s in specs}
        self._load_lock = asyncio.Lock()
        self._aux = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cascade-aux")
        built: dict[str, Tier] = {}
        try:
            await self._build(specs, built)
            if self.placement is None:
                self.placement = plan_placement(specs, self.config.devices,
                                                needs=await self._memory_needs(specs, built))
            if not self.placement.fits:
                raise PlacementError(self.placement)
            first = [s for s in specs if built[s.name].load_alone]
            for spec in first:
                await self._bring_up(spec, built[spec.name])
            rest = [s for s in specs if not built[s.name].load_alone]
            results = await asyncio.gather(*(self._bring_up(s, built[s.name]) for s in rest),
                                           return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            for extra in errors[1:]:
                logger.error("{}", extra)
            if errors:
                raise errors[0]
        except BaseException:
            await self._close_tiers(built)
            self._shutdown_workers()
            raise
        breaker_cfg = self.config.engine.breaker
        for spec in specs:
            device = self.placement.assignments[spec.name]
            hung_after = (spec.timeout_ms or self.config.engine.deadline_ms) / 1000.0
            runner = TierRunner(spec, built[spec.name], device, self._workers[spec.name],
                                CircuitBreaker(breaker_cfg.failures_to_open, breaker_cfg.cooldown_s),
                                self.telemetry, hung_after_s=hung_after)
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

    async def _build(self, specs: Sequence[TierSpec], built: dict[str, Tier]) -> None:
        """Construct every tier (options validated) on its own worker; errors name the tier."""
        async def build(spec: TierSpec) -> None:
            try:
                built[spec.name] = await self._on_worker(spec.name, self.tier_factory, spec)
            except (MissingArtifactError, ConfigError):
                raise
            except Exception as exc:
                raise TierStartError(f"tier {spec.name} ({spec.backend}) could not be built: {exc!r}") from exc

        results = await asyncio.gather(*(build(s) for s in specs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _memory_needs(self, specs: Sequence[TierSpec], built: dict[str, Tier]) -> dict[str, MemoryNeeds]:
        """Each backend's own memory figures (exact parameter counts, vLLM's device fraction);
        a backend whose count fails is planned from its YAML figures."""
        needs: dict[str, MemoryNeeds] = {}
        for spec in specs:  # one at a time: counting builds models on the meta device
            try:
                needs[spec.name] = await self._on_worker(spec.name, built[spec.name].memory_needs)
            except Exception as exc:  # noqa: BLE001 - a count is a refinement, never a blocker
                logger.warning("tier {}: memory count failed ({!r}); planning from params_m",
                               spec.name, exc)
        return needs

    async def _bring_up(self, spec: TierSpec, tier: Tier) -> Tier:
        """Bind, load and warm up one tier on its worker; the warm-up outputs must be finite
        probabilities in [0, 1] (a NaN head never starts "ready")."""
        device = self.placement.assignments[spec.name]
        t0 = time.monotonic()
        try:
            tier.device = device
            async with self._load_lock:  # one load at a time: see start()
                await self._on_worker(spec.name, tier.bind_worker, device)
                await self._on_worker(spec.name, tier.load, device)
            outs = await self._on_worker(spec.name, tier.warmup)
            if outs is None:
                warm = Image.new("RGB", (640, 480), (90, 90, 90))
                outs = await self._on_worker(spec.name, tier.predict, [warm])
            bad = [o for o in validate_outputs(tier, outs, None) if isinstance(o, Exception)]
            if bad:
                raise TierStartError(f"tier {spec.name} ({spec.backend}) failed its warm-up on {device}: "
                                     f"{bad[0]} (a tier must answer finite probabilities in [0, 1])")
        except (MissingArtifactError, ConfigError, TierStartError):
            raise
        except Exception as exc:
            raise TierStartError(f"tier {spec.name} ({spec.backend}) failed to start on {device}: "
                                 f"{exc!r}") from exc
        logger.info("tier {} loaded and warmed up on {} in {:.1f} s", spec.name, device, time.monotonic() - t0)
        return tier

    async def stop(self) -> None:
        """Stop the batchers, close the tiers, release the worker threads and the store."""
        self._ready = False
        self.telemetry.ready.set(0)
        for r in self._runners:
            await r.stop()
        await self._close_tiers({r.name: r.tier for r in self._runners})
        self._runners = []
        self._shutdown_workers()
        if self.store is not None:
            store, self.store = self.store, None
            await asyncio.get_running_loop().run_in_executor(None, store.close)
        self._started = False

    async def _close_tiers(self, tiers: dict[str, Tier]) -> None:
        """Close every tier on a fresh thread: its worker may still be stuck in a call the
        deadline abandoned, and shutdown must not wait behind it (bounded by STOP_TIMEOUT_S)."""
        loop = asyncio.get_running_loop()
        for name, tier in tiers.items():
            try:
                await asyncio.wait_for(loop.run_in_executor(None, tier.close), STOP_TIMEOUT_S)
            except Exception as exc:
                logger.warning("tier {} did not close cleanly: {!r}", name, exc)

    def _shutdown_workers(self) -> None:
        for worker in self._workers.values():
            worker.shutdown(wait=False)
        self._workers = {}
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
        threshold: Optional[float] = None

        for runner in self._runners:
            remaining_ms = (deadline - time.monotonic()) * 1000.0
            if deadline_hit or remaining_ms <= 0:
                skipped[runner.name] = "no_time"
                continue
            if cal and self.config.router.skip_if_decided and \
                    self._cannot_flip(runner, cal, decision, threshold):
                skipped[runner.name] = "decided"
                self.telemetry.tier_skipped.labels(runner.name, "decided").inc()
                continue
            reason, latency_probe = self._admission(runner, remaining_ms)
            if reason is None and not runner.allow():
                reason = "breaker"
            if reason is not None:
                skipped[runner.name] = reason
                if reason == "queue":
                    runner.record_shed()
                else:
                    self.telemetry.tier_skipped.labels(runner.name, reason).inc()
                continue
            asked.append(runner.name)
            got = await self._ask(runner, image, deadline, latency_probe)
            if got.shed:
                asked.remove(runner.name)
                skipped[runner.name] = "queue"
                continue
            if got.out is None:
                failed.append(runner.name)
                deadline_hit = deadline_hit or got.failure == "deadline"
                continue
            raw[runner.name] = float(got.out.prob)
            cal[runner.name] = self.calibration.calibrate(runner.name, float(got.out.prob))
            evidence[runner.name] = dict(got.out.evidence or {})
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
        shed = "queue" in skipped.values()
        self._count(asked, fallback, deadline_hit, shed, latency_ms, budget)
        result = CascadeResult(prob=prob, tier_probs=cal, raw_probs=raw, stopped_after=stopped_after,
                               escalated=len(asked) > 1, fallback=fallback, latency_ms=latency_ms,
                               conditions=conditions, decision=decision, evidence=evidence, failed=failed,
                               fused=None if fallback else fused, deadline_hit=deadline_hit,
                               skipped=skipped, shed=shed)
        if self.store is not None and not fallback:
            self._maybe_store(image, result)
        return result

    def _cannot_flip(self, runner: TierRunner, cal: dict[str, float], decision: str,
                     threshold: Optional[float]) -> bool:
        """Whether every answer in the tier's declared output range leaves the decision
        (fused >= threshold) where it is now. Exact: per-tier calibration is monotone and the
        fused probability is monotone in each tier's, so the range's two ends bound it."""
        try:
            rng = runner.tier.output_range()
        except Exception:  # noqa: BLE001 - a broken declaration only costs the skip
            return False
        if rng is None:
            return False
        t = self.router.threshold if threshold is None else threshold
        now = self._fuse(cal, decision) >= t
        for p in rng:
            with_it = {**cal, runner.name: self.calibration.calibrate(runner.name, float(p))}
            if (self._fuse(with_it, decision) >= t) != now:
                return False
        return True

    def _admission(self, runner: TierRunner, remaining_ms: float) -> tuple[Optional[str], bool]:
        """(why the tier is skipped or None, whether it is asked as a latency probe).

        "budget": its expected model time alone does not fit (every `LATENCY_PROBE_EVERY`-th
        such request asks it anyway when it is idle, to re-measure it); "queue": the queue ahead
        would make the request miss its deadline (shed now, not late)."""
        queue_ms, model_ms = runner.expected_wait_ms()
        if not self.router.fits(model_ms, remaining_ms):
            if runner.budget_skips >= LATENCY_PROBE_EVERY and runner.idle \
                    and self.router.fits(runner.spec.expected_latency_ms, remaining_ms):
                return None, True
            runner.budget_skips += 1
            return "budget", False
        if not self.router.fits(queue_ms + model_ms, remaining_ms):
            return "queue", False
        return None, False

    async def _ask(self, runner: TierRunner, image: Image.Image, deadline: float,
                   latency_probe: bool) -> "_Asked":
        """Queue the image on the tier and wait for its answer until the request's deadline
        (or the tier's timeout); judge what came back and tell the breaker."""
        is_probe = runner.breaker.state == "half_open"
        remaining = deadline - time.monotonic()
        limit = remaining if runner.timeout_s is None else min(remaining, runner.timeout_s)
        pending: Pending = runner.submit(image, deadline, latency_probe=latency_probe)
        try:
            done, _ = await asyncio.wait({pending.future}, timeout=max(0.0, limit))
        except asyncio.CancelledError:  # the caller gave up (e.g. the shell's wait_for)
            pending.future.cancel()  # the batcher skips it if still queued
            if is_probe:
                runner.breaker.abandon_probe()
            raise
        if not done:
            pending.future.cancel()  # the batcher skips it if still queued; a late result is discarded
            if pending.started is None:  # it never ran: load, not a failure of the tier
                if is_probe:
                    runner.breaker.abandon_probe()
                runner.record_shed()
                return _Asked(shed=True)
            kind = "deadline" if runner.timeout_s is None or runner.timeout_s >= remaining else "timeout"
            runner.record_failure(kind)
            return _Asked(failure=kind)
        out = pending.future.result()
        if isinstance(out, QueueShed):
            if is_probe:
                runner.breaker.abandon_probe()
            runner.record_shed()
            return _Asked(shed=True)
        if isinstance(out, BaseException):
            kind = failure_kind(out)
            runner.record_failure(kind)
            logger.debug("tier {} failed on a request: {!r}", runner.name, out)
            return _Asked(failure=kind)
        runner.record_success()
        return _Asked(out=out)

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

    def _count(self, asked: list[str], fallback: bool, deadline_hit: bool, shed: bool,
               latency_ms: float, budget_s: float) -> None:
        t = self.telemetry
        self._answers += 1
        t.answers.labels("fallback" if fallback else "fused").inc()
        t.request_latency.observe(latency_ms / 1000.0)
        if len(asked) > 1:
            t.escalations.inc()
        if deadline_hit:
            t.deadline_misses.inc()
        if shed:
            t.shed.inc()
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
        futs = {r.name: r.submit(image).future for r in self._runners}  # no deadline: never shed
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
                                         "failures": 0, "calls": 0, "model_ms": None, "hung": False})
        return {"ready": self._ready, "answers": self._answers,
                "hung_tiers": [n for n, t in tiers.items() if t.get("hung")],
                "calibration": self.calibration.source or ("identity" if self.calibration.is_identity
                                                           else "in-memory"),
                "threshold": self.router.threshold,
                "placement": dict(self.placement.assignments) if self.placement else {},
                "tiers": tiers}
