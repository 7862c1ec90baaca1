"""One tier in the engine: its micro-batcher, worker thread, breaker, model-time estimate, counters.

A request is queued on the tier's runner with its deadline. The batcher collects concurrent
requests up to `max_batch_size` (waiting at most `max_wait_ms` for more) and keeps one batch in
flight on the tier's own worker thread (`cascade.worker.TierWorker`); requests arriving while it
runs become the next batch. Before a batch starts, every request in it whose deadline leaves less
than the tier's expected model time is shed (answered `QueueShed` without running): work that
cannot finish in time is not started. `expected_wait_ms` tells the engine, before it queues a
request, how long the queue ahead would take and how long the request's own batch would run, so
it can shed at once instead of queueing a request that would miss its deadline.

Only what the tier itself did counts against its breaker: a call that raised, returned something
that is not a probability, or was still running when the request's time ran out. A request that
never started on the tier (shed, or still queued at its deadline) is load, not a tier failure.
"""

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from loguru import logger
from PIL import Image

from cascade.config import TierSpec
from cascade.telemetry import BREAKER_STATES, Telemetry
from cascade.tier import Tier, TierOutput
from cascade.worker import ModelTime, TierWorker


class InvalidTierOutput(ValueError):
    """A tier returned something that is not a finite probability in [0, 1]."""


class QueueShed(Exception):
    """The request's budget ran out before the tier could start it (load, not a tier failure)."""


def failure_kind(out: BaseException) -> str:
    """Counter label of a failed tier answer: non-finite or out-of-range values are 'invalid'."""
    return "invalid" if isinstance(out, (InvalidTierOutput, FloatingPointError)) else "error"


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
        """The half-open probe never reached a verdict (its requester was cancelled, or it was
        shed before it ran): without this the breaker would wait forever for a probe that never
        reports, keeping the tier out."""
        if self.state == "half_open":
            self.probe_in_flight = False

    def record_failure(self) -> None:
        self.consecutive_failures += 1
        self.probe_in_flight = False
        if self.state == "half_open" or self.consecutive_failures >= self.failures_to_open:
            self.state = "open"
            self.opened_at = self.clock()


def validate_outputs(tier: Tier, outs: Any, n: Optional[int]) -> list["TierOutput | Exception"]:
    """Every slot either a TierOutput with a finite probability in [0, 1] or an Exception.

    `n`: the number of images given (None: any non-empty list, for warm-up)."""
    if not isinstance(outs, (list, tuple)) or (len(outs) != n if n is not None else not outs):
        got = len(outs) if isinstance(outs, (list, tuple)) else type(outs).__name__
        raise InvalidTierOutput(f"tier {tier.name} returned {got} outputs for {n} images")
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


def _predict_checked(tier: Tier, images: Sequence[Image.Image]) -> list["TierOutput | Exception"]:
    """Run `tier.predict` (on the tier's worker thread) and turn what is not a probability into errors."""
    return validate_outputs(tier, tier.predict(list(images)), len(images))


@dataclass
class Pending:
    """One request queued on a tier."""

    image: Image.Image
    future: "asyncio.Future[Any]"
    submitted: float
    deadline: Optional[float] = None  # monotonic; None: never shed (calibrate / eval)
    latency_probe: bool = False  # asked despite its model-time estimate, to re-measure it
    started: Optional[float] = None  # when its batch started on the worker (None: still queued)


