"""Real OTLP plumbing for tests: an in-process OTLP/gRPC trace sink and the rotel collector process."""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

ROTEL_AGENT = Path(__import__("rotel").__file__).parent / "rotel-agent"


class TraceSink(trace_service_pb2_grpc.TraceServiceServicer):
    """Receives OTLP/gRPC trace exports and keeps every span with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []  # (service.name, Span)
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[tuple[str, object]]:
        """Every span received so far, with its service name."""
        with self._lock:
            return list(self.spans)

    def wait_for(self, condition, timeout_s: float = 30.0) -> list[tuple[str, object]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            spans = self.snapshot()
            if condition(spans):
                return spans
            time.sleep(0.2)
        raise TimeoutError(f"spans never matched; got {[(s, sp.name) for s, sp in spans]}")


def start_rotel(grpc_port: int, http_port: int, sink_port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """rotel receiving OTLP gRPC + HTTP on loopback and forwarding OTLP/gRPC to the sink."""
    return subprocess.Popen(
        [str(ROTEL_AGENT), "start",
         "--otlp-grpc-endpoint", f"127.0.0.1:{grpc_port}", "--otlp-http-endpoint", f"127.0.0.1:{http_port}",
         "--exporter", "otlp", "--otlp-exporter-endpoint", f"http://127.0.0.1:{sink_port}",
         "--otlp-exporter-protocol", "grpc", "--batch-timeout", "100ms",
         "--pid-file", str(workdir / "rotel.pid"), "--log-file", str(workdir / "rotel.log")],
        stdout=(workdir / "rotel.out").open("wb"), stderr=subprocess.STDOUT,
    )
