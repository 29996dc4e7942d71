"""The RPC-level metrics (ner_requests, ner_request_duration_seconds, ner_inflight_requests) as an interceptor.

A traced call's latency sample, and its error count when it failed, carry its trace and span ids as an OpenMetrics
exemplar (``observability.tracing.exemplar``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import grpc
from prometheus_client import Counter, Histogram

from ner_gateway.observability.metrics import GatewayMetrics
from ner_gateway.observability.tracing import exemplar
from ner_gateway.transport.interceptors import Guard, GuardInterceptor
from ner_gateway.transport.rpc_types import Context

_UNRESOLVED = ("", "")


def _code(context: Context) -> grpc.StatusCode | None:
    """The status set so far; None until one is (the stub types it as always set)."""
    return cast("grpc.StatusCode | None", context.code())


class MetricsInterceptor(GuardInterceptor):
    """Counts RPCs by method/model/code and times them; runs outside the error interceptor.

    The model and version labels are what the servicer reports through ``label_model`` for the call in flight (the
    model version the request resolved to); a request refused before it names a valid model is counted under "".
    """

    def __init__(self, metrics: GatewayMetrics, service_prefix: str = "/ner.v1.") -> None:
        self.metrics = metrics
        self.service_prefix = service_prefix
        self._models: dict[Context, tuple[str, str]] = {}  # calls in flight -> (model, version) labels

    def label_model(self, context: Context, model: str, version: str) -> None:
        if context in self._models:
            self._models[context] = (model, version)

    def guard(self, method: str) -> Guard | None:
        if not method.startswith(self.service_prefix):
            return None  # health checks and reflection are not traffic
        name = method.rsplit("/", 1)[-1]
        metrics = self.metrics
        inflight = metrics.inflight.labels(name)
        # Children bound once per (model, version, code) and (model, version): a labels() lookup costs more than
        # the observation.
        counted: dict[tuple[tuple[str, str], grpc.StatusCode], Counter] = {}
        timed: dict[tuple[str, str], Histogram] = {}

        @asynccontextmanager
        async def observed(context: Context) -> AsyncIterator[None]:
            started = time.perf_counter()
            inflight.inc()
            self._models[context] = _UNRESOLVED
            code: grpc.StatusCode | None = None
            try:
                yield
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = _code(context) or grpc.StatusCode.UNKNOWN
                raise
            finally:
                final = code or _code(context) or grpc.StatusCode.OK
                model = self._models.pop(context, _UNRESOLVED)
                counter = counted.get((model, final))
                if counter is None:
                    counter = counted[(model, final)] = metrics.requests.labels(name, *model, final.name)
                ids = exemplar()
                counter.inc(exemplar=ids if final is not grpc.StatusCode.OK else None)
                histogram = timed.get(model)
                if histogram is None:
                    histogram = timed[model] = metrics.request_duration.labels(name, *model)
                histogram.observe(time.perf_counter() - started, exemplar=ids)
                inflight.dec()

        return observed