class TierRunner:
    """See the module docstring."""

    def __init__(self, spec: TierSpec, tier: Tier, device: str, worker: TierWorker,
                 breaker: CircuitBreaker, telemetry: Telemetry, *, hung_after_s: float) -> None:
        self.spec = spec
        self.tier = tier
        self.device = device
        self.worker = worker
        self.breaker = breaker
        self.telemetry = telemetry
        self.hung_after_s = hung_after_s
        self.calls = 0
        self.failures = 0
        self.failures_by_kind: dict[str, int] = {}
        self.shed = 0
        self.batches = 0
        self.budget_skips = 0  # consecutive requests that skipped this tier for its model time
        self.model_time = ModelTime(spec.expected_latency_ms)
        self.timeout_s = None if spec.timeout_ms is None else spec.timeout_ms / 1000.0
        self._queue: "deque[Pending]" = deque()
        self._wakeup = asyncio.Event()
        self._inflight: Optional[tuple[float, int]] = None  # (started, batch size) of the batch running
        self._task: Optional[asyncio.Task] = None
        telemetry.tier_busy.labels(self.name).set_function(lambda: self.worker.busy_s or 0.0)
        self._set_gauge()

    @property
    def name(self) -> str:
        return self.spec.name

    # ------------------------------------------------------------------ admission

    def queued(self) -> int:
        """Requests waiting for this tier that are still wanted."""
        return sum(1 for p in self._queue if not p.future.done())

    @property
    def idle(self) -> bool:
        """No batch running and nothing queued."""
        return self._inflight is None and self.queued() == 0

    def expected_wait_ms(self, now: Optional[float] = None) -> tuple[float, float]:
        """(queue ms, model ms) a request queued now would see: time until the batch in flight
        and the full batches ahead of it are done, then its own batch's model time.

        A batch running longer than expected is assumed to need at least as long again as it
        has taken so far, so a hung tier sheds its requests instead of collecting them."""
        now = time.monotonic() if now is None else now
        wait = self.spec.max_wait_ms
        if self._inflight is not None:
            started, n = self._inflight
            expected, elapsed = self.model_time.batch_ms(n), (now - started) * 1000.0
            wait += expected - elapsed if elapsed < expected else elapsed
        ahead = self.queued()
        size = self.spec.max_batch_size
        wait += (ahead // size) * self.model_time.batch_ms(size)
        return wait, self.model_time.batch_ms(ahead % size + 1)

    def submit(self, image: Image.Image, deadline: Optional[float] = None, *,
               latency_probe: bool = False) -> Pending:
        fut: "asyncio.Future[Any]" = asyncio.get_running_loop().create_future()
        pending = Pending(image, fut, time.monotonic(), deadline, latency_probe)
        self._queue.append(pending)
        self._wakeup.set()
        self.calls += 1
        self.budget_skips = 0
        self.telemetry.tier_calls.labels(self.name).inc()
        return pending

    # ------------------------------------------------------------------ breaker and counters

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

    def record_shed(self) -> None:
        """This request did not run on the tier for lack of time in its queue (not a failure)."""
        self.shed += 1
        self.telemetry.tier_skipped.labels(self.name, "queue").inc()

    def _set_gauge(self) -> None:
        self.telemetry.breaker_state.labels(self.name).set(BREAKER_STATES[self.breaker.state])

    # ------------------------------------------------------------------ the batcher

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher:{self.name}")

    def _pop_live(self) -> Optional[Pending]:
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():  # requests that gave up are not run
                return p
        return None

    async def _collect(self) -> list[Pending]:
        first = self._pop_live()
        while first is None:
            self._wakeup.clear()
            await self._wakeup.wait()
            first = self._pop_live()
        batch = [first]
        size = self.spec.max_batch_size
        if self.spec.max_wait_ms > 0:
            loop = asyncio.get_running_loop()
            until = loop.time() + self.spec.max_wait_ms / 1000.0
            while len(batch) < size:
                p = self._pop_live()
                if p is not None:
                    batch.append(p)
                    continue
                left = until - loop.time()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
        while len(batch) < size:
            p = self._pop_live()
            if p is None:
                break
            batch.append(p)
        return batch

    def _shed_late(self, batch: list[Pending], now: float) -> list[Pending]:
        """Answer `QueueShed` to the requests whose deadline leaves less than this batch's
        model time (a latency probe is exempt: it is how the estimate gets re-measured)."""
        expected_ms = self.model_time.batch_ms(len(batch))
        run = []
        for p in batch:
            if p.deadline is not None and not p.latency_probe and (p.deadline - now) * 1000.0 < expected_ms:
                p.future.set_result(QueueShed(f"tier {self.name}: {1000.0 * (p.deadline - now):.0f} ms "
                                              f"left, a batch takes {expected_ms:.0f} ms"))
            else:
                run.append(p)
        return run

    async def _run(self) -> None:
        while True:
            batch = [p for p in await self._collect() if not p.future.done()]
            now = time.monotonic()
            live = self._shed_late(batch, now)
            if not live:
                continue
            for p in live:
                p.started = now
                self.telemetry.tier_queue_wait.labels(self.name).observe(now - p.submitted)
            self.batches += 1
            self.telemetry.tier_batch_size.labels(self.name).observe(len(live))
            self._inflight = (now, len(live))
            try:
                outs: list[Any] = await asyncio.wrap_future(
                    self.worker.submit(_predict_checked, self.tier, [p.image for p in live]))
            except asyncio.CancelledError:
                for p in live:
                    if not p.future.done():
                        p.future.set_result(RuntimeError("engine stopped"))
                raise
            except Exception as exc:  # the whole batch failed: every item carries the error
                outs = [exc] * len(live)
            finally:
                self._inflight = None
            done = time.monotonic()
            model_ms = (done - now) * 1000.0
            if any(p.latency_probe for p in live):
                self.model_time.restart_from(model_ms, len(live))
            else:
                self.model_time.observe(model_ms, len(live))
            self.telemetry.tier_model_time.labels(self.name).observe(model_ms / 1000.0)
            for p, out in zip(live, outs):
                self.telemetry.tier_latency.labels(self.name).observe(done - p.submitted)
                if not p.future.done():
                    p.future.set_result(out)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_result(RuntimeError("engine stopped"))
        self.worker.shutdown(wait=False)

    # ------------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        try:
            described = self.tier.describe()
        except Exception as exc:  # health must answer even when a backend's describe breaks
            described = {"error": repr(exc)}
        busy = self.worker.busy_s
        return {"loaded": True, "device": self.device, "breaker": self.breaker.state,
                "consecutive_failures": self.breaker.consecutive_failures,
                "failures": self.failures, "failures_by_kind": dict(self.failures_by_kind),
                "calls": self.calls, "shed": self.shed, "batches": self.batches, "queued": self.queued(),
                "busy_s": None if busy is None else round(busy, 3),
                "hung": busy is not None and busy > self.hung_after_s,
                "worker_alive": self.worker.alive,
                "model_ms": round(self.model_time.batch_ms(1), 2),
                "model_ms_measured": self.model_time.measured,
                "expected_latency_ms": self.spec.expected_latency_ms, "describe": described}
