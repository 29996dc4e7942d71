"""Prometheus metrics of the gateway (its own registry, served on a separate port).

Names are a contract with deploy/ (alert rules, dashboard, autoscaler): change them additively.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LOGGER = logging.getLogger(__name__)
# prometheus_client's multiprocess mode: the folder where the workers of `ner-gateway serve --workers` write.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("ner_requests", "RPCs by method, model, the model version that answered and gRPC "
                                "status code", ["method", "model", "version", "code"], registry=r)
        self.request_duration = Histogram("ner_request_duration_seconds", "RPC latency", ["method", "model", "version"],
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
        # With several workers (multiprocess mode) the gauges say how to combine the workers' values.
        self.inflight = Gauge("ner_inflight_requests", "RPCs being served", ["method"], registry=r,
                              multiprocess_mode="livesum")
        self.triton_up = Gauge("ner_triton_up", "1 while Triton reports ready, else 0", registry=r,
                               multiprocess_mode="livemax")
        self.refused = Counter("ner_refused_requests", "Requests refused at once, before any work (load "
                               "shedding), by reason: requests or windows (at capacity: RESOURCE_EXHAUSTED), "
                               "queue (less time left than the model's queue would take: RESOURCE_EXHAUSTED), "
                               "deadline (less time left than the model's fastest call: DEADLINE_EXCEEDED)",
                               ["reason"], registry=r)
        for reason in ("requests", "windows", "queue", "deadline"):  # exported from the start: rules rate() them
            self.refused.labels(reason)
        self.abandoned_windows = Counter(
            "ner_abandoned_windows", "Windows of requests that failed, timed out or were cancelled before their "
            "answer: never sent to Triton (queued) or cancelled there (in_triton)", ["model", "stage"], registry=r)
        self.call_rows = Histogram("ner_triton_call_rows", "Rows (windows, of any requests) per coalesced Triton call",
                                   ["model"], buckets=COUNT_BUCKETS, registry=r)
        self.call_tokens = Histogram("ner_triton_call_tokens", "Padded tokens (rows x width) per coalesced Triton "
                                     "call", ["model"], buckets=COUNT_BUCKETS, registry=r)
        self.queue_wait = Histogram("ner_queue_wait_seconds", "Time a window waited in the gateway's queue before "
                                    "its Triton call left", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        # Model rollout (core/rollout.py): which versions serve in which role, and what a shadow candidate says.
        self.model_versions = Gauge("ner_model_versions", "1 for each model version the gateway serves, by its role "
                                    "(stable, canary, shadow, pinned: only callers that name it)",
                                    ["model", "version", "role"], registry=r, multiprocess_mode="livemax")
        self.version_refusals = Counter("ner_model_version_refusals", "Model versions that became READY in Triton "
                                        "but failed the gateway's checks (manifest, tokenizer, tensors) and do not "
                                        "serve", ["model", "version"], registry=r)
        self.policy_reloads = Counter("ner_rollout_policy_reloads", "Rollout policy file reads, by outcome: applied, "
                                      "or invalid (the last good policy stays)", ["outcome"], registry=r)
        for outcome in ("applied", "invalid"):
            self.policy_reloads.labels(outcome)
        self.shadow_requests = Counter("ner_shadow_requests", "Requests mirrored to a shadow candidate version, by "
                                       "outcome: scored, refused (its budget full or the gateway busy), failed",
                                       ["model", "live_version", "candidate_version", "outcome"], registry=r)
        self.shadow_entities = Counter("ner_shadow_entities", "A shadow candidate's entities against the live "
                                       "answer's, by label and outcome: agreed (same label and span), added (span "
                                       "only the candidate has), dropped (span only the live answer has), "
                                       "relabeled_from (live label of a span the candidate labels otherwise), "
                                       "relabeled_to (the candidate's label of that span)",
                                       ["model", "live_version", "candidate_version", "label", "outcome"], registry=r)
        self.shadow_documents = Counter("ner_shadow_documents", "Texts scored in shadow, by outcome: same (identical "
                                        "entities) or changed", ["model", "live_version", "candidate_version",
                                                                 "outcome"], registry=r)
        self._shadow_counts: dict[tuple[str, str, str], ShadowCounts] = {}
        self.auth_failures = Counter("ner_auth_failures", "RPCs refused for their bearer token, by reason "
                                     "(missing, malformed, rejected)", ["reason"], registry=r)

    def shadow(self, model: str, live_version: str, candidate_version: str) -> ShadowCounts:
        """The shadow instruments of one version pair, bound once."""
        key = (model, live_version, candidate_version)
        counts = self._shadow_counts.get(key)
        if counts is None:
            counts = self._shadow_counts[key] = ShadowCounts(self, *key)
        return counts

    @staticmethod
    def shared() -> bool:
        """This process is one of several workers (``ner-gateway serve --workers``): its samples go to the shared
        folder and the supervisor serves /metrics for all of them."""
        return bool(os.environ.get(MULTIPROC_ENV))

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


STAGES = ("validate", "tokenize", "infer", "decode")


class ModelMetrics:
    """One model's children of the per-request instruments, bound once (a ``labels()`` lookup per observation
    costs more than the observation)."""

    def __init__(self, metrics: GatewayMetrics, model: str) -> None:
        self.model = model
        self.stage_duration = {stage: metrics.stage_duration.labels(stage, model) for stage in STAGES}
        self.texts = metrics.texts.labels(model)
        self.tokens = metrics.tokens.labels(model)
        self.windows = metrics.windows.labels(model)
        self.entities = metrics.entities.labels(model)
        self._entities_by_label = metrics.entities_by_label
        self._by_label: dict[str, Counter] = {}
        self.call_rows = metrics.call_rows.labels(model)
        self.call_tokens = metrics.call_tokens.labels(model)
        self.queue_wait = metrics.queue_wait.labels(model)
        self._abandoned = {stage: metrics.abandoned_windows.labels(model, stage) for stage in ("queued", "in_triton")}

    def entity(self, label: str) -> Counter:
        child = self._by_label.get(label)
        if child is None:
            child = self._by_label[label] = self._entities_by_label.labels(self.model, label)
        return child

    # The batcher's observer (ner_gateway.core.batching.BatchObserver).
    def call_formed(self, rows: int, tokens: int, waited_s: Sequence[float]) -> None:
        self.call_rows.observe(rows)
        self.call_tokens.observe(tokens)
        for waited in waited_s:
            self.queue_wait.observe(waited)

    def abandoned(self, stage: str, windows: int) -> None:
        self._abandoned[stage].inc(windows)


class ShadowCounts:
    """What a shadow candidate said against the live answers, for one (model, live version, candidate version)."""

    def __init__(self, metrics: GatewayMetrics, model: str, live_version: str, candidate_version: str) -> None:
        pair = (model, live_version, candidate_version)
        self._requests = {outcome: metrics.shadow_requests.labels(*pair, outcome)
                          for outcome in ("scored", "refused", "failed")}
        self._documents = {outcome: metrics.shadow_documents.labels(*pair, outcome) for outcome in ("same", "changed")}
        self._entities = metrics.shadow_entities
        self._pair = pair

    def refused(self) -> None:
        self._requests["refused"].inc()

    def failed(self) -> None:
        self._requests["failed"].inc()

    def scored(self, entities: Mapping[tuple[str, str], int], same_documents: int, changed_documents: int) -> None:
        """``entities``: counts by (label, outcome)."""
        self._requests["scored"].inc()
        for (label, outcome), count in entities.items():
            self._entities.labels(*self._pair, label, outcome).inc(count)
        self._documents["same"].inc(same_documents)
        self._documents["changed"].inc(changed_documents)
