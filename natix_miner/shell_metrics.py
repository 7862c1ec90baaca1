"""Prometheus view of the shell's defences, read from the live objects at each scrape.

Counters the guard, the HTTP layer and the admission gate keep anyway are exported as they are
(no second set of counters to keep in step):

- `natix_miner_guard_admitted_total`, `natix_miner_guard_refusals_total{reason}` (no_hotkey,
  malformed, denied, unregistered, no_permit, low_stake, bad_signature, stale, future, replay,
  rate_limited);
- `natix_miner_http_refusals_total{reason}` (unknown_route, bad_method, no_length, bad_length,
  body_too_large): refused before bittensor saw the request;
- `natix_miner_guard_seen_nonces`, `natix_miner_admission_active`, `natix_miner_admission_waiting`,
  `natix_miner_admission_timeouts_total` (waiters that got the fallback: outcome shed_busy);
- `natix_miner_metagraph_resyncs_total{result="ok"|"failed"}`,
  `natix_miner_metagraph_consecutive_failures`, `natix_miner_metagraph_snapshot_age_seconds`,
  `natix_miner_metagraph_stale` (1 after `miner.metagraph_fail_alert` failures in a row);
- `natix_miner_resident_memory_bytes`, `natix_miner_open_fds`.
"""

from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from natix_miner import memory


class ShellCollector:
    """A custom collector over one `Miner` (register it in the miner's telemetry registry)."""

    def __init__(self, miner: Any) -> None:
        self.miner = miner

    def describe(self) -> list:
        return []  # collected lazily: the guard and axon exist only after start()

    def collect(self) -> Iterator[Any]:
        m = self.miner
        guard, shield, gate, sync = m.guard, m.shield, m.gate, m.metagraph_sync
        yield CounterMetricFamily("natix_miner_guard_admitted", "Requests the guard admitted",
                                  value=guard.admitted if guard else 0)
        refusals = CounterMetricFamily("natix_miner_guard_refusals",
                                       "Requests the guard refused, by reason", labels=["reason"])
        for reason, n in sorted((guard.refused if guard else {}).items()):
            refusals.add_metric([reason], n)
        yield refusals
        http = CounterMetricFamily("natix_miner_http_refusals",
                                   "Requests refused by the HTTP layer, by reason", labels=["reason"])
        for reason, n in sorted((shield.refused if shield else {}).items()):
            http.add_metric([reason], n)
        yield http
        yield GaugeMetricFamily("natix_miner_guard_seen_nonces",
                                "Signed nonces remembered inside the freshness window",
                                value=guard.stats()["seen_nonces"] if guard else 0)
        yield GaugeMetricFamily("natix_miner_admission_active", "Requests holding an engine slot",
                                value=gate.active)
        yield GaugeMetricFamily("natix_miner_admission_waiting", "Requests waiting for an engine slot",
                                value=gate.waiting)
        yield CounterMetricFamily("natix_miner_admission_timeouts",
                                  "Requests whose budget ran out waiting for an engine slot",
                                  value=gate.timed_out)
        if sync is not None:
            s = sync.stats()
            resyncs = CounterMetricFamily("natix_miner_metagraph_resyncs", "Metagraph re-syncs",
                                          labels=["result"])
            resyncs.add_metric(["ok"], s["syncs_ok"])
            resyncs.add_metric(["failed"], s["syncs_failed"])
            yield resyncs
            yield GaugeMetricFamily("natix_miner_metagraph_consecutive_failures",
                                    "Metagraph re-syncs failed in a row",
                                    value=s["consecutive_failures"])
            yield GaugeMetricFamily("natix_miner_metagraph_snapshot_age_seconds",
                                    "Age of the guard's metagraph snapshot", value=s["snapshot_age_s"])
            yield GaugeMetricFamily("natix_miner_metagraph_stale",
                                    "1 when re-syncs keep failing and the guard's view is stale",
                                    value=1.0 if s["state"] == "stale" else 0.0)
        yield GaugeMetricFamily("natix_miner_resident_memory_bytes", "Resident set size",
                                value=memory.rss_bytes())
        yield GaugeMetricFamily("natix_miner_open_fds", "Open file descriptors",
                                value=memory.open_fds())
