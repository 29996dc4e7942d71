"""Refusing at the door: a Recognize call that finds the gateway at capacity is refused before its request is
parsed or any stage runs, so that under a flood refusing costs far less than serving (the pipeline's own
admission check, core/admission.py, stays the exact limit; this is the cheap early one for the same limit).

gRPC's own ``maximum_concurrent_rpcs`` refuses as early, but counts health checks and reflection with the
traffic (a flood would fail the readiness probe and then every health check) and cannot send the retry hint.
"""

from __future__ import annotations

from typing import Any

import grpc

from ner_gateway.core.admission import Admission
from ner_gateway.observability.metrics import GatewayMetrics
from ner_gateway.transport.interceptors import set_status
from ner_gateway.transport.rpc_types import Context, Continuation, Handler

RECOGNIZE = "/ner.v1.NerService/Recognize"


class DoorInterceptor(grpc.aio.ServerInterceptor):
    """Answers RESOURCE_EXHAUSTED, with ``grpc-retry-pushback-ms``, to Recognize calls beyond the admission limit;
    the request's bytes are never parsed. Counted in ``ner_refused_requests_total{reason="requests"}``."""

    def __init__(self, admission: Admission, metrics: GatewayMetrics) -> None:
        self.admission = admission
        self._refused = metrics.refused.labels("requests")
        error = admission.refusal("requests")  # the very answer the pipeline's own check gives

        async def refuse(request: Any, context: Context) -> None:
            set_status(context, error, RECOGNIZE)

        # No request deserializer: the bytes are not parsed.
        self._refusal: Handler = grpc.unary_unary_rpc_method_handler(refuse)

    async def intercept_service(self, continuation: Continuation,
                                handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        if handler_call_details.method == RECOGNIZE and self.admission.at_capacity:
            self._refused.inc()
            return self._refusal
        return await continuation(handler_call_details)
