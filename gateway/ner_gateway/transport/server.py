"""Assembly: builds the object graph by hand and runs it until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ner_gateway.core.admission import Admission, AdmissionLimits
from ner_gateway.core.compatibility import EngineRuntime
from ner_gateway.core.discovery import LiveVersions
from ner_gateway.core.errors import ConfigurationError
from ner_gateway.core.following import RolloutFollower, warn_unserved
from ner_gateway.core.pipeline import CpuOffload, Limits, RecognitionPipeline, TritonShares
from ner_gateway.core.registry import ModelRegistry
from ner_gateway.core.rollout import PolicyFile, RolloutPolicy
from ner_gateway.core.shadow import ShadowBudget
from ner_gateway.observability.metrics import GatewayMetrics
from ner_gateway.observability.tracing import Tracing, configure_tracing
from ner_gateway.pb.ner.v1 import ner_pb2_grpc
from ner_gateway.settings import GatewaySettings
from ner_gateway.transport import tls
from ner_gateway.transport.auth import BearerAuthInterceptor, BearerTokens
from ner_gateway.transport.background import BackgroundTasks
from ner_gateway.transport.door import DoorInterceptor
from ner_gateway.transport.health import SERVICE_NAME, TritonHealth, serving
from ner_gateway.transport.interceptors import ErrorInterceptor
from ner_gateway.transport.rpc_metrics import MetricsInterceptor
from ner_gateway.transport.servicer import NerServicer
from ner_gateway.transport.signals import shutdown_events
from ner_gateway.triton.pool import TritonPool
from ner_gateway.triton.process import EmbeddedTriton, TritonPorts
from ner_gateway.triton.routing import TritonRouter

LOGGER = logging.getLogger(__name__)


class Gateway:
    """The running service: (embedded) Triton, the pipeline and the gRPC server. ``stop()`` is idempotent."""

    def __init__(self, settings: GatewaySettings, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tracing = tracing
        self.metrics = GatewayMetrics()
        self.metrics_port: int | None = None
        self.triton: EmbeddedTriton | None = None
        self.backend: TritonPool | None = None
        self.health: TritonHealth | None = None
        self.server: grpc.aio.Server | None = None
        self.pipeline: RecognitionPipeline | None = None
        self.cpu_pool: ThreadPoolExecutor | None = None
        self.port: int | None = None
        self.policy_file: PolicyFile | None = None
        self.live_versions: LiveVersions | None = None
        self.rollout: RolloutFollower | None = None
        self._shadows = BackgroundTasks()
        self._versions_shown: set[tuple[str, str, str]] = set()  # ner_model_versions series set to 1
        self._stopped = False

    async def start(self) -> int:
        s = self.settings
        try:
            if s.triton_url is None:
                ports = TritonPorts(s.triton_grpc_port, s.triton_http_port, s.triton_metrics_port)
                self.triton = EmbeddedTriton(
                    s.model_repository, ready_timeout_s=s.triton_ready_timeout_s, log_verbose=s.triton_log_verbose,
                    ports=ports,  # each one set takes effect; 0 = a free port for that one
                    trace_endpoint=self._triton_trace_endpoint(), on_state_change=self._on_triton_state,
                )
                await self.triton.start()
            # One endpoint (the embedded Triton) or several; see triton/pool.py for how they are balanced.
            self.backend = TritonPool(s.triton_url or self.triton.grpc_url,  # type: ignore[union-attr]
                                      refresh_interval_s=s.health_check_interval_s)
            await self.backend.wait_ready(s.triton_ready_timeout_s)
            self.health = TritonHealth(self.backend, self.metrics)
            engines = EngineRuntime(s.tensorrt_version, s.gpu_compute_capability)
            self.live_versions = LiveVersions(
                s.model_repository, self.backend, s.window_stride, engines,
                on_refused=lambda model, version: self.metrics.version_refusals.labels(model, version).inc())
            registry = await self.live_versions.load(s.default_model, self._read_policy())
            warn_unserved(registry)
            self._rollout_changed(registry)
            self.backend.start()
            self.cpu_pool = ThreadPoolExecutor(s.cpu_offload_threads, thread_name_prefix="ner-cpu")
            admission = Admission(AdmissionLimits(s.max_inflight_requests, s.max_inflight_windows, s.retry_after_ms))
            self.pipeline = pipeline = RecognitionPipeline(
                registry, TritonRouter(self.backend),
                Limits(s.max_texts_per_request, s.max_text_chars, s.max_request_chars, s.default_timeout_s),
                metrics=self.metrics,
                offload=CpuOffload(self.cpu_pool, s.cpu_offload_chars), admission=admission,
                shares=TritonShares(s.triton_inflight_tokens, s.request_inflight_tokens, s.triton_calls_in_flight,
                                    s.triton_cancel_calls, s.triton_overlap_rows, s.triton_overlap_wait_ms / 1000),
                shadow_budget=ShadowBudget(s.shadow_max_inflight, admission),
            )
            self.rollout = RolloutFollower(registry, self.live_versions, self.policy_file,
                                           s.health_check_interval_s, self._rollout_changed)
            self.rollout.start()
            rpc_metrics = MetricsInterceptor(self.metrics)
            self.server = grpc.aio.server(interceptors=self._interceptors(rpc_metrics, admission))
            ner_pb2_grpc.add_NerServiceServicer_to_server(
                NerServicer(pipeline, rpc_metrics.label_model, self._shadows), self.server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
            reflection.enable_server_reflection(
                [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME], self.server,
            )
            self.port = tls.add_port(self.server, s)  # TLS when configured
            await self.health.set_serving(serving(self.backend))
            if s.metrics_port is not None and not self.metrics.shared():
                self.metrics_port = self.metrics.serve(s.host, s.metrics_port)
            await self.server.start()
        except BaseException:
            await self.stop()
            raise
        LOGGER.info("ner-gateway listening on %s:%d (Triton %s: endpoints ready %s; default model %s)", s.host,
                    self.port, self.backend.url, self.backend.ready_endpoints, registry.default_name)
        return self.port

    def _read_policy(self) -> RolloutPolicy | None:
        """The rollout policy file's first read: a file that is missing or invalid refuses the startup."""
        path = self.settings.rollout_policy_file
        if path is None:
            return None
        self.policy_file = PolicyFile(path, on_read=lambda outcome: self.metrics.policy_reloads.labels(outcome).inc())
        try:
            return self.policy_file.load()
        except (OSError, ValueError) as e:
            raise ConfigurationError(f"rollout policy {path}: {e}") from e

    def _rollout_changed(self, registry: ModelRegistry) -> None:
        """The versions' roles (ner_model_versions), and the batchers of the versions still served."""
        if self.pipeline is not None:
            self.pipeline.keep_batchers({m.served.key for m in registry.all_versions()})
        shown = {(v.model.name, v.model.version, v.role.value) for m in registry for v in registry.listing(m.name)}
        for series in self._versions_shown - shown:
            self.metrics.model_versions.labels(*series).set(0)
        for series in shown:
            self.metrics.model_versions.labels(*series).set(1)
        self._versions_shown = shown

    def _interceptors(self, rpc_metrics: MetricsInterceptor, admission: Admission) -> list[grpc.aio.ServerInterceptor]:
        """Outermost first: the RPC's server span, then authentication (a refused call reaches nothing else),
        then its metrics, then the door (a call beyond capacity is refused unparsed), then error mapping."""
        interceptors: list[grpc.aio.ServerInterceptor] = [
            rpc_metrics, DoorInterceptor(admission, self.metrics), ErrorInterceptor()]
        tokens = BearerTokens.from_settings(self.settings)
        if tokens is not None:
            interceptors.insert(0, BearerAuthInterceptor(tokens, self.metrics, self.settings.auth_exempt_reflection))
        if self.tracing is not None:
            from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

            not_traffic = filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection"))
            interceptors.insert(0, aio_server_interceptor(filter_=filters.negate(not_traffic)))
        return interceptors

    def _triton_trace_endpoint(self) -> str | None:
        """Where the embedded Triton sends its spans (OTLP/HTTP only), when tracing is on."""
        if self.tracing is None:
            return None
        if self.settings.triton_trace_endpoint:
            return self.settings.triton_trace_endpoint
        if self.tracing.protocol == "http/protobuf" and self.tracing.endpoint:
            if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
                return self.tracing.endpoint  # already the full traces URL
            return self.tracing.endpoint.rstrip("/") + "/v1/traces"
        LOGGER.warning("tracing is on but Triton's spans are not exported: set NER_TRITON_TRACE_ENDPOINT "
                       "to an OTLP/HTTP traces URL (Triton cannot export OTLP/gRPC)")
        return None

    def _on_triton_state(self, ready: bool) -> None:
        if self.health is not None:
            self.health.follow_embedded_triton(ready)

    async def drain(self, cut_short: asyncio.Event | None = None) -> None:
        """Readiness first: every health service NOT_SERVING at once, then ``shutdown_drain_s`` of serving as
        usual, so that load balancers (Kubernetes' readiness probe) take this gateway out while it still
        accepts calls. ``cut_short`` set (a second signal) ends the drain early. ``stop()`` comes next."""
        if self.health is not None:
            await self.health.shutdown()
        drain_s = self.settings.shutdown_drain_s
        if self.server is None or drain_s <= 0:
            return
        LOGGER.info("draining: NOT_SERVING but serving for %.1f s more (NER_SHUTDOWN_DRAIN_S)", drain_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for((cut_short or asyncio.Event()).wait(), drain_s)

    async def stop(self) -> None:
        """Health NOT_SERVING (if ``drain`` did not already) -> no new RPCs, in-flight ones finish within
        ``shutdown_grace_s`` -> stop Triton. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.health is not None:
            await self.health.shutdown()
        if self.server is not None:
            LOGGER.info("no new RPCs; those in flight get up to %.1f s (NER_SHUTDOWN_GRACE_S)",
                        self.settings.shutdown_grace_s)
            await self.server.stop(self.settings.shutdown_grace_s)
        if self.rollout is not None:
            await self.rollout.stop()
        await self._shadows.cancel_all()
        if self.backend is not None:
            await self.backend.close()
        if self.cpu_pool is not None:
            self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        if self.triton is not None:
            await self.triton.stop()
        self.metrics.close()
        if self.tracing is not None:
            self.tracing.shutdown()  # flushes the last spans
        LOGGER.info("ner-gateway stopped")


async def serve(settings: GatewaySettings) -> None:
    """Run until SIGTERM/SIGINT, then shut down readiness first: ``drain`` (a second signal cuts it short),
    then ``stop``."""
    gateway = Gateway(settings, configure_tracing())
    stop, hurry = shutdown_events()
    try:
        await gateway.start()
        await stop.wait()
        LOGGER.info("shutting down")
        await gateway.drain(hurry)
    finally:
        await gateway.stop()
