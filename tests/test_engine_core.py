"""Engine behaviour with small purpose-built tiers: routing, deadline, failures, batching."""

import asyncio
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import yaml
from PIL import Image

from cascade.calibration import CalibrationSet, ThresholdMap
from cascade.config import load_cascade_config
from cascade.engine import CascadeEngine, TierStartError
from cascade.errors import MissingArtifactError
from cascade.telemetry import Telemetry
from cascade.tier import Tier, TierOutput


class ScriptedTier(Tier):
    """A tier whose probability, delay and failures the test controls.

    prob: a constant, or None to read it from the red channel of the image's first pixel.
    warm: what warmup() returns (default: one valid output, kept out of the batch counts;
    "predict": run predict like the base class, so the engine checks the real outputs).
    """

    def __init__(self, spec, prob: Optional[float] = 0.5, delay_s: float = 0.0,
                 fail: Optional[Callable[[], Any]] = None, load_error: Optional[Exception] = None,
                 output: Any = None, warm: Any = None, stall: Optional[Callable[[int], float]] = None) -> None:
        super().__init__(spec)
        self.warm = warm
        self.stall = stall  # batch index -> extra seconds this batch takes
        self.prob = prob
        self.delay_s = delay_s
        self.fail = fail
        self.load_error = load_error
        self.output = output
        self.batch_sizes: list[int] = []
        self.loaded_on: Optional[str] = None
        self.closed = threading.Event()

    def load(self, device: str) -> None:
        if self.load_error is not None:
            raise self.load_error
        self.loaded_on = device

    def warmup(self):  # keep warm-up out of the batch counts
        if self.warm == "predict":
            outs = self.predict([image()])
            self.batch_sizes.clear()
            return outs
        return self.warm if self.warm is not None else [TierOutput(0.5)]

    def predict(self, images):
        self.batch_sizes.append(len(images))
        delay = self.delay_s + (self.stall(len(self.batch_sizes) - 1) if self.stall else 0.0)
        if delay:
            self.closed.wait(delay)  # interruptible so stop() does not wait it out
        if self.fail is not None:
            err = self.fail()
            if err is not None:
                raise err
        if self.output is not None:
            return self.output(images)
        outs = []
        for im in images:
            p = self.prob if self.prob is not None else im.getpixel((0, 0))[0] / 255.0
            outs.append(TierOutput(p, {"seen": True}))
        return outs

    def close(self) -> None:
        self.closed.set()


def write_config(tmp_path: Path, tiers: list[dict], engine: Optional[dict] = None,
                 router: Optional[dict] = None) -> Path:
    data = {"engine": {"deadline_ms": 2000, **(engine or {})},
            "router": {"threshold": 0.5, "margin": 0.3, **(router or {})},
            "tiers": [{"backend": "scripted", "device": "cpu", "expected_latency_ms": 10, **t}
                      for t in tiers],
            "devices": {"cpu": {"memory_gib": 4}}}
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def make_engine(tmp_path: Path, behaviours: dict[str, dict], *, tiers: Optional[list[dict]] = None,
                engine: Optional[dict] = None, router: Optional[dict] = None,
                calibration: Optional[CalibrationSet] = None):
    tiers = tiers or [{"name": n} for n in behaviours]
    cfg = load_cascade_config(write_config(tmp_path, tiers, engine, router))
    made: dict[str, ScriptedTier] = {}

    def factory(spec):
        made[spec.name] = ScriptedTier(spec, **behaviours.get(spec.name, {}))
        return made[spec.name]

    eng = CascadeEngine(cfg, factory, telemetry=Telemetry(),
                        calibration=calibration if calibration is not None else CalibrationSet.identity())
    return eng, made


def image(red: int = 128) -> Image.Image:
    return Image.new("RGB", (64, 48), (red, 100, 100))


async def test_confident_first_tier_stops_the_cascade(tmp_path):
    eng, made = make_engine(tmp_path, {"fast.a": {"prob": 0.97}, "slow.b": {"prob": 0.1}})
    async with eng:
        res = await eng.predict(image())
    assert res.stopped_after == "fast.a" and not res.escalated and not res.fallback
    assert made["slow.b"].batch_sizes == []
    assert res.prob == pytest.approx(0.97)
    assert res.evidence["fast.a"] == {"seen": True}
    assert set(res.conditions) >= {"night", "blur", "low_contrast", "day"}


