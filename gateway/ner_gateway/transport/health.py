"""grpc.health.v1 status driven by Triton's readiness.

The overall ("") and ner.v1.NerService status is SERVING while some Triton endpoint is up and at least one
served model is ready on one (``TritonPool.ready``): a single model unloaded or failing does not take the
gateway out of a load balancer, since its calls fail fast with UNAVAILABLE on their own and ListModels marks
it ``ready: false``; taking this gateway out would help nobody (every gateway sees the same Tritons). From
shutdown on (``shutdown``), every service is NOT_SERVING for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from ner_gateway.observability.metrics import GatewayMetrics
from ner_gateway.pb.ner.v1 import ner_pb2
from ner_gateway.transport.background import BackgroundTasks
from ner_gateway.triton.pool import TritonPool

LOGGER = logging.getLogger(__name__)

SERVICE_NAME = ner_pb2.DESCRIPTOR.services_by_name["NerService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TritonHealth:
    """Keeps the overall ("") and NerService health in step with Triton's readiness."""

    def __init__(
        self, backend: TritonPool, interval_s: float, metrics: GatewayMetrics | None = None
    ) -> None:
        self.servicer = HealthServicer()
        self.backend = backend
        self.metrics = metrics
        self.interval_s = interval_s
        self.serving: bool | None = None
        self._shut_down = False
        self._task: asyncio.Task[None] | None = None
        self._followers = BackgroundTasks()

    async def set_serving(self, serving: bool) -> None:
        if self._shut_down:
            return
        if serving != self.serving:
            LOGGER.log(logging.INFO if serving else logging.WARNING, "health: %s",
                       "SERVING" if serving else "NOT_SERVING (Triton not ready)")
        self.serving = serving
        if self.metrics is not None:
            self.metrics.triton_up.set(1 if serving else 0)
        for service in ("", SERVICE_NAME):
            await self.servicer.set(service, SERVING if serving else NOT_SERVING)

    def mark_unavailable(self) -> None:
        """Called when an inference found Triton unavailable: follow at once what the pool now knows (it took
        out what failed: an endpoint, or just one model there), instead of waiting for the next poll."""
        self._followers.start(self.set_serving(self.backend.ready), name="health-follows-pool")

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="triton-health")

    async def _poll(self) -> None:
        while True:
            await self.set_serving(self.backend.ready)
            await asyncio.sleep(self.interval_s)

    async def shutdown(self) -> None:
        """Every service NOT_SERVING, for good (later ``set_serving`` calls change nothing). Idempotent."""
        if not self._shut_down:
            LOGGER.info("health: NOT_SERVING (shutting down)")
        self._shut_down = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._followers.cancel_all()
        await self.servicer.enter_graceful_shutdown()
