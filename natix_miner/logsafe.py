"""Log lines that a caller cannot inflate, and bittensor's per-request error lines kept quiet.

Every string a caller chooses (hotkey, uuid, reason texts that quote them, exception messages
about their input) goes through `clip` before it reaches a log line: a 64 KB "hotkey" becomes
a short prefix plus its length. bittensor's axon logs one ERROR line per refused request
(`BlacklistedException#<uuid>: ...`, with the caller's headers quoted for a parse error); the
guard already logs refusals once per caller and reason per period, so `quiet_bittensor_axon`
drops those per-request lines (counting them) and clips whatever else bittensor logs.
"""

import collections
import logging
import re
from typing import Any

# Longest caller-supplied string a log line carries (then "...(+N chars)").
MAX_LOGGED_CHARS = 80
# Longest bittensor log message passed through.
MAX_BITTENSOR_LINE = 600

# The exceptions bittensor's axon turns into per-request error lines for refused or malformed
# requests (its `log_and_handle_error`): answered with 4xx, counted here, not logged.
_REFUSAL_ERRORS = ("BlacklistedException", "NotVerifiedException", "UnknownSynapseError",
                   "SynapseParsingError", "InvalidRequestNameError", "PriorityException",
                   "HTTPException", "ClientDisconnect")
_PER_REQUEST = re.compile(r"^(\w+)#[0-9a-f-]{36}: ")


def clip(value: Any, limit: int = MAX_LOGGED_CHARS) -> str:
    """`value` as text of at most about `limit` characters, saying how much was cut."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...(+{len(text) - limit} chars)"


class _BittensorFilter(logging.Filter):
    """Drops bittensor's per-request refusal lines, clips every other message."""

    def __init__(self) -> None:
        super().__init__("natix-quiet-axon")
        self.dropped: collections.Counter = collections.Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not break logging
            message = str(record.msg)
        match = _PER_REQUEST.match(message)
        if match and match.group(1) in _REFUSAL_ERRORS:
            self.dropped[match.group(1)] += 1
            return False
        if len(message) > MAX_BITTENSOR_LINE:
            record.msg, record.args = clip(message, MAX_BITTENSOR_LINE), None
        return True


_FILTER = _BittensorFilter()


def quiet_bittensor_axon() -> collections.Counter:
    """Install the filter on bittensor's logger (idempotent); returns the dropped-line counter."""
    bt_logger = logging.getLogger("bittensor")
    if _FILTER not in bt_logger.filters:
        bt_logger.addFilter(_FILTER)
    return _FILTER.dropped
