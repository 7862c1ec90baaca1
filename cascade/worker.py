"""One tier's own worker thread, and the model-time estimate the router and the shedder read.

Each tier gets a `TierWorker`: a daemon thread with its own job queue that runs that tier's
construction, load, warm-up and every `predict`, and nothing else. A slow or hung tier therefore
holds only its own thread; every other tier on the same device keeps its own (Triton gives each
model instance its own execution thread for the same reason). The engine keeps at most one batch
in flight per tier, so a hung call never makes the engine start another thread: the tier's
thread count stays one, and `busy_s` tells `health()` how long the current call has been running.
The thread is a daemon so that a call that never returns cannot keep the process from exiting.

`ModelTime` estimates how long one batch takes on the tier, measured from the moment the worker
starts the call to the moment it returns (queue time excluded): the median of the last few
samples, so one stall does not move it, scaled linearly for batches larger than those measured.
"""

import queue
import statistics
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from typing import Any, Callable, Optional

WINDOW = 5  # samples in the median: one or two stalls do not move it, three in a row do


class TierWorker(Executor):
    """A single daemon thread with its own queue; `submit` returns a concurrent Future."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: "queue.SimpleQueue[Optional[tuple[Future, Callable, tuple]]]" = queue.SimpleQueue()
        self._busy_since: Optional[float] = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"tier-{name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if self._closed:
            raise RuntimeError(f"worker of tier {self.name} is shut down")
        fut: Future = Future()
        self._jobs.put((fut, fn, args, kwargs))
        return fut

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args, kwargs = job
            if not fut.set_running_or_notify_cancel():
                continue
            self._busy_since = time.monotonic()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
                fut.set_exception(exc)
            else:
                fut.set_result(result)
            finally:
                self._busy_since = None

    @property
    def busy_s(self) -> Optional[float]:
        """Seconds the current call has been running (None: idle)."""
        since = self._busy_since
        return None if since is None else time.monotonic() - since

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = True) -> None:
        """Stop taking jobs; the thread ends after its current call (a hung one is left behind,
        a daemon, rather than blocking shutdown)."""
        if self._closed:
            return
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
        self._jobs.put(None)
        if wait:
            self._thread.join()


class ModelTime:
    """Median model time of the last `WINDOW` batches, with the batch size each had."""

    def __init__(self, prior_ms: float) -> None:
        self.prior_ms = float(prior_ms)
        self._samples: "deque[tuple[float, int]]" = deque(maxlen=WINDOW)

    def observe(self, ms: float, batch: int) -> None:
        self._samples.append((float(ms), max(1, int(batch))))

    def restart_from(self, ms: float, batch: int) -> None:
        """Forget older samples: a latency probe after a long skip is the only fresh figure."""
        self._samples.clear()
        self.observe(ms, batch)

    @property
    def measured(self) -> bool:
        return bool(self._samples)

    def batch_ms(self, batch: int = 1) -> float:
        """Expected model time of a batch of `batch` images (the prior before any sample)."""
        if not self._samples:
            return self.prior_ms
        batch = max(1, batch)
        return statistics.median(ms * max(1.0, batch / n) for ms, n in self._samples)
