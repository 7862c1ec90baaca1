"""Prometheus metrics of one engine, in a private registry (two engines in one process, as in
tests, never collide). Served over HTTP only when the shell passes a port."""

from typing import Optional

from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 6.0, 9.0, 15.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class Telemetry:
    """Counters and histograms the engine updates; read them from `registry` or over HTTP."""

    def __init__(self, registry: Optional[CollectorRegistry] = None, namespace: str = "cascade") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, namespace
        self.requests = Counter("requests", "Predict requests received", namespace=ns, registry=r)
        self.answers = Counter("answers", "Answers served, by kind (fused or fallback)", ["kind"],
                               namespace=ns, registry=r)
        self.escalations = Counter("escalations", "Requests that ran more than one tier",
                                   namespace=ns, registry=r)
        self.deadline_misses = Counter("deadline_misses", "Requests where the deadline cut a tier "
                                       "still running (answer fused from the tiers that finished)",
                                       namespace=ns, registry=r)
        self.late_answers = Counter("late_answers", "Answers returned after their deadline",
                                    namespace=ns, registry=r)
        self.request_latency = Histogram("request_latency_seconds", "End-to-end predict latency",
                                         buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.tier_calls = Counter("tier_calls", "Requests submitted to a tier", ["tier"],
                                  namespace=ns, registry=r)
        self.tier_failures = Counter("tier_failures", "Tier answers dropped, by kind "
                                     "(error; invalid: not a finite probability in [0, 1]; timeout; deadline: still "
                                     "running when the request's time ran out)", ["tier", "kind"],
                                     namespace=ns, registry=r)
        self.tier_latency = Histogram("tier_latency_seconds", "Submit-to-result latency per request",
                                      ["tier"], buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.tier_queue_wait = Histogram("tier_queue_wait_seconds", "Time a request waited in a "
                                         "tier's queue before its batch started", ["tier"],
                                         buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.tier_model_time = Histogram("tier_model_seconds", "Model time of one batch on the "
                                         "tier's worker (queue time excluded)", ["tier"],
                                         buckets=LATENCY_BUCKETS, namespace=ns, registry=r)
        self.tier_busy = Gauge("tier_busy_seconds", "How long the tier's current call has been "
                               "running (0: idle); a hung tier keeps growing", ["tier"],
                               namespace=ns, registry=r)
        self.tier_batch_size = Histogram("tier_batch_size", "Images per batch given to a tier",
                                         ["tier"], buckets=BATCH_BUCKETS, namespace=ns, registry=r)
        self.tier_skipped = Counter("tier_skipped", "Tier not run for a request, by reason (breaker; "
                                    "budget: its model time does not fit; queue: its queue could not "
                                    "be served inside the request's budget, a shed, not a failure; decided: no answer it "
                                    "can give would change the decision)",
                                    ["tier", "reason"], namespace=ns, registry=r)
        self.shed = Counter("shed", "Requests answered without a tier because its queue could not "
                            "serve them inside their budget (load shedding)", namespace=ns, registry=r)
        self.breaker_state = Gauge("tier_breaker_state", "0 closed, 1 half-open, 2 open", ["tier"],
                                   namespace=ns, registry=r)
        self.store_saved = Counter("store_saved", "Uncertain inputs saved for labelling",
                                   namespace=ns, registry=r)
        self.store_dropped = Counter("store_dropped", "Uncertain inputs not saved (queue full or error)",
                                     namespace=ns, registry=r)
        self.ready = Gauge("ready", "1 once every tier loaded and warmed up", namespace=ns, registry=r)
        self._server = None

    def value(self, name: str, labels: Optional[dict[str, str]] = None) -> float:
        """A sample's current value (0 when never set): `value("cascade_tier_calls_total", {"tier": "a"})`."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else float(v)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics on `addr:port` (the shell passes the port flag)."""
        self._server = start_http_server(port, addr=addr, registry=self.registry)
        logger.info("prometheus metrics on http://{}:{}/metrics", addr, port)

    def close(self) -> None:
        server = self._server
        self._server = None
        if server is not None and isinstance(server, tuple):
            httpd, thread = server
            httpd.shutdown()
            httpd.server_close()
