"""What a live miner says it does, at the default log level (`miner.request_log`).

- `line`: one line per answered request, e.g.
  `answered uid 12 5FHneW…694ty: 0.8731 ok in 142 ms`
- `summary`: one line every `miner.log_summary_s`, also when nothing came in (so a quiet miner
  is visibly alive), e.g.
  `last 60 s: 42 answered (ok 40, deadline 2), p50 120 ms, p99 640 ms, 7 callers; refused 3 (no_permit 3)`
- `off`: neither (the counters stay in /metrics and in the 5-minute health line).

Answers are recorded from the axon's thread and summarised from the neuron's loop, hence the lock.
"""

import collections
import threading
import time
from typing import Callable, Mapping, Optional

import numpy as np
from loguru import logger

from natix_miner.settings import REQUEST_LOG_MODES


def short_hotkey(hotkey: Optional[str]) -> str:
    """`5FHneW…694ty`: enough to tell callers apart and grep for them."""
    if not hotkey:
        return "<no hotkey>"
    return hotkey if len(hotkey) <= 14 else f"{hotkey[:6]}…{hotkey[-5:]}"


class RequestLog:
    """Records answers; logs each one (`line`) or hands out one summary per period (`summary`)."""

    def __init__(self, mode: str, *, refusals: Callable[[], Mapping[str, int]] = dict,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if mode not in REQUEST_LOG_MODES:
            raise ValueError(f"request log mode must be one of {REQUEST_LOG_MODES}, got {mode!r}")
        self.mode = mode
        self._refusals = refusals
        self._clock = clock
        self._lock = threading.Lock()
        self._since = clock()
        self._outcomes: collections.Counter = collections.Counter()
        self._latencies_ms: list[float] = []
        self._callers: set[str] = set()
        self._refused_before: dict[str, int] = dict(refusals())

    def answered(self, caller: str, outcome: str, prediction: float, elapsed_s: float) -> None:
        ms = elapsed_s * 1000.0
        if self.mode == "line":
            logger.info("answered {}: {:.4f} {} in {:.0f} ms", caller, prediction, outcome, ms)
        if self.mode != "summary":
            return
        with self._lock:
            self._outcomes[outcome] += 1
            self._latencies_ms.append(ms)
            self._callers.add(caller)

    def summary(self) -> str:
        """The line for the period since the last call (and start the next period)."""
        now = self._clock()
        with self._lock:
            outcomes, lat, callers = self._outcomes, self._latencies_ms, self._callers
            self._outcomes, self._latencies_ms, self._callers = collections.Counter(), [], set()
            period, self._since = now - self._since, now
        refused_now = dict(self._refusals())
        refused = {k: v - self._refused_before.get(k, 0) for k, v in refused_now.items()}
        refused = {k: v for k, v in refused.items() if v > 0}
        self._refused_before = refused_now
        n = sum(outcomes.values())
        text = f"last {period:.0f} s: {n} answered"
        if n:
            text += " (" + ", ".join(f"{k} {v}" for k, v in outcomes.most_common()) + ")"
            text += (f", p50 {np.percentile(lat, 50):.0f} ms, p99 {np.percentile(lat, 99):.0f} ms, "
                     f"{len(callers)} caller{'s' if len(callers) != 1 else ''}")
        total = sum(refused.values())
        text += f"; refused {total}"
        if total:
            text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(refused.items(),
                                                                   key=lambda kv: -kv[1])) + ")"
        return text