async def test_uncertain_first_tier_escalates_and_fuses(tmp_path):
    eng, made = make_engine(tmp_path, {"fast.a": {"prob": 0.55}, "slow.b": {"prob": 0.9}},
                            tiers=[{"name": "fast.a", "weight": 1.0}, {"name": "slow.b", "weight": 3.0}])
    async with eng:
        res = await eng.predict(image())
    assert res.escalated and res.stopped_after == "slow.b"
    a = 0.55 ** 0.25 * 0.9 ** 0.75
    b = 0.45 ** 0.25 * 0.1 ** 0.75
    assert res.prob == pytest.approx(a / (a + b))
    assert res.tier_probs == {"fast.a": 0.55, "slow.b": 0.9}
    assert eng.telemetry.value("cascade_escalations_total") == 1


async def test_tier_missing_from_calibration_enters_on_the_fitted_weight_scale(tmp_path):
    # Fitted weights sum to 1; a tier added after calibrating keeps its prior's share relative to
    # the fitted tiers' priors (here 1:1 with fast.a's prior, so it weighs what fast.a was given).
    cal = CalibrationSet(weights={"fast.a": 0.2})
    eng, _ = make_engine(tmp_path, {"fast.a": {"prob": 0.55}, "new.b": {"prob": 0.9}},
                         tiers=[{"name": "fast.a", "weight": 1.0}, {"name": "new.b", "weight": 1.0}],
                         calibration=cal)
    async with eng:
        res = await eng.predict(image())
    a = 0.55 ** 0.5 * 0.9 ** 0.5
    b = 0.45 ** 0.5 * 0.1 ** 0.5
    assert res.prob == pytest.approx(a / (a + b))


async def test_slow_tier_does_not_delay_answer_past_deadline(tmp_path):
    eng, made = make_engine(tmp_path, {"fast.a": {"prob": 0.6}, "slow.b": {"prob": 0.9, "delay_s": 3.0}})
    async with eng:
        t0 = time.monotonic()
        res = await eng.predict(image(), deadline_s=0.3)
        elapsed = time.monotonic() - t0
    assert elapsed < 0.3 + 0.15
    assert res.latency_ms < 300 + 150
    assert res.deadline_hit and res.failed == ["slow.b"] and not res.fallback
    assert res.prob == pytest.approx(0.6)  # fused from the tier that finished
    assert eng.telemetry.value("cascade_deadline_misses_total") == 1
    assert eng.telemetry.value("cascade_tier_failures_total", {"tier": "slow.b", "kind": "deadline"}) == 1


async def test_tier_timeout_drops_it_but_keeps_the_request(tmp_path):
    eng, made = make_engine(tmp_path, {"slow.a": {"prob": 0.9, "delay_s": 2.0}, "fast.b": {"prob": 0.8}},
                            tiers=[{"name": "slow.a", "timeout_ms": 100}, {"name": "fast.b"}])
    async with eng:
        res = await eng.predict(image(), deadline_s=1.5)
    assert res.failed == ["slow.a"] and not res.deadline_hit
    assert res.stopped_after == "fast.b" and res.prob == pytest.approx(0.8)
    assert res.latency_ms < 1000


async def test_raising_tier_is_isolated_and_breaker_opens_then_closes(tmp_path):
    broken = {"on": True}

    def fail():
        return RuntimeError("CUDA error: device-side assert") if broken["on"] else None

    eng, made = make_engine(tmp_path, {"fast.a": {"prob": 0.6}, "flaky.b": {"prob": 0.9, "fail": fail}},
                            engine={"breaker": {"failures_to_open": 2, "cooldown_s": 0.2}})
    async with eng:
        for _ in range(2):
            res = await eng.predict(image())
            assert res.failed == ["flaky.b"] and res.prob == pytest.approx(0.6)
        assert eng.health()["tiers"]["flaky.b"]["breaker"] == "open"
        calls_before = len(made["flaky.b"].batch_sizes)
        res = await eng.predict(image())
        assert res.skipped.get("flaky.b") == "breaker" and res.failed == []
        assert len(made["flaky.b"].batch_sizes) == calls_before  # out of rotation: not even called
        broken["on"] = False
        await asyncio.sleep(0.25)
        res = await eng.predict(image())  # the probe
        assert res.failed == [] and "flaky.b" in res.tier_probs
        h = eng.health()["tiers"]["flaky.b"]
        assert h["breaker"] == "closed" and h["failures"] == 2
    assert eng.telemetry.value("cascade_tier_failures_total", {"tier": "flaky.b", "kind": "error"}) == 2


