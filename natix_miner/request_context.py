"""What the layers of one request learn about it, handed down without touching bittensor's API.

The HTTP layer (`natix_miner.axon_server`) stamps the arrival time when the request's first
byte reached the process; the guard, running in bittensor's blacklist step, adds the verified
caller hotkey and its stake; the forward reads both. They travel in a context variable: the
ASGI task that serves the request copies its context into every task it spawns (bittensor's
middleware runs the route in a child task), so the forward sees what the earlier stages set.

The forward must not trust `synapse.dendrite` for any of this: FastAPI builds the forward's
synapse from the request BODY, which the caller writes freely (only the headers are signed).
"""

import contextvars
import time
from dataclasses import dataclass
from typing import Optional


@dataclass
class RequestContext:
    """Mutable per-request facts; one object per HTTP request."""

    # time.monotonic() when the process first saw the request (its first byte, else ASGI entry).
    arrival: float
    # The hotkey whose signature the guard verified; None until then.
    hotkey: Optional[str] = None
    # That caller's stake in the guard's metagraph snapshot (0 for allow-listed callers).
    stake: float = 0.0


_CURRENT: contextvars.ContextVar[Optional[RequestContext]] = contextvars.ContextVar(
    "natix_request", default=None)


def begin(arrival: Optional[float] = None) -> RequestContext:
    """Start the context of a new request in the current task (the HTTP layer calls this)."""
    ctx = RequestContext(arrival=time.monotonic() if arrival is None else arrival)
    _CURRENT.set(ctx)
    return ctx


def current() -> Optional[RequestContext]:
    """The context of the request this task serves, or None outside the HTTP layer."""
    return _CURRENT.get()
