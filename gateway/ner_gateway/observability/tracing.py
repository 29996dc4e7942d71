"""OpenTelemetry tracing, configured only from the standard OTEL_* environment variables.

No exporter unless ``OTEL_TRACES_EXPORTER`` asks for one (``otlp`` or ``console``); OTLP over gRPC
(default) or HTTP per ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``. The
exporters read their endpoint, headers and timeout from the environment themselves; the sampler
comes from ``OTEL_TRACES_SAMPLER``; the service name from ``OTEL_SERVICE_NAME`` (default
``ner-gateway``) and ``OTEL_RESOURCE_ATTRIBUTES``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

LOGGER = logging.getLogger(__name__)
TRACER = trace.get_tracer("ner_gateway")


@dataclass(frozen=True)
class Tracing:
    provider: TracerProvider
    protocol: str
    endpoint: str | None  # where OTLP goes, if set through the environment

    def shutdown(self) -> None:
        self.provider.shutdown()


def _protocol() -> str:
    return (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc")


def configure_tracing(default_service_name: str = "ner-gateway") -> Tracing | None:
    """Install a global tracer provider when the environment asks for an exporter; else do nothing."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    exporters: list[SpanExporter] = []
    protocol = _protocol()
    for name in names:
        if name == "otlp":
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            elif protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
            else:
                raise ValueError(f"unsupported OTLP protocol {protocol!r} (use grpc or http/protobuf)")
            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            raise ValueError(f"unsupported OTEL_TRACES_EXPORTER {name!r} (use otlp, console or none)")
    if not exporters:
        return None
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    LOGGER.info("tracing: exporting spans via %s (%s)", ",".join(names), protocol if "otlp" in names else "-")
    return Tracing(provider, protocol, endpoint)


def trace_headers() -> dict[str, str]:
    """W3C trace context of the current span, for the Triton call's gRPC metadata."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def exemplar() -> dict[str, str] | None:
    """The current span's ids as an OpenMetrics exemplar's labels, when it is sampled (its trace is exported):
    a latency or error sample then links to the trace of one request that made it. Only ids, never text."""
    context = trace.get_current_span().get_span_context()
    if not context.trace_flags.sampled:
        return None
    return {"trace_id": trace.format_trace_id(context.trace_id), "span_id": trace.format_span_id(context.span_id)}