async def test_cancelled_probe_does_not_keep_the_breaker_half_open(tmp_path):
    # the shell wraps predict in wait_for: a probe whose caller is cancelled never reports a
    # verdict, and the breaker must then let the next request probe instead of waiting forever
    mode = {"fail": True, "slow": False}

    def fail():
        if mode["slow"]:
            time.sleep(0.3)
        return RuntimeError("boom") if mode["fail"] else None

    eng, made = make_engine(tmp_path, {"flaky.a": {"prob": 0.9, "fail": fail}},
                            engine={"breaker": {"failures_to_open": 1, "cooldown_s": 0.05}})
    async with eng:
        res = await eng.predict(image())
        assert res.failed == ["flaky.a"] and eng.health()["tiers"]["flaky.a"]["breaker"] == "open"
        await asyncio.sleep(0.1)
        mode.update(fail=False, slow=True)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(eng.predict(image()), 0.1)  # the probe, cancelled
        assert eng.health()["tiers"]["flaky.a"]["breaker"] == "half_open"
        await asyncio.sleep(0.3)
        mode["slow"] = False
        res = await eng.predict(image())  # a new probe is let through and closes the breaker
        assert res.skipped == {} and res.tier_probs == {"flaky.a": pytest.approx(0.9)}
        assert eng.health()["tiers"]["flaky.a"]["breaker"] == "closed"


@pytest.mark.parametrize("bad", [
    lambda ims: [TierOutput(float("nan"))] * len(ims),
    lambda ims: [TierOutput(-1.0)] * len(ims),
    lambda ims: [TierOutput(1.5)] * len(ims),
    lambda ims: [TierOutput(0.9)] * (len(ims) + 1),
    lambda ims: [ValueError("bad image")] * len(ims),
    lambda ims: None,
])
async def test_nothing_a_tier_returns_escapes_as_an_invalid_answer(tmp_path, bad):
    eng, made = make_engine(tmp_path, {"bad.a": {"output": bad}})
    async with eng:
        res = await eng.predict(image())
    assert res.fallback and res.prob == 0.5 and res.failed == ["bad.a"]
    assert 0.0 <= res.prob <= 1.0 and not math.isnan(res.prob)


async def test_concurrent_requests_are_micro_batched(tmp_path):
    eng, made = make_engine(tmp_path, {"batchy.a": {"prob": 0.9, "delay_s": 0.03}},
                            tiers=[{"name": "batchy.a", "max_batch_size": 8, "max_wait_ms": 5}])
    async with eng:
        results = await eng.predict_batch([image() for _ in range(16)])
    sizes = made["batchy.a"].batch_sizes
    assert sum(sizes) == 16 and max(sizes) > 1 and len(sizes) < 16 and max(sizes) <= 8
    assert all(r.prob == pytest.approx(0.9) for r in results)
    assert eng.telemetry.value("cascade_tier_batch_size_count", {"tier": "batchy.a"}) == len(sizes)


async def test_per_request_probabilities_stay_with_their_request(tmp_path):
    eng, made = make_engine(tmp_path, {"pix.a": {"prob": None, "delay_s": 0.01}},
                            tiers=[{"name": "pix.a", "max_batch_size": 4, "max_wait_ms": 5}])
    reds = [10, 240, 30, 200, 5, 250, 60, 190]
    async with eng:
        results = await eng.predict_batch([image(r) for r in reds])
    assert [r.raw_probs["pix.a"] for r in results] == pytest.approx([r / 255 for r in reds])


async def test_start_propagates_missing_artifact_unchanged(tmp_path):
    err = MissingArtifactError("head.pt of fast.a", fix="natix-miner train --config c.yaml --images DIR")
    eng, made = make_engine(tmp_path, {"fast.a": {"load_error": err}, "slow.b": {}})
    with pytest.raises(MissingArtifactError) as info:
        await eng.start()
    assert info.value is err and not eng.ready


