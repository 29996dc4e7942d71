"""Prometheus metrics of the gateway (its own registry, served on a separate port).

Names are a contract with deploy/ (alert rules, dashboard, autoscaler): change them additively.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LOGGER = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("ner_requests", "RPCs by method, model and gRPC status code",
                                ["method", "model", "code"], registry=r)
        self.request_duration = Histogram("ner_request_duration_seconds", "RPC latency", ["method", "model"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("ner_stage_duration_seconds", "Latency of each pipeline stage",
                                        ["stage", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.texts = Histogram("ner_request_texts", "Texts per request", ["model"], buckets=COUNT_BUCKETS, registry=r)
        self.tokens = Histogram("ner_request_tokens", "Tokens per request", ["model"], buckets=COUNT_BUCKETS,
                                registry=r)
        self.windows = Histogram("ner_request_windows", "Model inputs (windows) per request", ["model"],
                                 buckets=COUNT_BUCKETS, registry=r)
        self.entities = Histogram("ner_request_entities", "Entities per request", ["model"], buckets=COUNT_BUCKETS,
                                  registry=r)
        self.entities_by_label = Counter("ner_entities", "Entities returned, by label (label mix, for drift)",
                                         ["model", "label"], registry=r)
        self.inflight = Gauge("ner_inflight_requests", "RPCs being served", ["method"], registry=r)
        self.triton_up = Gauge("ner_triton_up", "1 while Triton reports ready, else 0", registry=r)
        self.refused = Counter("ner_refused_requests", "Requests refused at once, before any work (load "
                               "shedding), by reason: requests or windows (at capacity: RESOURCE_EXHAUSTED), "
                               "deadline (less time left than a Triton call takes now: DEADLINE_EXCEEDED)",
                               ["reason"], registry=r)
        self.abandoned_windows = Counter(
            "ner_abandoned_windows", "Windows of requests that failed, timed out or were cancelled before their "
            "answer: never sent to Triton (queued) or cancelled there (in_triton)", ["model", "stage"], registry=r)
        self.auth_failures = Counter("ner_auth_failures", "RPCs refused for their bearer token, by reason "
                                     "(missing, malformed, rejected)", ["reason"], registry=r)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics in a background thread; returns the bound port (port 0 picks a free one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(server.server_address[1])
        LOGGER.info("metrics on http://%s:%d/metrics", host, bound)
        self._server = server
        return bound

    def close(self) -> None:
        server = getattr(self, "_server", None)
        if server is not None:
            server.shutdown()
            server.server_close()