async def test_start_names_the_tier_that_failed_to_load(tmp_path):
    eng, made = make_engine(tmp_path, {"fast.a": {}, "slow.b": {"load_error": OSError("no weights")}})
    with pytest.raises(TierStartError, match="slow.b"):
        await eng.start()
    assert made["fast.a"].closed.is_set()  # what did load is released again


async def test_health_readiness_and_placement(tmp_path):
    eng, made = make_engine(tmp_path, {"fast.a": {}, "slow.b": {}})
    assert eng.health()["ready"] is False
    with pytest.raises(RuntimeError, match="not ready"):
        await eng.predict(image())
    await eng.start()
    try:
        h = eng.health()
        assert h["ready"] is True and set(h["tiers"]) == {"fast.a", "slow.b"}
        assert h["tiers"]["fast.a"]["loaded"] and h["tiers"]["fast.a"]["breaker"] == "closed"
        assert set(eng.tiers) == {"fast.a", "slow.b"} and made["fast.a"].loaded_on == "cpu"
        assert eng.telemetry.value("cascade_ready") == 1
    finally:
        await eng.stop()
    assert eng.telemetry.value("cascade_ready") == 0


async def test_telemetry_counts_requests_calls_and_answers(tmp_path):
    eng, made = make_engine(tmp_path, {"fast.a": {"prob": 0.55}, "slow.b": {"prob": 0.95}})
    async with eng:
        for _ in range(3):
            await eng.predict(image())
    t = eng.telemetry
    assert t.value("cascade_requests_total") == 3
    assert t.value("cascade_answers_total", {"kind": "fused"}) == 3
    assert t.value("cascade_tier_calls_total", {"tier": "fast.a"}) == 3
    assert t.value("cascade_tier_calls_total", {"tier": "slow.b"}) == 3
    assert t.value("cascade_request_latency_seconds_count") == 3
    assert t.value("cascade_escalations_total") == 3


async def test_calibration_threshold_map_and_router_threshold(tmp_path):
    cal = CalibrationSet(threshold_map=ThresholdMap(0.7))
    eng, made = make_engine(tmp_path, {"pix.a": {"prob": None}}, calibration=cal)
    async with eng:
        assert eng.router.threshold == 0.7
        hi = await eng.predict(image(round(0.72 * 255)))
        lo = await eng.predict(image(round(0.68 * 255)))
    assert round(hi.prob) == 1 and round(lo.prob) == 0
    assert hi.fused == pytest.approx(round(0.72 * 255) / 255)


async def test_budget_skips_a_tier_expected_to_overrun(tmp_path):
    eng, made = make_engine(tmp_path, {"fast.a": {"prob": 0.55}, "big.b": {"prob": 0.9}},
                            tiers=[{"name": "fast.a"}, {"name": "big.b", "expected_latency_ms": 5000}])
    async with eng:
        res = await eng.predict(image(), deadline_s=1.0)
    assert res.skipped == {"big.b": "budget"} and made["big.b"].batch_sizes == []
    assert res.prob == pytest.approx(0.55) and not res.escalated


async def test_uncertain_answers_go_to_the_store(tmp_path):
    store_dir = tmp_path / "uncertain"
    eng, made = make_engine(tmp_path, {"fast.a": {"prob": 0.52}},
                            engine={"store": {"enabled": True, "dir": str(store_dir), "band": 0.1}})
    async with eng:
        await eng.predict(image(1))
        await eng.predict(image(2))
        eng.store.flush()
        items = eng.store.items()
    assert len(items) == 2 and items[0]["reason"] == "near_threshold"
    assert items[0]["record"]["raw_probs"] == {"fast.a": 0.52}
    assert Path(items[0]["path"]).exists()


async def test_tier_outputs_runs_every_tier(tmp_path):
    eng, made = make_engine(tmp_path, {"fast.a": {"prob": 0.99}, "slow.b": {"prob": 0.2}})
    async with eng:
        outs = await eng.tier_outputs(image())
    assert outs["fast.a"].prob == 0.99 and outs["slow.b"].prob == 0.2


async def test_cancelled_condition_estimate_is_no_conditions_not_a_cancellation(tmp_path):
    # stop() cancels queued aux work; a request still in flight must not see CancelledError
    eng, _ = make_engine(tmp_path, {"fast.a": {"prob": 0.9}})
    fut = asyncio.get_running_loop().create_future()
    fut.cancel()
    assert await eng._await_conditions(fut, time.monotonic() + 1.0) == {}


# ---- isolation: a worker per tier, load shedding, latency estimates (issues 8.1, 8.2, 11.4, 11.8)


async def test_hanging_tier_never_delays_the_fast_tier_on_the_same_device(tmp_path):
    # 50 concurrent requests; the fast tier is uncertain so every request escalates to a tier
    # that hangs (far past the deadline) on the same device. Every answer must use the fast tier
    # and arrive by the deadline; the fast tier's breaker stays closed, the hung tier is reported
    # by health() and its thread count stays one.
    eng, made = make_engine(tmp_path, {"fast.a": {"prob": 0.55, "delay_s": 0.005},
                                       "hang.b": {"prob": 0.9, "delay_s": 30.0}},
                            tiers=[{"name": "fast.a", "max_batch_size": 8},
                                   {"name": "hang.b", "max_batch_size": 4}])
    budget = 0.6
    async with eng:
        threads = []
        for _ in range(2):  # the second burst meets the tier already hung
            t0 = time.monotonic()
            results = await asyncio.gather(*(eng.predict(image(), deadline_s=budget) for _ in range(50)))
            assert time.monotonic() - t0 < budget + 0.2
            assert all("fast.a" in r.tier_probs and not r.fallback for r in results)
            assert all(r.latency_ms <= budget * 1000 + 50 for r in results)
            assert all(r.prob == pytest.approx(0.55) for r in results)
            threads.append(threading.active_count())
        assert threads[1] == threads[0]  # a hung call makes the engine start no new thread
        names = [t.name for t in threading.enumerate()]
        assert names.count("tier-hang.b") == 1 and names.count("tier-fast.a") == 1
        h = eng.health()
        assert h["tiers"]["fast.a"]["breaker"] == "closed" and h["tiers"]["fast.a"]["failures"] == 0
        assert h["tiers"]["hang.b"]["busy_s"] > budget and h["tiers"]["hang.b"]["worker_alive"]
        # hang.b ran one batch, which the deadline cut (a failure per request in it); every other
        # request that reached it was shed (it never started there) and is not held against it
        ran = made["hang.b"].batch_sizes
        assert len(ran) == 1
        assert h["tiers"]["hang.b"]["failures"] == ran[0] and h["tiers"]["hang.b"]["shed"] == 100 - ran[0]
    t = eng.telemetry
    assert t.value("cascade_tier_failures_total", {"tier": "fast.a", "kind": "deadline"}) == 0
    assert t.value("cascade_tier_skipped_total", {"tier": "hang.b", "reason": "queue"}) == 100 - ran[0]


async def test_health_reports_a_hung_tier(tmp_path):
    eng, made = make_engine(tmp_path, {"hang.a": {"prob": 0.9, "delay_s": 30.0}},
                            tiers=[{"name": "hang.a", "timeout_ms": 100}])
    async with eng:
        res = await eng.predict(image(), deadline_s=0.3)
        assert res.fallback and res.failed == ["hang.a"]
        await asyncio.sleep(0.05)
        h = eng.health()
        assert h["tiers"]["hang.a"]["hung"] is True and h["hung_tiers"] == ["hang.a"]
        assert eng.telemetry.value("cascade_tier_busy_seconds", {"tier": "hang.a"}) > 0.1


async def test_a_burst_sheds_at_once_and_does_not_open_a_healthy_breaker(tmp_path):
    # 120 concurrent requests on a healthy tier that serves 4 per 50 ms: the queue cannot serve
    # them all in 0.4 s. Those it cannot serve are answered at once (fallback, marked shed),
    # never late; none counts as a failure; the breaker stays closed and the next sequential
    # requests all use the tier.
    eng, made = make_engine(tmp_path, {"busy.a": {"prob": 0.9, "delay_s": 0.05}},
                            tiers=[{"name": "busy.a", "max_batch_size": 4, "expected_latency_ms": 50}],
                            engine={"breaker": {"failures_to_open": 3, "cooldown_s": 30}})
    budget = 0.4
    async with eng:
        results = await asyncio.gather(*(eng.predict(image(), deadline_s=budget) for _ in range(120)))
        served = [r for r in results if not r.fallback]
        shed = [r for r in results if r.shed]
        assert served and shed and len(served) + len(shed) == 120
        assert all(r.latency_ms <= budget * 1000 + 50 for r in results)
        assert all(r.skipped == {"busy.a": "queue"} and r.fallback and r.failed == [] for r in shed)
        assert max(r.latency_ms for r in shed[: len(shed) // 2]) < 150  # shed early, not at the deadline
        h = eng.health()["tiers"]["busy.a"]
        assert h["breaker"] == "closed" and h["failures"] == 0 and h["shed"] == len(shed)
        after = [await eng.predict(image(), deadline_s=budget) for _ in range(10)]
        assert all(r.tier_probs == {"busy.a": pytest.approx(0.9)} for r in after)
    assert eng.telemetry.value("cascade_shed_total") == len(shed)


async def test_queue_timeout_is_not_a_tier_failure(tmp_path):
    # A request still queued when its time runs out never ran on the tier: the breaker (one
    # failure opens it here) must not hear of it, and the answer says it was shed.
    eng, made = make_engine(tmp_path, {"slow.a": {"prob": 0.9, "delay_s": 0.3}},
                            tiers=[{"name": "slow.a", "max_batch_size": 1, "expected_latency_ms": 1}],
                            engine={"breaker": {"failures_to_open": 1, "cooldown_s": 30}})
    async with eng:
        first = asyncio.ensure_future(eng.predict(image(), deadline_s=1.0))
        await asyncio.sleep(0.02)  # the first request is running; estimates still say 1 ms
        second = await eng.predict(image(), deadline_s=0.1)
        assert second.fallback and second.shed and second.skipped == {"slow.a": "queue"}
        assert second.failed == [] and not second.deadline_hit
        assert (await first).tier_probs == {"slow.a": pytest.approx(0.9)}
        assert eng.health()["tiers"]["slow.a"]["breaker"] == "closed"
        assert eng.health()["tiers"]["slow.a"]["failures"] == 0
    assert made["slow.a"].batch_sizes == [1]


async def test_a_stall_is_remeasured_and_the_tier_asked_again(tmp_path):
    # The second tier stalls 1.5 s on its first call (far over a 0.3 s budget), then is fast.
    # Its model-time estimate is then one 1.5 s sample; after LATENCY_PROBE_EVERY budget skips
    # one request re-measures it, and from then on it is asked on every request.
    from cascade.engine import LATENCY_PROBE_EVERY

    eng, made = make_engine(tmp_path, {"fast.a": {"prob": 0.55},
                                       "stall.b": {"prob": 0.9, "stall": lambda i: 1.5 if i == 0 else 0.0}},
                            engine={"breaker": {"failures_to_open": 5, "cooldown_s": 30}})
    async with eng:
        first = await eng.predict(image(), deadline_s=0.3)
        assert first.failed == ["stall.b"]  # it started, the deadline cut it: a real failure
        await asyncio.sleep(1.4)  # the stalled call returns; its 1.5 s is the only sample
        asked_at = []
        for i in range(LATENCY_PROBE_EVERY + 6):
            res = await eng.predict(image(), deadline_s=0.3)
            if "stall.b" in res.tier_probs:
                asked_at.append(i)
            else:
                assert res.skipped == {"stall.b": "budget"}
        assert asked_at and asked_at[0] <= LATENCY_PROBE_EVERY
        assert asked_at == list(range(asked_at[0], LATENCY_PROBE_EVERY + 6))  # asked every time after
        assert eng.health()["tiers"]["stall.b"]["model_ms"] < 100


async def test_one_stall_among_measured_calls_does_not_move_the_estimate(tmp_path):
    stalls = {3}
    eng, made = make_engine(tmp_path, {"fast.a": {"prob": 0.55},
                                       "stall.b": {"prob": 0.9, "stall": lambda i: 0.8 if i in stalls else 0.0}})
    async with eng:
        for _ in range(3):
            await eng.predict(image(), deadline_s=1.0)
        res = await eng.predict(image(), deadline_s=1.0)  # the stall, inside the budget
        assert "stall.b" in res.tier_probs and res.latency_ms > 700
        res = await eng.predict(image(), deadline_s=0.3)  # asked again at once
        assert "stall.b" in res.tier_probs
        h = eng.health()["tiers"]["stall.b"]
        assert h["model_ms"] < 100


async def test_router_sees_model_time_not_queue_time(tmp_path):
    # Requests that waited behind a batch do not make the tier look slow: its estimate is the
    # time its calls took on the worker, not submit-to-result.
    eng, made = make_engine(tmp_path, {"batch.a": {"prob": 0.9, "delay_s": 0.05}},
                            tiers=[{"name": "batch.a", "max_batch_size": 1}])
    async with eng:
        await asyncio.gather(*(eng.predict(image(), deadline_s=2.0) for _ in range(8)))
        h = eng.health()["tiers"]["batch.a"]
    assert 40 <= h["model_ms"] < 150  # queue waits reached 350 ms
    assert eng.telemetry.value("cascade_tier_queue_wait_seconds_sum", {"tier": "batch.a"}) > 0.5


@pytest.mark.parametrize("warm", [
    [TierOutput(float("nan"))], [TierOutput(float("inf"))], [TierOutput(1.5)], [TierOutput(-0.1)],
    [ValueError("no")], [], "predict",
])
async def test_warmup_rejects_a_tier_whose_outputs_are_not_probabilities(tmp_path, warm):
    output = (lambda ims: [TierOutput(float("nan"))] * len(ims)) if warm == "predict" else None
    eng, made = make_engine(tmp_path, {"ok.a": {}, "nan.b": {"warm": warm, "output": output}})
    with pytest.raises(TierStartError, match="nan.b"):
        await eng.start()
    assert not eng.ready and made["ok.a"].closed.is_set()


async def test_warmup_without_outputs_gets_a_checked_predict(tmp_path):
    class Quiet(ScriptedTier):
        def warmup(self):
            return None

    cfg = load_cascade_config(write_config(tmp_path, [{"name": "nan.a"}]))
    eng = CascadeEngine(cfg, lambda spec: Quiet(spec, output=lambda ims: [TierOutput(float("nan"))] * len(ims)))
    with pytest.raises(TierStartError, match="finite probabilities"):
        await eng.start()


async def test_non_finite_outputs_count_as_invalid_tier_failures(tmp_path):
    def nan_raise(ims):
        return [FloatingPointError("model produced a non-finite probability nan")] * len(ims)

    eng, made = make_engine(tmp_path, {"nan.a": {"output": lambda ims: [TierOutput(float("nan"))] * len(ims)},
                                       "fpe.b": {"output": nan_raise}},
                            router={"min_tiers": 2})
    async with eng:
        res = await eng.predict(image())
    assert res.fallback and res.failed == ["nan.a", "fpe.b"]
    t = eng.telemetry
    assert t.value("cascade_tier_failures_total", {"tier": "nan.a", "kind": "invalid"}) == 1
    assert t.value("cascade_tier_failures_total", {"tier": "fpe.b", "kind": "invalid"}) == 1
    assert t.value("cascade_answers_total", {"kind": "fallback"}) == 1


async def test_work_that_cannot_finish_is_not_started(tmp_path):
    # The batch ahead overran its estimate, so by the time the next request's batch could start
    # its deadline leaves less than the tier's model time: it is shed there (not run, not a
    # failure) instead of being started only to be cut by the deadline.
    eng, made = make_engine(tmp_path, {"slow.a": {"prob": 0.9, "delay_s": 0.2,
                                                  "stall": lambda i: 0.2 if i == 3 else 0.0}},
                            tiers=[{"name": "slow.a", "max_batch_size": 1, "expected_latency_ms": 200}],
                            engine={"breaker": {"failures_to_open": 1, "cooldown_s": 30}})
    async with eng:
        for _ in range(3):
            await eng.predict(image(), deadline_s=2.0)
        first = asyncio.ensure_future(eng.predict(image(), deadline_s=2.0))  # takes 0.4 s, not 0.2
        await asyncio.sleep(0.01)
        late = await eng.predict(image(), deadline_s=0.5)  # admitted: 0.19 + 0.2 s < 0.5 s
        assert late.shed and late.fallback and late.skipped == {"slow.a": "queue"} and late.failed == []
        assert late.latency_ms < 450  # answered when it was shed, not at its deadline
        await first
        h = eng.health()["tiers"]["slow.a"]
        assert h["failures"] == 0 and h["breaker"] == "closed"
    assert made["slow.a"].batch_sizes == [1, 1, 1, 1]  # the late request never ran
